"""adaLN modulation: y = LayerNorm(x) * (1 + scale) + shift (no affine, eps 1e-6).

Shapes: x (B, N, D); shift, scale, gate (B, D), broadcast over the N tokens.
Replaces ``modulate(self.norm1(x), shift, scale)`` of DiT/SiT, and the fused
"gated residual + next modulation" ``x = x + gate * branch; y = modulate(norm2(x), shift, scale)``.
"""

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_adaln_ref(x, branch, gate, shift, scale, eps: float = 1e-6):
    """Returns (x + gate * branch, LN(x + gate * branch) * (1 + scale) + shift)."""
    x_new = x + gate.unsqueeze(1) * branch
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps)


def adaln_modulate(x, shift, scale, eps: float = 1e-6, impl: str = "auto"):
    use_triton("adaln_modulate", impl, x)
    return adaln_modulate_ref(x, shift, scale, eps)


def gated_residual_adaln(x, branch, gate, shift, scale, eps: float = 1e-6, impl: str = "auto"):
    use_triton("gated_residual_adaln", impl, x)
    return gated_residual_adaln_ref(x, branch, gate, shift, scale, eps)
