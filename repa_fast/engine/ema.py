"""Exponential moving average of the trainable parameters, one multi-tensor pass per step.

ema <- ema + (1 - decay) * (param - ema), i.e. the reference's ``ema.mul_(decay).add_(param, alpha=1 - decay)``
(train.py:81-91) without its Python loop over parameters (``repa_fast.kernels.ema_update``: 2 reads + 1 write per
element, bit for bit the three-pass form it replaced; its docstring gives the rounding). Frozen tensors
(``pos_embed``) are left as initialised (equal to the model's), so they do not drift (the reference's TODO).
``skip`` (a 0-dim bool tensor on device) turns the update into a no-op without a host synchronisation: the EMA is
not updated on steps the optimizer skipped (a reference bug we fix).

Two forms with one interface (``update``, ``state_dict``, ``load_state_dict``, ``full_module``): ``EMA``, a full copy of
the model (one process), and ``ShardedEMA``, this rank's shards of it: next to the parameter shards (FSDP2, ZeRO-3),
or a 1/world slice of every replicated parameter (DDP, ZeRO-1/2: ``engine/parallel/slices.py``), so each rank
updates 1/world of the EMA per step. ``FullReplica`` rebuilds a full module from gathered shards.
"""

import copy
from typing import Callable

import torch
import torch.nn as nn

# The update itself: one multi-tensor pass (Triton on CUDA) or the three-pass reference (CPU); _CHUNK is the
# reference's bound on its temporary.
from repa_fast.kernels.ema_update import _CHUNK, ema_update_  # noqa: F401


class EMA:
    """A full EMA copy of the model (one process; DDP and ZeRO-1/2 on one process)."""

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

    def full_module(self, device: torch.device, is_main: bool) -> nn.Module:
        """The full EMA module (every process holds it)."""
        return self.module


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class FullReplica:
    """What a sharding backend needs to rebuild a full, unsharded module on one rank, without holding its weights:
    a skeleton on the meta device plus copies of the tensors that never train (frozen params such as ``pos_embed``,
    buffers). Taken before the backend shards the model; costs one copy of the frozen tensors."""

    def __init__(self, model: nn.Module):
        self.trainable = _trainable_names(model)
        keep = set(self.trainable)
        self.fixed = {
            n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in keep
        }
        self.keys = list(model.state_dict())
        memo = {}  # deepcopy the structure, but map every tensor to an empty meta tensor (no memory)
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        self.skeleton = copy.deepcopy(model, memo)

    def state_dict(self, trainable_sd: dict) -> dict:
        """A full state dict (the model's key order) from the full trainable tensors and the fixed ones."""
        return {k: trainable_sd[k] if k in trainable_sd else self.fixed[k] for k in self.keys}

    def materialize(self, trainable_sd: dict, device: torch.device) -> nn.Module:
        module = copy.deepcopy(self.skeleton).to_empty(device=device)
        with torch.no_grad():
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                t.copy_(trainable_sd[name] if name in trainable_sd else self.fixed[name])
        return module.eval().requires_grad_(False)


class ShardedEMA:
    """EMA of the FULL trainable parameters, stored as this rank's shards next to the parameter shards.

    The EMA is elementwise, so averaging each shard is averaging the full tensor: ema_shard <- ema_shard +
    (1 - decay) (param_shard - ema_shard), with ``ema_update_``'s one multi-tensor pass and no communication; the
    result is bit for bit the full EMA's (the same rounding per element, whatever the slicing). Full tensors are
    assembled only to save or preview (``gather``); a checkpoint's full EMA is cut back into shards on load
    (``local_slice``).
    ``local_views()`` returns the current fp32 shards of the trainable parameters, in ``names`` order.
    """

    def __init__(
        self,
        names: list[str],
        local_views: Callable[[], list[torch.Tensor]],
        gather: Callable[[str, torch.Tensor], torch.Tensor],
        local_slice: Callable[[str, torch.Tensor], torch.Tensor],
        replica: FullReplica,
    ):
        self.names, self._views, self.replica = names, local_views, replica
        self._gather, self._slice = gather, local_slice
        self.shadow = [v.detach().float().clone() for v in local_views()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float, skip: torch.Tensor | None = None) -> None:
        ema_update_(self.shadow, [v.float() for v in self._views()], decay, skip)  # same device-side skip as EMA

    def full_trainable(self) -> dict:
        """Collective: every rank calls it; the full tensors are meaningful where the backend gathers (rank 0)."""
        return {n: self._gather(n, s) for n, s in zip(self.names, self.shadow)}

    def state_dict(self) -> dict:
        return self.replica.state_dict(self.full_trainable())

    def load_state_dict(self, state: dict) -> None:
        """Strict, as ``EMA``'s: every key of the model's state dict; the fixed tensors (frozen parameters, persistent
        buffers) are taken from it too."""
        missing = [n for n in self.replica.keys if n not in state]
        unexpected = [n for n in state if n not in self.replica.keys]
        if missing or unexpected:
            raise RuntimeError(f"EMA state: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(self._slice(n, state[n].to(s.device, torch.float32)))
            for n, t in self.replica.fixed.items():
                if n in state:  # non-persistent buffers (RoPE tables) are in no state dict
                    t.copy_(state[n])

    def full_module(self, device: torch.device, is_main: bool) -> nn.Module | None:
        """Collective: the full EMA module rebuilt on the main process from the gathered shards; None elsewhere."""
        full = self.full_trainable()
        return self.replica.materialize(full, device) if is_main else None
