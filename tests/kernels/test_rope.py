"""2-D RoPE and the fused qk-norm + RoPE kernel vs the float64 reference (q as a strided view of the qkv GEMM)."""

import math

import pytest
import torch

from repa_fast.kernels import rope
from repa_fast.kernels.rope import apply_rope_2d, qk_norm_rope, qk_norm_rope_ref, rope_2d_cos_sin
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64


def _qkv_view(B, grid, H, Dh, dtype=torch.float32):
    """q as SiT takes it: (B, N, 3, H, Dh) qkv output, q = [:, :, 0] (strides (N*3*H*Dh, 3*H*Dh, Dh, 1))."""
    qkv = torch.randn(B, grid * grid, 3, H, Dh, dtype=dtype) * 1.5 + 0.3
    return qkv.requires_grad_()


def test_tables_follow_eva02_axial_layout():
    """Token (r, c): channel pair i < Dh/4 rotates by r * theta^(-4i/Dh), pair i >= Dh/4 by c * (same frequency)."""
    dh, gh, gw = 72, 3, 5
    cos, sin = rope_2d_cos_sin(dh, gh, gw)
    assert cos.shape == (gh * gw, dh) and cos.dtype == torch.float32
    for r, c, ch in [(2, 4, 0), (2, 4, 7), (1, 3, 40), (2, 1, 71)]:
        pair = (ch % (dh // 2)) // 2
        pos = r if ch < dh // 2 else c
        ang = pos * 10000.0 ** (-2 * pair / (dh // 2))
        assert_close(cos[r * gw + c, ch], torch.tensor(math.cos(ang)))
        assert_close(sin[r * gw + c, ch], torch.tensor(math.sin(ang)))


@pytest.mark.parametrize("B,grid,H,Dh", [(2, 4, 3, 72), (1, 3, 2, 64), (2, 2, 5, 12)])
def test_rope_fp32(B, grid, H, Dh):
    qkv = _qkv_view(B, grid, H, Dh)
    cos, sin = rope_2d_cos_sin(Dh, grid, grid)
    check_against_fp64(
        lambda t: apply_rope_2d(t[:, :, 0], cos, sin, impl="triton"),
        lambda t: rope.apply_rope_2d_ref(t[:, :, 0], cos.double(), sin.double()),
        [qkv],
        ["elementwise"],
        ["elementwise"],
    )


def test_rope_is_a_rotation():
    x = torch.randn(2, 16, 3, 72)
    cos, sin = rope_2d_cos_sin(72, 4, 4)
    y = apply_rope_2d(x, cos, sin, impl="triton")
    assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1).double())
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_rope", [True, False])
def test_qk_norm_rope_fp32(norm, with_rope):
    B, grid, H, Dh = 2, 4, 3, 72
    qkv = _qkv_view(B, grid, H, Dh)
    w = (1 + 0.3 * torch.randn(Dh)).requires_grad_()
    b = (0.2 * torch.randn(Dh)).requires_grad_()
    cos, sin = rope_2d_cos_sin(Dh, grid, grid) if with_rope else (None, None)
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    check_against_fp64(
        lambda t, w, b: qk_norm_rope(t[:, :, 1], w, b, cos, sin, norm=norm, impl="triton"),
        lambda t, w, b: qk_norm_rope_ref(t[:, :, 1], w, b, dbl(cos), dbl(sin), norm=norm),
        [qkv, w, b],
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )


def test_qk_norm_equals_nn_layernorm_module():
    """The reference qk_norm is nn.LayerNorm(head_dim) (affine, eps 1e-5) applied per head."""
    ln = torch.nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.2)
        ln.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 9, 4, 64)
    assert_close(qk_norm_rope(x, ln.weight, ln.bias, eps=ln.eps, impl="triton"), ln.double()(x.double()).detach())


@pytest.mark.parametrize("norm", [None, "layer"])
def test_bf16(norm):
    B, grid, H, Dh = 2, 3, 2, 64
    qkv = _qkv_view(B, grid, H, Dh, torch.bfloat16)
    w = (1 + 0.3 * torch.randn(Dh)).to(torch.bfloat16).requires_grad_()
    b = (0.2 * torch.randn(Dh)).to(torch.bfloat16).requires_grad_()
    cos, sin = rope_2d_cos_sin(Dh, grid, grid)
    if norm is None:
        check_against_fp64(
            lambda t: apply_rope_2d(t[:, :, 0], cos, sin, impl="triton"),
            lambda t: rope.apply_rope_2d_ref(t[:, :, 0], cos.double(), sin.double()),
            [qkv],
            ["elementwise"],
            ["elementwise"],
        )
    else:
        check_against_fp64(
            lambda t, w, b: qk_norm_rope(t[:, :, 0], w, b, cos, sin, impl="triton"),
            lambda t, w, b: qk_norm_rope_ref(t[:, :, 0], w, b, cos.double(), sin.double()),
            [qkv, w, b],
            ["elementwise"],
            ["elementwise", "reduction", "reduction"],
        )


def test_small_tiles_many_programs(monkeypatch):
    """4-row tiles, 8 rows per backward program: masked tails and several dweight/dbias partial sums."""
    monkeypatch.setattr(rope, "_launch_config", lambda n_rows, Dh, dev: (4, 128, 8, 4))  # BLOCK_D >= Dh
    qkv = _qkv_view(1, 3, 3, 72)  # 27 rows
    w, b = (1 + 0.3 * torch.randn(72)).requires_grad_(), (0.2 * torch.randn(72)).requires_grad_()
    cos, sin = rope_2d_cos_sin(72, 3, 3)
    check_against_fp64(
        lambda t, w, b: qk_norm_rope(t[:, :, 2], w, b, cos, sin, impl="triton"),
        lambda t, w, b: qk_norm_rope_ref(t[:, :, 2], w, b, cos.double(), sin.double()),
        [qkv, w, b],
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )


def test_bad_inputs_raise_clear_errors():
    cos, sin = rope_2d_cos_sin(8, 2, 2)
    with pytest.raises(ValueError, match="table must be"):
        apply_rope_2d(torch.randn(1, 9, 2, 8), cos, sin)
    with pytest.raises(ValueError, match="even Dh"):
        qk_norm_rope(torch.randn(1, 4, 2, 7))
    with pytest.raises(ValueError, match="both the cos and the sin"):
        qk_norm_rope(torch.randn(1, 4, 2, 8), cos=cos)
    with pytest.raises(ValueError, match="norm=None"):
        qk_norm_rope(torch.randn(1, 4, 2, 8), torch.ones(8), norm=None)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_cos_sin(6, 2, 2)
