"""Fused ops, one module per op: a plain-PyTorch ``<op>_ref`` (spec, fallback, oracle) and a public
``<op>(..., impl=...)`` that runs the Triton kernel when eligible (see ``_dispatch.use_triton``).

Every Triton launcher is registered with ``torch.library.custom_op`` (+ ``register_fake`` and
``register_autograd``) under the ``repa_fast::`` namespace, so ``torch.compile(fullgraph=True)`` traces
the model code that calls them. Importing this package does not need Triton.
"""

from .adaln import adaln_modulate, gated_residual, gated_residual_adaln
from .align_loss import alignment_loss, cosine_similarity_rows
from .attention import attention, select_backend
from .bias_gelu import bias_gelu, linear_gelu
from .rope import apply_rope_2d, qk_norm_rope, rope_2d_cos_sin

__all__ = [
    "adaln_modulate",
    "gated_residual_adaln",
    "gated_residual",
    "bias_gelu",
    "linear_gelu",
    "alignment_loss",
    "cosine_similarity_rows",
    "attention",
    "select_backend",
    "apply_rope_2d",
    "qk_norm_rope",
    "rope_2d_cos_sin",
]
