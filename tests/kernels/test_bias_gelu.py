"""bias + GELU(tanh) (repa_fast/kernels/bias_gelu.py) vs the float64 reference: forward, the gradient of every input,
fp32 and bf16 (autocast: bf16 u, fp32 bias), tiles and chunks, strided rows, registration, compile."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from repa_fast.kernels.bias_gelu import bias_gelu, bias_gelu_ref, linear_gelu, linear_gelu_ref
from tests.conftest import assert_close, assert_lowp_error
from tests.kernels._helpers import check_against_fp64, forward_backward, leaf

bg = importlib.import_module("repa_fast.kernels.bias_gelu")  # the package re-exports a function of that name

# (rows..., F): SiT-XL/2's fc1 width 4608 with an odd token count, SiT-B's 3072 at batch 1, a non-power-of-2 520,
# and a 2-D (rows, F) input.
SHAPES = [(2, 9, 4608), (1, 7, 3072), (2, 5, 520), (11, 130)]
BF16, FP32 = torch.bfloat16, torch.float32


def _inputs(shape, dtype=FP32, bias_dtype=None):
    u = (torch.randn(*shape) * 2).to(dtype)  # |u| up to ~8: both tails and the curved middle of GELU
    bias = (torch.randn(shape[-1]) * 0.5).to(bias_dtype or dtype)
    return [u.requires_grad_(), bias.requires_grad_()]


def _kernel(u, b):
    return bias_gelu(u, b, impl="triton")


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_forward_and_gradients(shape):
    check_against_fp64(_kernel, bias_gelu_ref, _inputs(shape), ["elementwise"], ["elementwise", "reduction"])


def test_matches_torch_gelu_tanh_formula():
    """The sigmoid form is GELU_tanh: against F.gelu(approximate="tanh") in float64 on a dense grid."""
    z = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    y = bias_gelu(z.float()[None], torch.zeros(z.numel()), impl="triton")[0]
    assert_close(y, F.gelu(z, approximate="tanh"))


# Maximum errors need samples: >= 30K elements, so that eager's max error reaches its 0.5-ulp bound. (Triton's
# interpreter truncates fp32 -> bf16 on store, up to 1 ulp; compiled Triton rounds to nearest even.)
@pytest.mark.parametrize("shape", [(2, 9, 4608), (64, 520)])
def test_autocast_dtypes_and_bf16_error(shape):
    """As under autocast: u is fc1's bf16 output, bias the fp32 parameter. y and du are bf16 (u's dtype; the bias
    never promotes), dbias fp32; errors vs float64 at most 2x eager PyTorch's in bf16."""
    u, b = _inputs(shape, BF16, FP32)
    (y,), grads, (du, db) = forward_backward(_kernel, [leaf(u), leaf(b)])
    assert (y.dtype, du.dtype, db.dtype) == (BF16, BF16, FP32)
    (y_p,), _, (du_p, _) = forward_backward(bias_gelu_ref, [leaf(u), leaf(b)], grads)  # plain PyTorch in bf16
    (y_x,), _, (du_x, db_x) = forward_backward(
        bias_gelu_ref, [leaf(u, torch.float64), leaf(b, torch.float64)], [g.double() for g in grads]
    )
    assert_lowp_error(y, y_p, y_x)
    assert_lowp_error(du, du_p, du_x)
    assert_close(db, db_x, "reduction", dtype=BF16)  # fp32 sums of bf16 du: bf16-level error per term


def test_small_tiles_many_chunks(monkeypatch):
    """2-row tiles over 64-wide column blocks and 6-row chunks: masked row and column tails, several partial-sum
    chunks, an overhanging last chunk (21 rows)."""
    monkeypatch.setattr(bg, "_launch_config", lambda n_rows, F_, dev, backward=False: (2, 64, 6, 4))
    check_against_fp64(_kernel, bias_gelu_ref, _inputs((3, 7, 130)), ["elementwise"], ["elementwise", "reduction"])


