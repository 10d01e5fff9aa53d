"""Fused ops, one module per op: a plain-PyTorch ``<op>_ref`` (spec, fallback, oracle) and a public
``<op>(..., impl=...)`` that runs the Triton kernel when eligible (see ``_dispatch.use_triton``)."""

from .adaln import adaln_modulate, gated_residual_adaln
from .align_loss import alignment_loss
from .attention import attention
from .rope import apply_rope_2d, rope_2d_cos_sin

__all__ = ["adaln_modulate", "gated_residual_adaln", "alignment_loss", "attention", "apply_rope_2d", "rope_2d_cos_sin"]
