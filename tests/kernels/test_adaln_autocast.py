"""adaLN under autocast and the block's last gated residual (issue 18, cut 2d).

- ``y_dtype``: the modulated LN output is written in the dtype its GEMM reads (bf16 under bf16 autocast), computed
  in fp32 and rounded once; the residual stream x_new stays fp32. Triton and the reference agree (the reference
  casts its fp32 result: the cast the GEMM's autocast used to do).
- ``gated_residual``: x + gate * branch in one pass, forward and every gradient against float64, mixed dtypes.
"""

import pytest
import torch

from repa_fast.kernels import _dispatch, adaln
from repa_fast.kernels._dispatch import autocast_dtype
from repa_fast.kernels.adaln import (
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
)
from tests.conftest import assert_close, assert_lowp_error
from tests.kernels._helpers import check_against_fp64, leaf

SHAPES = [(3, 9, 1152), (1, 7, 768), (2, 5, 130)]  # odd token counts, non-power-of-2 widths, batch 1
BF16, FP32 = torch.bfloat16, torch.float32


def _sit_amp_inputs(B, N, D):
    """As SiT calls the ops under bf16 autocast: fp32 residual x, bf16 branch (a GEMM output) and bf16 adaLN
    vectors (chunks of the autocast adaLN Linear's output)."""
    x = torch.randn(B, N, D) * 2 + 0.5
    branch = torch.randn(B, N, D).to(BF16)
    gate, shift, scale = ((torch.randn(B, D) * 0.5).to(BF16) for _ in range(3))
    return [t.requires_grad_() for t in (x, branch, gate, shift, scale)]


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at each value of t (8 significant bits)."""
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), torch.frexp(t.double()).exponent - 8)


# ----------------------------------------------------------------------------------------------------------------
# y_dtype: the GEMM's dtype, one rounding
# ----------------------------------------------------------------------------------------------------------------
def test_autocast_dtype_follows_autocast_and_its_casting_rule():
    x = torch.randn(2, 3)
    assert autocast_dtype(x) is None
    with torch.autocast("cpu", dtype=BF16):
        assert autocast_dtype(x) == BF16
        assert autocast_dtype(x.double()) is None  # autocast leaves float64 alone, and so do we
    assert autocast_dtype(torch.empty(2, device="meta")) is None  # no autocast on meta


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("shape", SHAPES)
def test_modulated_ln_is_written_in_the_gemm_dtype(impl, shape):
    """Under autocast y is bf16 and is the fp32 result rounded once (RTNE on a GPU; Triton's interpreter truncates,
    so within one bf16 ulp on CPU); x_new stays fp32 and is unchanged."""
    x, br, g, sh, sc = (t.detach() for t in _sit_amp_inputs(*shape))
    with torch.autocast("cpu", dtype=BF16):
        amp = autocast_dtype(x)
        y = adaln_modulate(x, sh, sc, impl=impl, y_dtype=amp)
        x_new, y2 = gated_residual_adaln(x, br, g, sh, sc, impl=impl, y_dtype=amp)
        y32 = adaln_modulate(x, sh, sc, impl=impl)  # eager's dtype: fp32
        x_new32, y2_32 = gated_residual_adaln(x, br, g, sh, sc, impl=impl)
    assert (y.dtype, y2.dtype, x_new.dtype) == (BF16, BF16, FP32)
    assert (y32.dtype, y2_32.dtype) == (FP32, FP32)
    assert torch.equal(x_new, x_new32)
    for low, full in ((y, y32), (y2, y2_32)):
        if impl == "ref":
            assert torch.equal(low, full.to(BF16))  # exactly the cast the GEMM's autocast did before
        else:
            assert ((low.double() - full.double()).abs() <= _bf16_ulp(full)).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_output_forward_and_gradients_vs_fp64(shape):
    """y in bf16 from fp32 x: within one bf16 ulp of float64; the gradients (dy arrives in bf16 from the GEMM)
    at the fp32 / reduction tolerances of their inputs."""
    x, br, g, sh, sc = _sit_amp_inputs(*shape)
    check_against_fp64(
        lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="triton", y_dtype=BF16),
        lambda x, sh, sc: adaln_modulate_ref(x, sh, sc),
        [x, sh, sc],
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )
    outs, _ = check_against_fp64(
        lambda *t: gated_residual_adaln(*t, impl="triton", y_dtype=BF16),
        lambda *t: gated_residual_adaln_ref(*t),
        [x, br, g, sh, sc],
        ["elementwise", "elementwise"],
        ["elementwise", "elementwise", "reduction", "reduction", "reduction"],
    )
    assert [o.dtype for o in outs] == [FP32, BF16]


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_bf16_error_at_most_twice_plain_pytorch(impl):
    """All-bf16 inputs, y written in bf16: error vs float64 <= 2 x eager PyTorch's in bf16 (tests/conftest.py)."""
    B, N, D = 2, 9, 1152
    x = (torch.randn(B, N, D) * 2 + 0.5).to(BF16)
    sh, sc, g = ((torch.randn(B, D) * 2).to(BF16) for _ in range(3))
    br = (torch.randn(B, N, D) * 2).to(BF16)
    y = adaln_modulate(x, sh, sc, impl=impl, y_dtype=BF16)
    exact = adaln_modulate_ref(x.double(), sh.double(), sc.double())
    assert_lowp_error(y, adaln_modulate_ref(x, sh, sc), exact)
    x_new, y2 = gated_residual_adaln(x, br, g, sh, sc, impl=impl, y_dtype=BF16)
    plain_new, plain_y2 = gated_residual_adaln_ref(x, br, g, sh, sc)
    exact_new = x.double() + g.double()[:, None] * br.double()
    assert_lowp_error(x_new, plain_new, exact_new)
    # y2 normalises the stored (rounded) x_new, as eager does: compare both against float64 at their own x_new
    assert_lowp_error(y2, plain_y2, adaln_modulate_ref(x_new.double(), sh.double(), sc.double()))


