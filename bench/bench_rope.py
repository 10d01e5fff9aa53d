"""2-D RoPE and fused qk-norm (LayerNorm, affine, eps 1e-5) + RoPE on q: ref vs compile(ref) vs triton.

q is (batch, 256, heads, head_dim) at SiT widths. ``python bench/bench_rope.py``: analytic bytes everywhere,
timings and GB/s on a CUDA GPU (bench/_common.py).
"""

import torch
from _common import Case, main
from traffic import SIT_SHAPES, TOKENS

from repa_fast.kernels.rope import apply_rope_2d, apply_rope_2d_ref, qk_norm_rope, qk_norm_rope_ref, rope_2d_cos_sin


def _make(norm: bool):
    def make(model, batch, dtype, device):
        hidden, heads = SIT_SHAPES[model]
        dh = hidden // heads
        x = torch.randn(batch, TOKENS, heads, dh, dtype=dtype, device=device, requires_grad=True)
        grid = int(TOKENS**0.5)
        cos, sin = (t.to(device) for t in rope_2d_cos_sin(dh, grid, grid))
        params = [torch.randn(dh, dtype=dtype, device=device, requires_grad=True) for _ in range(2)] if norm else []
        return [x, *params, cos, sin]

    return make


ROPE = Case(
    "rope_2d", "rope_2d", _make(False), apply_rope_2d_ref, lambda x, c, s: apply_rope_2d(x, c, s, impl="triton")
)
QK_NORM_ROPE = Case(
    "qk_norm_rope",
    "qk_norm_rope",
    _make(True),
    qk_norm_rope_ref,
    lambda x, w, b, c, s: qk_norm_rope(x, w, b, c, s, impl="triton"),
)

if __name__ == "__main__":
    main(ROPE, QK_NORM_ROPE)
