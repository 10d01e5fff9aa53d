"""REPA alignment loss: -(1/K) sum_k mean_{b,t} cos(pred_k[b,t], target_k[b,t]).

cos uses F.normalize semantics (x / max(||x||, 1e-12)) on the last dim, computed in fp32.
Shapes: pred_k, target_k (B, T, z_dim_k). Replaces the per-sample loop of the reference ``SILoss``
(loss.py:80-88), which it equals exactly.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def alignment_loss_ref(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], eps: float = 1e-12):
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"alignment loss needs one prediction per target, got {len(preds)} and {len(targets)}")
    total = 0.0
    for p, z in zip(preds, targets):
        if p.shape != z.shape:
            raise ValueError(f"projector output {tuple(p.shape)} does not match target {tuple(z.shape)}")
        p32 = F.normalize(p.float(), dim=-1, eps=eps)
        z32 = F.normalize(z.float(), dim=-1, eps=eps)
        total = total + (p32 * z32).sum(dim=-1).mean()
    return -total / len(preds)


def alignment_loss(preds, targets, eps: float = 1e-12, impl: str = "auto"):
    use_triton("alignment_loss", impl, preds[0])
    return alignment_loss_ref(preds, targets, eps)