def _record_input_dtype(module, name: str, seen: dict) -> None:
    def hook(mod, args):
        seen.setdefault(name, args[0].dtype)  # returns None: the inputs are left as they are

    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_sit_gemms_read_bf16_and_the_residual_stays_fp32(impl):
    """In SiT under bf16 autocast, qkv, fc1 and the final Linear get bf16 inputs straight from the fused ops (before:
    fp32, cast by autocast); the stream between blocks stays fp32."""
    from repa_fast.models.sit import SiT

    model = SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10, z_dims=[], impl=impl)
    seen = {}
    for name, mod in (("qkv", model.blocks[0].attn.qkv), ("mlp", model.blocks[1].mlp)):  # mlp: fc1's input
        _record_input_dtype(mod, name, seen)
    _record_input_dtype(model.final_layer.linear, "final", seen)
    _record_input_dtype(model.blocks[1], "stream", seen)
    with torch.autocast("cpu", dtype=BF16):
        out, _ = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert seen == {"qkv": BF16, "mlp": BF16, "final": BF16, "stream": FP32}, seen
    assert torch.isfinite(out).all()


def test_reference_model_under_autocast_is_bitwise_unchanged(monkeypatch):
    """impl="ref": writing y in bf16 only moves the cast the Linear's autocast did: outputs and gradients are
    bit for bit those of the model with y left in fp32."""
    from repa_fast.models import sit

    torch.manual_seed(0)
    model = sit.SiT(
        input_size=8,
        patch_size=2,
        hidden_size=64,
        depth=2,
        num_heads=2,
        num_classes=10,
        z_dims=[16],
        encoder_depth=1,
        impl="ref",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            out, zs = model(*inputs)
        (out.float().square().mean() + zs[0].float().square().mean()).backward()
        return [out.detach(), zs[0].detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    new = run()
    monkeypatch.setattr(sit, "autocast_dtype", lambda x: None)  # the model before the cut: y in fp32
    old = run()
    assert len(new) == len(old) > 20
    for a, b in zip(new, old):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_triton_rounding_is_the_gemm_cast_on_gpu():
    """Compiled Triton rounds fp32 -> bf16 to nearest even, as the autocast cast it replaces: bit for bit."""
    x, br, g, sh, sc = (t.detach().cuda() for t in _sit_amp_inputs(4, 256, 1152))
    y = adaln_modulate(x, sh, sc, impl="triton", y_dtype=BF16)
    assert torch.equal(y, adaln_modulate(x, sh, sc, impl="triton").to(BF16))
    y2 = gated_residual_adaln(x, br, g, sh, sc, impl="triton", y_dtype=BF16)[1]
    assert torch.equal(y2, gated_residual_adaln(x, br, g, sh, sc, impl="triton")[1].to(BF16))


# ----------------------------------------------------------------------------------------------------------------
# gated_residual: x + gate * branch
# ----------------------------------------------------------------------------------------------------------------
def _residual(impl):
    return lambda x, br, g: gated_residual(x, br, g, impl=impl)


@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_fp32(shape):
    B, N, D = shape
    ins = [torch.randn(B, N, D) * 2 + 0.5, torch.randn(B, N, D), torch.randn(B, D) * 0.5]
    check_against_fp64(
        _residual("triton"),
        gated_residual_ref,
        [t.requires_grad_() for t in ins],
        ["elementwise"],
        ["elementwise", "elementwise", "reduction"],
    )


def test_gated_residual_mixed_dtypes_as_in_sit_autocast():
    """fp32 x, bf16 branch (fc2 under autocast) and gate: the sum is fp32 (the residual stream), each gradient in
    its input's dtype; the product is taken in fp32 (eager rounds gate * branch to bf16 first)."""
    x, br, g, _, _ = _sit_amp_inputs(2, 5, 768)
    outs, _ = check_against_fp64(
        _residual("triton"),
        gated_residual_ref,
        [x, br, g],
        ["elementwise"],
        ["elementwise", "elementwise", "reduction"],
    )
    assert outs[0].dtype == FP32


def test_gated_residual_bf16_error_at_most_twice_plain_pytorch():
    B, N, D = 2, 9, 1152
    x, br = ((torch.randn(B, N, D) * 4).to(BF16) for _ in range(2))
    g = (torch.randn(B, D) * 2).to(BF16)
    exact = x.double() + g.double()[:, None] * br.double()
    assert_lowp_error(gated_residual(x, br, g, impl="triton"), gated_residual_ref(x, br, g), exact)


def test_gated_residual_small_tiles_many_chunks(monkeypatch):
    """2-row tiles and 4-token chunks: masked tail tiles, several dgate partial-sum chunks, an overhanging chunk."""
    monkeypatch.setattr(adaln, "_launch_config", lambda n_rows, n_tok, D, dev, backward=False: (2, 256, 4, 4))
    ins = [torch.randn(2, 9, 130), torch.randn(2, 9, 130), torch.randn(2, 130)]
    check_against_fp64(
        _residual("triton"),
        gated_residual_ref,
        [t.requires_grad_() for t in ins],
        ["elementwise"],
        ["elementwise", "elementwise", "reduction"],
    )


def test_gated_residual_strided_views_and_expanded_grad():
    """gate is a chunk of the (B, 6D) adaLN output and branch a slice, used without copies; an expanded (stride-0)
    upstream gradient (from .sum()) works."""
    B, N, D = 2, 5, 130
    mod = torch.randn(B, 6 * D, requires_grad=True)
    base = torch.randn(B, N, 2 * D, requires_grad=True)

    def fn(impl):
        g = mod.chunk(6, dim=-1)[5]
        out = gated_residual(base[..., :D], base[..., D:], g, impl=impl)
        return out.sum() + (out * 1.5).square().mean(), out

    (loss_k, out_k), (loss_r, out_r) = fn("triton"), fn("ref")
    assert_close(out_k, out_r)
    grads_k = torch.autograd.grad(loss_k, [mod, base])
    grads_r = torch.autograd.grad(loss_r, [mod, base])
    assert_close(grads_k[0], grads_r[0], "reduction")
    assert_close(grads_k[1], grads_r[1])


def test_gated_residual_dx_is_the_upstream_gradient():
    """dx = d(x_new): the backward passes it on without a pass over it (no kernel writes it)."""
    x, br, g = (leaf(t).requires_grad_() for t in (torch.randn(2, 5, 130), torch.randn(2, 5, 130), torch.randn(2, 130)))
    out = gated_residual(x, br, g, impl="triton")
    up = torch.randn_like(out)
    out.backward(up)
    assert torch.equal(x.grad, up)


def test_gated_residual_ops_pass_opcheck():
    rg = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    for args in [(rg(2, 5, 130), rg(2, 5, 130), rg(2, 130), FP32)]:
        result = torch.library.opcheck(adaln._gated_residual_op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    args = (torch.randn(2, 5, 130), torch.randn(2, 5, 130), torch.randn(2, 130))
    result = torch.library.opcheck(adaln._gated_residual_bwd_op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_gated_residual_bad_inputs_and_logged_choice(monkeypatch, caplog):
    with pytest.raises(ValueError, match="gate must have shape"):
        gated_residual(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 7))
    with pytest.raises(ValueError, match="branch must have shape"):
        gated_residual(torch.randn(2, 4, 8), torch.randn(2, 3, 8), torch.randn(2, 8))
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    with caplog.at_level("INFO", logger="repa_fast.kernels"):
        for _ in range(3):
            gated_residual(torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 8), impl="triton")
    assert [r.getMessage() for r in caplog.records].count("repa_fast.kernels: gated_residual uses triton") == 1


@pytest.mark.gpu
def test_gated_residual_compiled_triton_at_sit_xl_width():
    x, br, g, _, _ = (t.detach().cuda().requires_grad_() for t in _sit_amp_inputs(4, 256, 1152))
    check_against_fp64(
        _residual("triton"),
        gated_residual_ref,
        [x, br, g],
        ["elementwise"],
        ["elementwise", "elementwise", "reduction"],
    )
