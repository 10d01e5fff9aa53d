"""On a CUDA GPU (compiled Triton, not the interpreter): every op at SiT-XL/2 widths vs float64, "auto" picks
Triton, and a SiT block compiled with Inductor equals eager. Skipped without CUDA (marker ``gpu``)."""

import pytest
import torch

from repa_fast.kernels import _dispatch
from repa_fast.kernels.adaln import adaln_modulate, gated_residual_adaln
from repa_fast.kernels.align_loss import alignment_loss
from repa_fast.kernels.rope import qk_norm_rope, rope_2d_cos_sin
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def test_auto_picks_triton_on_cuda():
    assert _dispatch.use_triton("op", "auto", torch.zeros(1, device="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_ops_at_sit_xl_width(dtype):
    B, N, D = 4, 256, 1152
    x, br = _rand(B, N, D, dtype=dtype, scale=2.0), _rand(B, N, D, dtype=dtype)
    g, sh, sc = (_rand(B, D, dtype=dtype, scale=0.5) for _ in range(3))
    check_against_fp64(
        lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="triton"),
        lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="ref"),
        [x, sh, sc],
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )
    if dtype == torch.float32:  # bf16: x_new is rounded before the norm, see test_adaln.test_bf16
        check_against_fp64(
            lambda *t: gated_residual_adaln(*t, impl="triton"),
            lambda *t: gated_residual_adaln(*t, impl="ref"),
            [x, br, g, sh, sc],
            ["elementwise"] * 2,
            ["elementwise"] * 2 + ["reduction"] * 3,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_loss_at_dinov2_width(dtype):
    p, z = _rand(8, 256, 768, dtype=dtype), torch.randn(8, 256, 768, device="cuda").to(dtype)
    check_against_fp64(
        lambda p, z: alignment_loss([p], [z], impl="triton"),
        lambda p, z: alignment_loss([p], [z], impl="ref"),
        [p, z],
        ["reduction"],
        ["elementwise"],
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_at_sit_xl_heads(dtype):
    qkv = _rand(4, 256, 3, 16, 72, dtype=dtype)
    w, b = _rand(72, dtype=dtype, scale=0.3), _rand(72, dtype=dtype, scale=0.3)
    cos, sin = (t.cuda() for t in rope_2d_cos_sin(72, 16, 16))
    check_against_fp64(
        lambda t, w, b: qk_norm_rope(t[:, :, 0], w, b, cos, sin, impl="triton"),
        lambda t, w, b: qk_norm_rope(t[:, :, 0], w, b, cos.double(), sin.double(), impl="ref"),
        [qkv, w, b],
        ["elementwise"],
        ["elementwise", "reduction", "reduction"],
    )


def test_inductor_compiled_block_equals_eager():
    from repa_fast.models.sit import SiTBlock

    block = SiTBlock(1152, 16, qk_norm=True, impl="triton").cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x, c = torch.randn(4, 256, 1152, device="cuda"), torch.randn(4, 1152, device="cuda")
    rope = tuple(t.cuda() for t in rope_2d_cos_sin(72, 16, 16))
    eager = block(x, c, rope)
    compiled = torch.compile(block, fullgraph=True)(x, c, rope)
    assert_close(compiled, eager, "reduction")
