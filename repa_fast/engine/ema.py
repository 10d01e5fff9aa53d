"""Exponential moving average of the trainable parameters with multi-tensor (foreach) kernels.

ema <- ema + (1 - decay) * (param - ema), i.e. the reference's ``ema.mul_(decay).add_(param, alpha=1 - decay)``
(train.py:81-91) without its Python loop over parameters. Frozen tensors (``pos_embed``) are left as initialised
(equal to the model's), so they do not drift (the reference's TODO). ``skip`` (a 0-dim bool tensor on device) turns
the update into a no-op without a host synchronisation: the EMA is not updated on steps the optimizer skipped (a
reference bug we fix).
"""

import copy

import torch
import torch.nn as nn

# Tensors per multi-tensor launch when the skip flag is a device tensor: bounds the temporary (param - ema) copy.
_CHUNK = 64


@torch.no_grad()
def ema_update_(
    ema: list[torch.Tensor], params: list[torch.Tensor], decay: float, skip: torch.Tensor | None = None
) -> None:
    """ema <- ema + w (param - ema), w = 1 - decay, or w = 0 where ``skip`` (a device bool) is set; no host sync.

    With a device-side weight, ``_foreach_lerp_`` would read it as a Python scalar (``.item()``: a sync) or, given a
    list of 0-dim weights, fall off the fused multi-tensor path; sub / mul-by-tensor / add stay fused and sync-free.
    """
    if not ema:
        return
    if skip is None:
        torch._foreach_lerp_(ema, params, 1.0 - decay)
        return
    weight = torch.where(skip.to(ema[0].device), 0.0, 1.0 - decay).to(torch.float32)  # 0-dim, on device
    for i in range(0, len(ema), _CHUNK):
        e, p = ema[i : i + _CHUNK], params[i : i + _CHUNK]
        delta = torch._foreach_sub(p, e)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(e, delta)


class EMA:
    """A full EMA copy of the model (one process, DDP, ZeRO-1/2)."""

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._cache = None

    def _pairs(self, model: nn.Module):
        """(ema params, model params) of the trainable tensors, built once per source model."""
        if self._cache is None or self._cache[0] is not model:
            src = dict(model.named_parameters())
            names = [n for n, _ in self.module.named_parameters() if src[n].requires_grad]
            ema_p = dict(self.module.named_parameters())
            self._cache = (model, [ema_p[n] for n in names], [src[n].detach() for n in names])
        return self._cache[1], self._cache[2]

    def update(self, model: nn.Module, decay: float, skip: torch.Tensor | None = None) -> None:
        ema_p, model_p = self._pairs(model)
        ema_update_(ema_p, model_p, decay, skip)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)
