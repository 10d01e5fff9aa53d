"""Process backends behind one interface; the model code stays single-device.

``make_backend(kind)`` reads the torchrun / deepspeed launcher environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Kinds: "none" (one process), "ddp" (torch DistributedDataParallel); "auto" picks ddp when
WORLD_SIZE > 1. Every backend exposes the same calls the training loop makes: wrap, no_sync, clip_and_step,
full_state_dict, optimizer_state_dict / load_optimizer_state_dict, all_reduce_mean, gather_objects, barrier, shutdown.
"""

import contextlib
import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger("repa_fast")

# A rank that died leaves the others waiting in a collective; they give up after this long (bounded, no hang).
DEFAULT_TIMEOUT_S = int(os.environ.get("REPA_FAST_DIST_TIMEOUT", "60"))


def env_world() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class Backend:
    """One process (also the base class: collectives degrade to no-ops)."""

    name = "none"

    def __init__(self, device: str = "auto"):
        self.rank, self.world_size, self.local_rank = env_world()
        self.device = pick_device(device, self.local_rank)
        self.optimizer: Optional[torch.optim.Optimizer] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model and optimizer -------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.optimizer = optimizer
        return model

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
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
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

    def update_ema(self, ema, model: nn.Module, decay: float, skipped: torch.Tensor) -> None:
        ema.update(model, decay, skip=skipped)

    # -- state -----------------------------------------------------------------------------------------------------
    def full_state_dict(self, model: nn.Module) -> dict:
        """The full (unsharded) model state dict; meaningful on rank 0."""
        return {k: v.detach() for k, v in model.state_dict().items()}

    def full_ema_state_dict(self, ema) -> dict:
        return ema.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state, strict=True)

    def load_ema_state_dict(self, ema, state: dict) -> None:
        ema.load_state_dict(state)

    def optimizer_state_dict(self, model: nn.Module) -> dict:
        """Portable optimizer state: per-parameter entries keyed by parameter NAME (not index)."""
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: {k: v.detach().cpu() for k, v in s.items()} for p, s in self.optimizer.state.items()}
        return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                 for g in self.optimizer.param_groups]}

    def load_optimizer_state_dict(self, model: nn.Module, saved: dict) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in saved["state"]]
        if saved["state"] and missing:
            raise RuntimeError(f"optimizer state has no entry for {missing[:3]}...; was the checkpoint made with "
                               "another model configuration?")
        for name, s in saved["state"].items():
            p = params[name]
            self.optimizer.state[p] = {k: v.to(p.device) for k, v in s.items()}  # fused AdamW keeps "step" on device
        for group, sg in zip(self.optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in sg.items() if k in group})

    # -- collectives -------------------------------------------------------------------------------------------------
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_objects(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class DDPBackend(Backend):
    """torch DistributedDataParallel under torchrun (NCCL on CUDA, gloo on CPU)."""

    name = "ddp"

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        init_process_group(self.device)

    def wrap(self, model, optimizer):
        self.optimizer = optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, train_model, last_micro_step):
        return contextlib.nullcontext() if last_micro_step else train_model.no_sync()

    def all_reduce_mean(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def gather_objects(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        dist.barrier()

    def shutdown(self):
        shutdown_process_group()


def init_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))


def shutdown_process_group() -> None:
    """Always tear the group down: DeepSpeed/gloo on CPU aborts at exit in ~3/16 runs otherwise."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a dead peer: still destroy our side
            pass
        dist.destroy_process_group()


def make_backend(kind: str = "auto", device: str = "auto", cfg=None) -> Backend:
    _, world, _ = env_world()
    if kind == "auto":
        kind = "ddp" if world > 1 else "none"
    if kind == "none":
        if world > 1:
            raise RuntimeError(f"--parallel none with WORLD_SIZE={world}: launch one process or use --parallel ddp")
        return Backend(device)
    if kind == "ddp":
        return DDPBackend(device)
    raise ValueError(f"--parallel {kind!r} is not available in this build; choose none or ddp")