def test_strided_rows_are_read_in_place():
    """u with a row stride wider than F (a column slice of a wider GEMM output) and a strided upstream gradient."""
    wide = torch.randn(2, 5, 300, requires_grad=True)
    b = torch.randn(130, requires_grad=True)

    def fn(impl):
        y = bias_gelu(wide[..., 7:137], b, impl=impl)
        return (y * torch.linspace(-1, 1, 130)).sum() + y[:, ::2].square().sum(), y

    (lk, yk), (lr, yr) = fn("triton"), fn("ref")
    assert_close(yk, yr)
    for a, e in zip(torch.autograd.grad(lk, [wide, b]), torch.autograd.grad(lr, [wide, b])):
        assert_close(a, e, "reduction")


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_linear_gelu_equals_the_reference_mlp_half(impl):
    """linear_gelu(x, W, b) = gelu(fc1(x)): forward and the gradients of x, W and b (fp32, against float64)."""
    x = torch.randn(2, 9, 64, requires_grad=True)
    w = (torch.randn(256, 64) / 8).requires_grad_()
    b = (torch.randn(256) * 0.3).requires_grad_()
    check_against_fp64(
        lambda x, w, b: linear_gelu(x, w, b, impl=impl),
        linear_gelu_ref,
        [x, w, b],
        ["elementwise"],
        ["reduction", "reduction", "reduction"],
    )


def test_linear_gelu_under_autocast_is_bf16_with_fp32_parameter_grads():
    """Under autocast: bf16 output, fp32 parameter gradients; error vs float64 (of the bf16 GEMM operands) at most
    2x that of the reference's gelu(fc1(x)) in bf16."""
    x = torch.randn(8, 16, 64)
    w = (torch.randn(256, 64) / 8).requires_grad_()
    b = (torch.randn(256) * 0.3).requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = linear_gelu(x, w, b, impl="triton")
        y_ref = linear_gelu_ref(x, w, b)
    assert y.dtype == y_ref.dtype == BF16
    y.float().sum().backward()
    assert w.grad.dtype == b.grad.dtype == FP32
    exact = linear_gelu_ref(x.bfloat16().double(), w.detach().bfloat16().double(), b.detach().double())
    assert_lowp_error(y, y_ref, exact)


def test_mlp_keeps_the_forward_of_a_converted_fc1():
    """SiT's Mlp fuses fc1's bias + GELU only for a plain nn.Linear: a module swapped in by a conversion (fp8
    training's Float8Linear, ...) is called, so its own matmul runs."""
    from repa_fast.models.sit import Mlp

    class Converted(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            Converted.calls += 1
            return super().forward(x)

    mlp = Mlp(64, 256, impl="triton")
    x = torch.randn(2, 9, 64)
    fused = mlp(x)
    converted = Converted(64, 256)
    converted.load_state_dict(mlp.fc1.state_dict())
    mlp.fc1 = converted
    assert_close(mlp(x), fused.double())
    assert Converted.calls == 1


def test_ops_pass_opcheck():
    u, b = _inputs((2, 5, 130))
    for op, args in [
        (bg._bias_gelu_op, (u, b)),
        (bg._bias_gelu_bwd_op, (torch.randn(2, 5, 130), u.detach(), b.detach())),
    ]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_compiles_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 9, 64, requires_grad=True)
    w = (torch.randn(256, 64) / 8).requires_grad_()
    b = torch.randn(256, requires_grad=True)
    fn = lambda x, w, b: linear_gelu(x, w, b, impl="triton").square().mean()  # noqa: E731
    eager = fn(x, w, b)
    ge = torch.autograd.grad(eager, [x, w, b])
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w, b)
    gc = torch.autograd.grad(compiled, [x, w, b])
    assert_close(compiled, eager)
    for a, e in zip(gc, ge):
        assert_close(a, e, "reduction")
    torch._dynamo.reset()


def test_bad_bias_shape():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bias_gelu(torch.randn(2, 8), torch.randn(7))


@pytest.mark.gpu
def test_compiled_triton_at_sit_xl_width():
    """On a CUDA GPU (compiled Triton, RTNE stores): fp32 vs float64 and the bf16 2x rule at fc1's 4608 width."""
    u, b = (t.detach().cuda().requires_grad_() for t in _inputs((4, 256, 4608)))
    check_against_fp64(_kernel, bias_gelu_ref, [u, b], ["elementwise"], ["elementwise", "reduction"])
    u16 = u.detach().bfloat16()
    exact = bias_gelu_ref(u16.double(), b.detach().double())
    assert_lowp_error(bias_gelu(u16, b.detach(), impl="triton"), bias_gelu_ref(u16, b.detach()), exact)
