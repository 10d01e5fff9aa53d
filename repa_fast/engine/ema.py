"""Exponential moving average of the trainable parameters with one multi-tensor lerp per step.

ema <- ema + (1 - decay) * (param - ema), i.e. the reference's ``ema.mul_(decay).add_(param, alpha=1 - decay)``
(train.py:81-91) as a single ``torch._foreach_lerp_``. Frozen tensors (``pos_embed``) are copied, not averaged, so they
do not drift (the reference's TODO). ``skip`` (a 0-dim bool tensor on device) turns the update into a no-op without a
host synchronisation: the EMA is not updated on steps the optimizer skipped (a reference bug we fix).
"""

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.module.train(False)

    @staticmethod
    def _pairs(ema: nn.Module, model: nn.Module):
        src = dict(model.named_parameters())
        ema_p, model_p = [], []
        for name, p in ema.named_parameters():
            if src[name].requires_grad:
                ema_p.append(p)
                model_p.append(src[name].detach())
        return ema_p, model_p

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, skip: torch.Tensor | None = None) -> None:
        ema_p, model_p = self._pairs(self.module, model)
        if skip is None:
            torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
            return
        weight = torch.where(skip, 0.0, 1.0 - decay).to(ema_p[0].device, torch.float32)
        # The tensor-list overload: a lone tensor weight would be read as a Python scalar (.item(), a host sync).
        torch._foreach_lerp_(ema_p, model_p, [weight] * len(ema_p))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)
