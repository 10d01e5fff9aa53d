"""The fused ops on the REPA family's layouts, in Triton's interpreter against the float64 references: REG's T + 1
tokens (257 at 256 px: odd, not a multiple of any tile) for adaLN, the RoPE tables with REG's unrotated class token,
the alignment loss over T + 1 tokens and over the output of iREPA's conv projector (docs/methods.md §Fast path)."""

import pytest
import torch

from repa_fast.kernels import alignment_loss, apply_rope_2d, qk_norm_rope, rope
from repa_fast.kernels.adaln import adaln_modulate, gated_residual_adaln
from repa_fast.kernels.rope import qk_norm_rope_ref, rope_2d_cos_sin
from repa_fast.models.projectors import ProjectionLayer
from repa_fast.models.sit import SiT
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64

REG_TOKENS = [(2, 257, 130), (1, 17, 768)]  # 16x16 + 1 (SiT-*/2 at 256 px with REG), 4x4 + 1


def _inputs(B, N, D, gated):
    x = (torch.randn(B, N, D) * 2 + 0.5).requires_grad_()
    mods = [(torch.randn(B, D) * 0.5).requires_grad_() for _ in range(3 if gated else 2)]
    branch = [torch.randn(B, N, D, requires_grad=True)] if gated else []
    return [x] + branch + mods


@pytest.mark.parametrize("shape", REG_TOKENS)
def test_adaln_ops_on_reg_token_counts(shape):
    check_against_fp64(
        lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="triton"),
        lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="ref"),
        _inputs(*shape, gated=False),
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )
    check_against_fp64(
        lambda x, br, g, sh, sc: gated_residual_adaln(x, br, g, sh, sc, impl="triton"),
        lambda x, br, g, sh, sc: gated_residual_adaln(x, br, g, sh, sc, impl="ref"),
        _inputs(*shape, gated=True),
        ["elementwise"] * 2,
        ["elementwise", "elementwise", "reduction", "reduction", "reduction"],
    )


def _reg_rope_tables(head_dim, grid):
    """The table a REG SiT with RoPE builds: an identity row (cos 1, sin 0) for the class token, then the grid's."""
    model = SiT(input_size=2 * grid, patch_size=2, hidden_size=3 * head_dim, depth=1, num_heads=3, z_dims=[8],
                encoder_depth=1, reg=True, use_rope=True)  # fmt: skip
    return model.rope_cos, model.rope_sin


@pytest.mark.parametrize("norm", [None, "layer"])
def test_rope_with_an_unrotated_class_token(norm):
    """q of shape (B, 1 + g*g, H, Dh) as a strided view of the qkv GEMM: the kernel equals the float64 reference, the
    class token comes out as norm(q_0) (unrotated, as SpeedrunDiT models/pos_embed.py:123-160 leaves leading CLS
    tokens) and the patch tokens as the plain grid RoPE."""
    B, grid, H, Dh = 2, 16, 3, 16
    cos, sin = _reg_rope_tables(Dh, grid)
    assert (
        cos.shape == (1 + grid * grid, Dh)
        and torch.equal(cos[0], torch.ones(Dh))
        and torch.equal(sin[0], torch.zeros(Dh))
    )
    qkv = (torch.randn(B, 1 + grid * grid, 3, H, Dh) * 1.5 + 0.3).requires_grad_()
    w, b = (1 + 0.3 * torch.randn(Dh)).requires_grad_(), (0.2 * torch.randn(Dh)).requires_grad_()
    if norm is None:
        fn_k = lambda t: apply_rope_2d(t[:, :, 0], cos, sin, impl="triton")  # noqa: E731
        fn_r = lambda t: rope.apply_rope_2d_ref(t[:, :, 0], cos.double(), sin.double())  # noqa: E731
        (out,), _ = check_against_fp64(fn_k, fn_r, [qkv], ["elementwise"], ["elementwise"])
        normed = qkv[:, :, 0].detach().double()
    else:
        fn_k = lambda t, w, b: qk_norm_rope(t[:, :, 0], w, b, cos, sin, impl="triton")  # noqa: E731
        fn_r = lambda t, w, b: qk_norm_rope_ref(t[:, :, 0], w, b, cos.double(), sin.double())  # noqa: E731
        kinds = ["elementwise", "reduction", "reduction"]
        (out,), _ = check_against_fp64(fn_k, fn_r, [qkv, w, b], ["elementwise"], kinds)
        normed = qk_norm_rope_ref(qkv[:, :, 0].detach().double(), w.detach().double(), b.detach().double())
    assert_close(out[:, :1], normed[:, :1])  # the class token: not rotated
    g_cos, g_sin = rope_2d_cos_sin(Dh, grid, grid)
    assert_close(out[:, 1:], rope.apply_rope_2d_ref(normed[:, 1:], g_cos.double(), g_sin.double()))


def test_alignment_loss_over_reg_tokens():
    preds = [torch.randn(2, 257, 130, requires_grad=True), torch.randn(2, 257, 64, requires_grad=True)]
    targets = [torch.randn(2, 257, 130), torch.randn(2, 257, 64)]
    check_against_fp64(
        lambda p1, p2, z1, z2: alignment_loss([p1, p2], [z1, z2], impl="triton"),
        lambda p1, p2, z1, z2: alignment_loss([p1, p2], [z1, z2], impl="ref"),
        preds + targets,
        ["reduction"],
        ["elementwise", "elementwise"],
    )


@pytest.mark.parametrize("transposed_stream", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_alignment_loss_through_the_conv_projector(k, transposed_stream):
    """iREPA's conv projector feeds the fused loss its (B, T, z) rows (channels-last conv output, permuted): the
    loss and the gradients of the hidden states and of the conv weight and bias equal the float64 reference. With
    ``transposed_stream`` the hidden states have the (T*D, 1, T) strides of the patch embedding's transpose."""
    B, g, D, Z = 2, 16, 40, 24
    proj = ProjectionLayer("conv", D, Z, kernel_size=k)
    h = torch.randn(B, D, g * g).transpose(1, 2) if transposed_stream else torch.randn(B, g * g, D)
    h = h.requires_grad_()
    z = torch.randn(B, g * g, Z)

    def run(impl, dtype):
        p64 = ProjectionLayer("conv", D, Z, kernel_size=k).to(dtype)
        p64.load_state_dict(proj.state_dict())
        hh = h.detach().to(dtype).requires_grad_()
        loss = alignment_loss([p64(hh, g)], [z.to(dtype)], impl=impl)
        grads = torch.autograd.grad(loss, [hh, *p64.parameters()])
        return loss, grads

    loss_t, grads_t = run("triton", torch.float32)
    loss_r, grads_r = run("ref", torch.float64)
    assert_close(loss_t, loss_r, "reduction")
    for a, e in zip(grads_t, grads_r):
        assert a.abs().max() > 0
        assert_close(a, e, "reduction")
