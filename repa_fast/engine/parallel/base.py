"""Process backends behind one interface; the model code stays single-device (parallelism is applied from outside).

``make_backend(kind)`` reads the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), which
torchrun, the ``deepspeed`` launcher and a manual launch all set the same way, on one node or many: nothing here
depends on the node count (LOCAL_RANK only picks the GPU).

    kind        module                 model                       optimizer state        EMA (fp32)
    none        this one               as is                       full                   full copy
    ddp         this one               DistributedDataParallel     full, replicated       full copy per rank
    fsdp        parallel_fsdp          FSDP2 ``fully_shard``       DTensor shards         shards (DTensor local)
    deepspeed   parallel_deepspeed     ZeRO stage 0/1/2/3 engine   ZeRO partitions        full (0-2), shards (3)

"auto" picks ddp when WORLD_SIZE > 1, else none. Every backend exposes the calls the loop makes: wrap, make_ema,
no_sync, backward, clip_and_step, update_ema, ema_module, full_state_dict, full_ema_state_dict, optimizer_state_dict,
load_*_state_dict, all_reduce_mean, gather_objects, broadcast_object, barrier, peer_failure, shutdown.

Common semantics (whatever the backend): the global batch is split over ranks, RNG streams are seed + rank, weights
stay fp32 and bf16/fp16 is torch.autocast around the forward (DeepSpeed gets the same through its torch_autocast
section), gradients are reduced in fp32, the frozen target encoders are plain replicated modules (never wrapped,
sharded or optimised), checkpoints hold full fp32 tensors with the optimizer state keyed by parameter NAME, so a run
saved by any backend with N processes resumes on any backend with M.
"""

import contextlib
import copy
import datetime
import logging
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from repa_fast.engine.ema import EMA, ema_update_

logger = logging.getLogger("repa_fast")

# A rank that died or hangs leaves the others waiting in a collective; they give up after this long (bounded, no
# hang). Read when a process group is created, so tests can lower it through the environment.
DEFAULT_TIMEOUT_S = 60


