"""The Backend interface, and the single-process backend that implements it (its collectives are no-ops).

A backend applies the parallelism from outside the single-device model and owns the calls the training loop makes:
wrap, make_ema, no_sync, backward, clip_and_step, update_ema, ema_module, full_state_dict, full_ema_state_dict,
optimizer_state_dict, load_*_state_dict, all_reduce_mean, gather_objects, broadcast_object, barrier, peer_failure,
shutdown. The multi-process backends derive from ``process_group.DistributedBackend``; this module imports none of
them (``repa_fast.engine.parallel.make_backend`` picks one).
"""

import contextlib
import os

import torch
import torch.nn as nn

from repa_fast.engine.ema import EMA


def env_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun, the deepspeed launcher and a manual launch all set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Backend:
    """One process (also the base class: collectives degrade to no-ops)."""

    name = "none"
    torch_grad_scaler = True  # fp16 loss scaling via torch.amp.GradScaler; DeepSpeed scales losses itself

    def __init__(self, device: str = "auto"):
        self.rank, self.world_size, self.local_rank = env_world()
        self.device = pick_device(device, self.local_rank)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model and optimizer -------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Apply the parallelism; returns the module to call for training. ``self.optimizer`` is the optimizer to
        use from now on (a sharding backend may rebuild it over its new parameters)."""
        self.optimizer = optimizer
        return model

    def make_ema(self, model: nn.Module):
        """The EMA, created after ``wrap`` (so it starts from the synchronised, possibly sharded, weights)."""
        return EMA(model)

    def no_sync(self, train_model: nn.Module, last_micro_step: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def clip_and_step(self, model: nn.Module, max_norm: float, scaler=None):
        """Unscale, clip and step without a host sync. Returns (grad_norm, skipped) as device tensors.

        A non-finite gradient norm (NaN/inf loss or overflow) skips the update through the fused optimizer's
        ``found_inf`` input, exactly as GradScaler does for fp16: no parameter, moment or step-count change.
        """
        opt = self.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = self._clip(params, max_norm)
        bad = ~torch.isfinite(grad_norm)
        if scaler is not None:
            # GradScaler's per-device overflow flags (private but stable since 1.6); read before update() resets them.
            found = sum(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            scaler.step(opt)
            scaler.update()
            skipped = bad | (found > 0)
        else:
            opt.found_inf, opt.grad_scale = bad.float(), None
            opt.step()
            del opt.found_inf, opt.grad_scale
            skipped = bad
        opt.zero_grad(set_to_none=True)
        return grad_norm.detach(), skipped

    def _clip(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def update_ema(self, ema, model: nn.Module, decay: float, skipped: torch.Tensor) -> None:
        ema.update(model, decay, skip=skipped)

    def ema_module(self, ema) -> nn.Module | None:
        """A full EMA module for previews on the main process (None elsewhere). Collective for sharded EMAs."""
        return ema.full_module(self.device, self.is_main)

    # -- state -----------------------------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict:
        """The full (unsharded) model state dict; meaningful on rank 0. Collective on sharding backends."""
        return {k: v.detach() for k, v in model.state_dict().items()}

    def full_ema_state_dict(self, ema) -> dict:
        return ema.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        """Called BEFORE ``wrap`` on every backend: the plain model takes the full fp32 weights, then the backend
        broadcasts, shards or partitions them as it does for fresh weights."""
        model.load_state_dict(state, strict=True)

    def load_ema_state_dict(self, ema, state: dict) -> None:
        ema.load_state_dict(state)

    def optimizer_state_dict(self, model: nn.Module) -> dict:
        """Portable optimizer state: per-parameter entries keyed by parameter NAME (not index)."""
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: {k: v.detach().cpu() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        return {"state": state, "param_groups": param_group_settings(self.optimizer)}

    def load_optimizer_state_dict(self, model: nn.Module, saved: dict) -> None:
        params = check_optimizer_names(model, saved)
        for name, s in saved["state"].items():
            p = params[name]
            # Own copies: fused AdamW increments "step" in place (on device), and a checkpoint may share one tensor
            # between parameters (torch.save keeps aliasing).
            self.optimizer.state[p] = {k: v.to(p.device, copy=True) for k, v in s.items()}
        load_param_group_settings(self.optimizer, saved)

    # -- collectives -------------------------------------------------------------------------------------------------
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_objects(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def peer_failure(self, exc: BaseException, last_checkpoint: str | None = None) -> Exception | None:
        """A PeerFailure describing ``exc`` when it means another process died or hung; None otherwise."""
        return None

    def shutdown(self, clean: bool = True) -> None:
        pass


def param_group_settings(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_param_group_settings(optimizer, saved: dict) -> None:
    for group, sg in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in sg.items() if k in group and k != "params"})


def check_optimizer_names(model: nn.Module, saved: dict) -> dict:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved["state"]]
    if saved["state"] and missing:
        raise RuntimeError(
            f"optimizer state has no entry for {missing[:3]}...; was the checkpoint made with "
            "another model configuration?"
        )
    unknown = [n for n in saved["state"] if n not in params]
    if unknown:
        raise RuntimeError(f"optimizer state names parameters this model does not have: {unknown[:3]}...")
    return params
