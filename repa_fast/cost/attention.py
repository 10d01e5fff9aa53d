"""Attention kernels: what each backend computes at a given head dim and sequence length, and the bytes it moves.

Head-dim padding (the FLOPs a kernel really computes at SiT-XL's head dim 72):
- FlashAttention-2 (``flash2``, and PyTorch's SDPA flash path, ``sdpa-flash``, which vendors FA2): the head dim is
  rounded up to a multiple of 32 and dispatched to the 96-wide kernel (Dao-AILab/flash-attention
  csrc/flash_attn/flash_api.cpp ``round_multiple(head_size, 32)``; csrc/flash_attn/src/static_switch.h
  ``HEADDIM_SWITCH``: 32, 64, 96, 128, ...). 72 -> 96: 1.33x the FLOPs. It is not padded to 128. Its forward
  tile for d=96 is 128 x 64 (csrc/flash_attn/src/flash_fwd_launch_template.h ``run_mha_fwd_hdim96``), which 256
  tokens fill exactly.
- FlashAttention-3 (``flash3``, Hopper): 72 runs the d<=96 kernel with a 192 x 144 forward tile (hopper/tile_size.h
  ``tile_size_fwd_sm90``); 256 tokens take two 192-row tiles (384 rows computed) and two 144-column tiles (288):
  1.33 (head dim) x 1.5 x 1.125 of the useful FLOPs in the forward. Its backward tile for d=96 is 64 x 128
  (hopper/flash_bwd_launch_template.h ``run_mha_bwd_hdim96``): no sequence waste, the head-dim padding only.
  Early FA3 releases had only 64/128/256 kernels (hopper/static_switch.h ``HEADDIM_SWITCH``): 72 -> 128.
- cuDNN fused attention (``cudnn``, SDPA's cuDNN backend): any head dim that is a multiple of 8 up to 128 runs
  unpadded (cuDNN's fused flash attention support table); no padding is charged.
- ``math``: explicit scores, softmax and values (timm/DINOv2 without a fused kernel): unpadded matmuls, but the
  (B, H, T, T) scores are written and read back, in fp32 around the softmax under CUDA autocast (softmax is in
  autocast's fp32 list).
The backward of a flash kernel recomputes the scores: 5 matmuls against the forward's 2 (FlashAttention-2 paper,
Dao 2023, Sec. 3.1), so hardware FLOPs are 3.5x the forward's for a forward + backward.
"""

import math

FA2_HEADDIMS = (32, 64, 96, 128, 160, 192, 256)
FA3_HEADDIMS = (64, 96, 128, 192, 256)
FA3_FWD_TILE = {64: (192, 192), 96: (192, 144), 128: (128, 176), 192: (128, 128), 256: (128, 80)}


def _round_up(x: int, choices) -> int:
    return next(c for c in choices if c >= x)


def padding_factor(backend: str, head_dim: int, tokens: int, backward: bool = False) -> float:
    """Computed FLOPs / useful FLOPs of one attention forward or backward (see the module docstring)."""
    if backend in ("flash2", "sdpa-flash"):
        return _round_up(head_dim, FA2_HEADDIMS) / head_dim
    if backend == "flash3":
        d = _round_up(head_dim, FA3_HEADDIMS)
        if backward:
            return d / head_dim
        bm, bn = FA3_FWD_TILE[d]
        rows, cols = math.ceil(tokens / bm) * bm, math.ceil(tokens / bn) * bn
        return d / head_dim * rows / tokens * cols / tokens
    return 1.0


def attention_flops(tokens: int, dim: int, batch: float, forward_only: bool = False) -> float:
    """Useful FLOPs (4 T^2 D per image forward; x3.5 with the recomputing backward)."""
    fwd = 4.0 * tokens * tokens * dim * batch
    return fwd if forward_only else 3.5 * fwd