def dist_timeout_s() -> int:
    return int(os.environ.get("REPA_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


class PeerFailure(RuntimeError):
    """Another process died or stopped answering; this one stopped cleanly. The message says how to resume."""


def env_world() -> tuple[int, int, int]:
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
        return ema.module

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

    def peer_failure(self, exc: BaseException, last_checkpoint: str | None = None) -> PeerFailure | None:
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


# ---------------------------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------------------------

# Messages of collectives that failed because a peer vanished (gloo, NCCL, the TCP store) or timed out.
_PEER_SIGNS = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "nccl",
    "gloo",
    "socket",
    "tcpstore",
    "by peer",
)


class DistributedBackend(Backend):
    """Collectives, process-group setup and teardown shared by every multi-process backend."""

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        init_process_group(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

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

    def peer_failure(self, exc, last_checkpoint=None):
        if isinstance(exc, PeerFailure):
            return exc
        text = f"{type(exc).__name__}: {exc}"
        is_dist = isinstance(exc, getattr(dist, "DistError", ())) or (
            isinstance(exc, RuntimeError) and any(s in text.lower() for s in _PEER_SIGNS)
        )
        if self.world_size == 1 or not is_dist:
            return None
        first = text.strip().splitlines()[0][:300]
        where = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        return PeerFailure(
            f"rank {self.rank}/{self.world_size} ({self.name}): a collective failed because another process died or "
            f"stopped answering (timeout REPA_FAST_DIST_TIMEOUT={dist_timeout_s()} s): {first}. This process "
            f"stopped; {where}. Relaunch with --resume to continue from it (any number of processes, any backend)."
        )

    def shutdown(self, clean=True):
        shutdown_process_group(clean)


class DDPBackend(DistributedBackend):
    """torch DistributedDataParallel under torchrun (NCCL on CUDA, gloo on CPU)."""

    name = "ddp"

    def wrap(self, model, optimizer):
        self.optimizer = optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, train_model, last_micro_step):
        return contextlib.nullcontext() if last_micro_step else train_model.no_sync()


_PRIVATE_STORES: list[str] = []  # file stores of launcher-less single-process groups, removed at shutdown


def init_process_group(device: torch.device) -> None:
    """One process group for everything, with a bounded timeout: a dead or hung peer makes collectives fail after
    REPA_FAST_DIST_TIMEOUT seconds (gloo honours it per operation; NCCL's watchdog aborts the communicator)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    if "MASTER_ADDR" not in os.environ and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # A single process not started by a launcher (e.g. --parallel deepspeed on one GPU): a private file store.
        import tempfile

        fd, store = tempfile.mkstemp(prefix="repa_fast-pg-")
        os.close(fd)
        _PRIVATE_STORES.append(store)
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend, timeout=timeout)


def bound_process_groups() -> int:
    """Give every process group this rank belongs to the bounded timeout. Groups that libraries create themselves
    (DeepSpeed clones the world group for ZeRO's reductions) get torch's default otherwise: 30 min for gloo, which a
    hung peer would make the survivors wait (measured: a SIGSTOPped rank under ZeRO-2 held the other past 120 s).
    Returns the number of groups set. The group registry is private (``_world.pg_map``); without it only the default
    group, which ``init_process_group`` already bounded, is covered."""
    if not dist.is_initialized():
        return 0
    timeout = datetime.timedelta(seconds=dist_timeout_s())
    registry = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None) or {}
    n = 0
    for group in list(registry):
        if dist.get_rank(group) >= 0:  # -1: this rank is not a member
            dist.set_timeout(timeout, group)
            n += 1
    return n


def shutdown_process_group(clean: bool = True) -> None:
    """Always tear the group down: DeepSpeed/gloo on CPU aborts at exit in ~3/16 runs otherwise. After a failure the
    barrier is skipped: a dead peer would only make it wait for the timeout once more."""
    if not dist.is_initialized():
        return
    if clean:
        try:
            dist.barrier()
        except Exception:  # a peer died during teardown: still destroy our side
            pass
    dist.destroy_process_group()
    while _PRIVATE_STORES:
        with contextlib.suppress(OSError):
            os.remove(_PRIVATE_STORES.pop())


# ---------------------------------------------------------------------------------------------------------------------
# Sharded EMA (FSDP2, ZeRO-3)
# ---------------------------------------------------------------------------------------------------------------------


class FullReplica:
    """What a sharding backend needs to rebuild a full, unsharded module on one rank, without holding its weights:
    a skeleton on the meta device plus copies of the tensors that never train (frozen params such as ``pos_embed``,
    buffers). Taken before ``wrap``; costs one copy of the frozen tensors."""

    def __init__(self, model: nn.Module):
        self.trainable = [n for n, _ in trainable(model)]
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

    The EMA is elementwise, so averaging each shard is averaging the full tensor: ema_shard <- lerp(ema_shard,
    param_shard, 1 - decay), with ``ema_update_``'s multi-tensor kernels and no communication. Full tensors are
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
        missing = [n for n in self.replica.keys if n not in state]
        if missing:
            raise RuntimeError(f"EMA state has no entry for {missing[:3]}...")
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(self._slice(n, state[n].to(s.device, torch.float32)))


class ShardingBackend(DistributedBackend):
    """Backends whose parameters are sharded (FSDP2, ZeRO-3): EMA in shards, previews rebuilt on rank 0."""

    replica: FullReplica | None = None

    def ema_module(self, ema):
        if not isinstance(ema, ShardedEMA):
            return super().ema_module(ema)
        full = ema.full_trainable()  # collective
        return ema.replica.materialize(full, self.device) if self.is_main else None


# ---------------------------------------------------------------------------------------------------------------------


def make_backend(kind: str = "auto", device: str = "auto", cfg=None) -> Backend:
    _, world, _ = env_world()
    if kind == "auto":
        kind = "ddp" if world > 1 else "none"
    if kind == "none":
        if world > 1:
            raise RuntimeError(
                f"--parallel none with WORLD_SIZE={world}: launch one process or use --parallel ddp/fsdp/deepspeed"
            )
        return Backend(device)
    if kind == "ddp":
        return DDPBackend(device)
    if kind == "fsdp":
        from repa_fast.engine.parallel_fsdp import FSDPBackend

        return FSDPBackend(device)
    if kind == "deepspeed":
        from repa_fast.engine.parallel_deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(device, cfg)
    raise ValueError(f"--parallel {kind!r} is unknown; choose auto, none, ddp, fsdp or deepspeed")
