"""The Backend interface, and the single-process backend that implements it (its collectives are no-ops).

A backend applies the parallelism from outside the single-device model and owns the calls the training loop makes:
wrap, unshard (at a phase change), make_ema, no_sync, backward, clip_and_step, update_ema, ema_module,
full_state_dict, full_ema_state_dict, optimizer_state_dict, load_*_state_dict, all_reduce_mean, gather_objects,
broadcast_object, barrier, peer_failure, shutdown. The multi-process backends derive from
``process_group.DistributedBackend``; this module imports none of them (``repa_fast.engine.parallel.make_backend``
picks one).
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

    def unshard(self, model: nn.Module) -> nn.Module:
        """At a recipe phase change (ERW warm-up -> full, the HASTE-style stop): the plain single-device module that
        ``wrap`` takes for the next phase, holding the current full fp32 weights on every rank. Backends that keep
        the parameters whole (none, DDP, ZeRO-1/2) return ``model`` itself; FSDP2 and ZeRO-3 gather their shards
        into a new module (collective), exactly what a resume from the phase's last checkpoint loads before its
        ``wrap``. The old wrapper is not used afterwards."""
        return model

    def make_ema(self, model: nn.Module):
        """The EMA, created after ``wrap`` (so it starts from the synchronised, possibly sharded, weights)."""
        return EMA(model)

    def no_sync(self, train_model: nn.Module, last_micro_step: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def clip_and_step(self, model: nn.Module, max_norm: float, scaler=None):
        """Clip and step without a host sync or a pass of its own over the gradients. Returns (grad_norm, skipped)
        as device tensors.

        One reduction: the global L2 norm of the gradients as backward left them (fp16: still multiplied by the loss
        scale S, so the true norm is that / S, exact for a power of 2). The clip, ``g * max_norm / (norm + 1e-6)``
        where that is below 1 (``torch.nn.utils.clip_grad_norm_``), and the fp16 unscale are one divisor of the
        fused AdamW step, its ``grad_scale`` input: ``S * max(1, (norm + 1e-6) / max_norm)``; none at all without
        clipping (``max_norm`` 0 or inf) in fp32/bf16. A non-finite norm (NaN/inf loss, overflow) skips the update
        through the step's ``found_inf`` input (no parameter, moment or step-count change) and, in fp16, backs the
        loss scale off as GradScaler does. Without clipping the norm is still computed: it is the device-side check
        that decides the skip on every rank alike (and is logged).
        """
        opt = self.optimizer
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        loss_scale = scaler._scale.reshape(()) if scaler is not None and scaler.is_enabled() else None
        grad_norm = self._grad_norm(grads)
        if loss_scale is not None:
            grad_norm = grad_norm / loss_scale
        skipped = ~torch.isfinite(grad_norm)
        opt.grad_scale = step_divisor(grad_norm, max_norm, loss_scale)
        opt.found_inf = skipped.float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        if loss_scale is not None:
            update_loss_scale(scaler, opt, skipped)
        opt.zero_grad(set_to_none=True)
        return grad_norm.detach(), skipped

    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The global L2 norm of ``grads`` (one multi-tensor reduction), a plain tensor on this rank."""
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def update_ema(self, ema, model: nn.Module, decay: float, skipped: torch.Tensor) -> None:
        ema.update(model, decay, skip=skipped)

    def ema_module(self, ema, all_ranks: bool = False) -> nn.Module | None:
        """A full EMA module for previews on the main process (None elsewhere), or on every process with
        ``all_ranks`` (the sharded in-training evaluation). Collective for sharded EMAs: their gathers are
        all-gathers, so every rank holds the full tensors anyway."""
        return ema.full_module(self.device, self.is_main or all_ranks)

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


def step_divisor(grad_norm: torch.Tensor, max_norm: float, loss_scale: torch.Tensor | None) -> torch.Tensor | None:
    """What the fused step divides every gradient by: the loss scale times the clip's inverse coefficient
    ``max(1, (norm + 1e-6) / max_norm)``; None when there is neither (given a grad_scale, the fused step also writes
    the divided gradients back: one more write of them, which fp32 without clipping avoids).

    Unclipped, the divisor is exactly 1 (or S): the same update, bit for bit, as unscale-then-clip. Clipped,
    g / divisor rounds g * max_norm / (norm + 1e-6) in two steps where clip_grad_norm_ takes three
    (1 / (norm + 1e-6), times max_norm, times g): the clipped gradients differ by at most 1 fp32 ulp when max_norm
    is a power of 2 (the recipes' 1.0), 2 ulps otherwise (tests/engine/test_clip_in_step.py)."""
    clip = 0 < max_norm < float("inf")
    divisor = torch.clamp((grad_norm + 1e-6) / max_norm, min=1.0) if clip else None
    if loss_scale is None:
        return divisor
    return loss_scale if divisor is None else divisor * loss_scale


def update_loss_scale(scaler, optimizer, found_inf: torch.Tensor) -> None:
    """GradScaler's update (back off after an overflow, grow after ``growth_interval`` clean steps) from our own
    overflow flag: ``clip_and_step`` never calls ``scaler.unscale_`` / ``scaler.step``, whose check would be one
    more read and write of every gradient. The flag goes where those would have put it (GradScaler's per-optimizer
    state, private but stable since torch 1.6)."""
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"][found_inf.device] = found_inf.float().reshape(1)
    scaler.update()


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
