"""2-D axial RoPE (EVA-02 layout, SPEC section 9) on q or k of shape (B, N, H, Dh).

The first Dh/2 channels rotate with the token's row index, the last Dh/2 with its column index;
rotation pairs are adjacent channels (2i, 2i+1): out = x * cos + rotate_half(x) * sin with
rotate_half(x)[2i] = -x[2i+1], rotate_half(x)[2i+1] = x[2i].
"""

import torch

from ._dispatch import use_triton


def rope_2d_cos_sin(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0, device=None):
    """cos, sin tables of shape (grid_h * grid_w, head_dim), fp32, tokens in row-major order."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # channels per axis
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64, device=device)[: half // 2] / half)
    freqs = freqs.repeat_interleave(2)  # (half,), pairs share a frequency
    rows = torch.arange(grid_h, dtype=torch.float64, device=device)[:, None] * freqs  # (H, half)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device)[:, None] * freqs  # (W, half)
    ang = torch.cat(
        [rows[:, None, :].expand(grid_h, grid_w, half), cols[None, :, :].expand(grid_h, grid_w, half)], dim=-1
    ).reshape(grid_h * grid_w, head_dim)
    return ang.cos().float(), ang.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope_2d_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, Dh), broadcast over heads
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


def apply_rope_2d(x, cos, sin, impl: str = "auto"):
    use_triton("rope_2d", impl, x)
    return apply_rope_2d_ref(x, cos, sin)
