"""DeepSpeed backend: ZeRO stage 0, 1, 2 or 3 as the config says, behind the common Backend interface.

What DeepSpeed does here: partitions the optimizer state (1), gradients (2) and parameters (3), reduces gradients,
clips with the global norm and steps the trainer's own AdamW on its flat fp32 partitions. What stays ours, identical
to the other backends: fp32 weights with torch.autocast (DeepSpeed's ``torch_autocast`` section, see
dsconfig.py), the loop's gradient accumulation (``managed_gradient_accumulation: false``: one ``engine.step()``
per optimizer step), the EMA, and the portable checkpoint format.

Non-finite gradients: DeepSpeed's ZeRO optimizers check the global norm and skip the step (no parameter, moment or
step-count change); the check is a host synchronisation inside ``engine.step()`` (DeepSpeed reads the overflow flag on
the host). ``engine.was_step_applied()`` then tells the EMA to skip too.

EMA: stages 0-2 keep full fp32 parameters on every rank, so each rank averages its 1/world slice of every parameter
(``slices.py``, as under DDP). Under ZeRO-3 each rank owns a contiguous partition of every parameter (DeepSpeed's fp32
master partition, ``safe_get_local_fp32_param``); the EMA keeps the matching partitions. Either way the full tensors
are all-gathered only to save or preview.

Clipping stays DeepSpeed's (``gradient_clipping``): inside ``engine.step()`` it computes the global norm and multiplies
this rank's flat gradient partition by 1 / max(1, (norm + 1e-6) / clip) (``unscale_and_clip_grads``,
deepspeed/runtime/zero/stage_1_and_2.py; no pass at all with clipping 0) before calling the trainer's AdamW, so the
fold of ``Backend.clip_and_step`` does not apply; the pass it keeps covers 1/world of the gradients.

Checkpoints: full weights from the module (stages 0-2) or gathered partitions (3); the optimizer state through
DeepSpeed's public fragment API (``safe_get/set_full_optimizer_state``), keyed by parameter name.

Phase changes (ERW, the HASTE-style stop): a new engine over the new trainable set; under ZeRO-3 ``unshard`` first
gathers the partitioned module into a plain one (docs/training.md §Phase changes under sharding).

Config: the backend takes the DeepSpeed config already resolved at the config boundary (``repa_fast.cli.resolve_config``
calls ``dsconfig.resolve_deepspeed_config`` once) and only checks that it was resolved for this process count.
"""

import logging

import torch
import torch.distributed as dist

from repa_fast.config import ConfigError
from repa_fast.engine.ema import FullReplica, ShardedEMA
from repa_fast.engine.parallel.base import (
    check_optimizer_names,
    load_param_group_settings,
    param_group_settings,
    trainable,
)
from repa_fast.engine.parallel.dsconfig import check_resolved, zero_stage
from repa_fast.engine.parallel.process_group import DistributedBackend, bound_process_groups, dist_timeout
from repa_fast.engine.parallel.slices import all_gather_slices, replicated_ema

logger = logging.getLogger("repa_fast")


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            "--parallel deepspeed needs the DeepSpeed package: pip install 'repa_fast[deepspeed]' "
            "(or use --parallel ddp / fsdp under torchrun)"
        ) from e
    return deepspeed


class DeepSpeedBackend(DistributedBackend):
    name = "deepspeed"
    torch_grad_scaler = False  # fp16 is refused (dsconfig.py); DeepSpeed would bring its own scaler anyway
    replica: FullReplica | None = None

    def __init__(self, device: str = "auto", ds_config: dict | None = None):
        """``ds_config``: the resolved DeepSpeed config (``dsconfig.resolve_deepspeed_config``), as in
        ``TrainConfig.deepspeed`` after ``repa_fast.cli.resolve_config``."""
        self._ds = import_deepspeed()
        super().__init__(device)  # our process group first: DeepSpeed reuses it, with our timeout
        self._ds.init_distributed(dist_backend=dist.get_backend(), timeout=dist_timeout(), dist_init_required=False)
        self.ds_config = check_resolved(ds_config, self.world_size)
        self.stage = zero_stage(self.ds_config)

    def wrap(self, model, optimizer):
        if self.stage == 3:
            self.replica = FullReplica(model)  # before DeepSpeed partitions the parameters
        self._model = model
        engine, ds_opt, _, _ = self._ds.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engine, self.optimizer = engine, ds_opt
        self.base = ds_opt.optimizer  # the torch AdamW over DeepSpeed's flat fp32 partitions
        bound_process_groups()  # ZeRO reduces over a clone of the world group, created with torch's 30 min default
        logger.info(
            "deepspeed: ZeRO stage %d, micro batch %d x accumulation %d x %d process(es), autocast %s",
            self.stage,
            self.ds_config["train_micro_batch_size_per_gpu"],
            self.ds_config["gradient_accumulation_steps"],
            self.world_size,
            self.ds_config["torch_autocast"].get("dtype") if self.ds_config["torch_autocast"]["enabled"] else "off",
        )
        return engine

    def unshard(self, model):
        """A phase change. Stages 0-2 keep the module whole (its parameters point into the engine's flat buffers,
        which the next ``initialize`` copies into its own): the module itself. Stage 3 partitioned it in place: the
        full weights are gathered on every rank (``full_state_dict``, the checkpoint's own gather) into a plain
        module built from the replica's skeleton, and the old engine is destroyed (its hooks and buffers)."""
        if self.stage < 3:
            return model
        plain = self.replica.materialize(self.full_state_dict(model), self.device).train(model.training)
        self.engine.destroy()
        self.engine = self.optimizer = self.base = self.replica = self._model = None
        return plain

    def backward(self, loss, scaler=None):
        # The loop already divided by the accumulation count.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, model, max_norm, scaler=None):
        self.engine.step()  # reduce (stages 0/1) or finalise partitions (2/3), clip, step or skip, zero grads
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=self.device)
        skipped = torch.tensor(not self.engine.was_step_applied(), device=self.device)
        return norm, skipped

    # -- EMA -------------------------------------------------------------------------------------------------------
    def make_ema(self, model):
        if self.stage < 3:
            return replicated_ema(model, self.rank, self.world_size)
        from deepspeed.utils import safe_get_local_fp32_param

        self._params = dict(model.named_parameters())
        names = [n for n, _ in trainable(model)]
        return ShardedEMA(
            names,
            lambda: [safe_get_local_fp32_param(self._params[n]) for n in names],
            self._gather_partitions,
            self._my_partition,
            self.replica,
        )

    def _partition_numel(self, name: str) -> int:
        return -(-self._params[name].ds_numel // self.world_size)  # ceil: the last rank's partition is padded

    def _gather_partitions(self, name, local):
        """Full tensor from every rank's contiguous, equally sized partition (rank order), padding dropped."""
        p, n = self._params[name], self._partition_numel(name)
        if local.numel() != n:
            raise RuntimeError(
                f"ZeRO-3 partition of {name} has {local.numel()} elements, expected {n}; this "
                "DeepSpeed version lays partitions out differently (please report)"
            )
        return all_gather_slices(local, n, p.ds_numel).view(p.ds_shape).cpu()

    def _my_partition(self, name, full):
        """This rank's partition of a full tensor, zero-padded to the partition size."""
        n = self._partition_numel(name)
        part = full.reshape(-1)[self.rank * n : (self.rank + 1) * n]
        return torch.cat([part, part.new_zeros(n - part.numel())]) if part.numel() < n else part.clone()

    # -- state -----------------------------------------------------------------------------------------------------
    def full_state_dict(self, model):
        if self.stage < 3:
            return super().full_state_dict(model)
        with self._ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def _flat_states(self):
        """(flat fp32 partition, its AdamW state or None) for every partition the base AdamW updates. ZeRO-3 puts each
        partition into the base optimizer's param_groups only while it steps it, so ask the ZeRO optimizer."""
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # stage 3
        if flats is None:
            flats = self.optimizer.single_partition_of_fp32_groups  # stages 1/2
        return [(flat, self.base.state.get(flat)) for flat in flats]

    def optimizer_state_dict(self, model):
        flats = [(f, s) for f, s in self._flat_states() if s]
        out = {"state": {}, "param_groups": param_group_settings(self.base)}
        if not flats:  # no step taken yet: no state, as a fresh torch optimizer
            return out
        flat, first = flats[0]
        keys = [k for k, v in first.items() if torch.is_tensor(v) and v.shape == flat.shape]  # exp_avg, exp_avg_sq
        scalars = {k: v.detach().cpu().clone() for k, v in first.items() if k not in keys}  # step
        for name, p in trainable(model):
            # Collectives (fragment all-reduce / partition all-gather): every rank runs them, rank 0 keeps the result.
            # One "step" tensor per parameter, as torch saves it (a shared one would be stepped once per parameter).
            scalars_copy = {k: v.clone() for k, v in scalars.items()}
            out["state"][name] = {**scalars_copy, **{k: self._full_state(name, p, k) for k in keys}}
        return out

    def _full_state(self, name, p, key):
        from deepspeed.utils import safe_get_full_optimizer_state, safe_get_local_optimizer_state

        if self.stage == 3:  # DeepSpeed's full getter/setter mis-slices padded partitions: use the local API
            return self._gather_partitions(name, safe_get_local_optimizer_state(p, key))
        return safe_get_full_optimizer_state(p, key).detach().reshape(p.shape).cpu()

    def load_optimizer_state_dict(self, model, saved):
        from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

        check_optimizer_names(model, saved)
        load_param_group_settings(self.base, saved)
        if not saved["state"]:
            return
        first = next(iter(saved["state"].values()))
        keys = [k for k, v in first.items() if v.dim() > 0]
        for flat, state in self._flat_states():
            if not state:  # AdamW creates its state lazily: create it now in its own format, then fill it
                self.base.state[flat] = {
                    **{k: v.to(flat.device).clone() for k, v in first.items() if k not in keys},
                    **{k: torch.zeros_like(flat) for k in keys},
                }
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # stages 1/2: map fragments
        if link is not None:
            link()
        for name, p in trainable(model):
            for k in keys:
                full = saved["state"][name][k].to(self.device, torch.float32)
                if self.stage == 3:
                    safe_set_local_optimizer_state(p, self._my_partition(name, full), k)
                else:
                    safe_set_full_optimizer_state(p, full, k)
