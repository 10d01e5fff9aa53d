"""torch FSDP2 (``fully_shard``) backend: parameters, gradients, optimizer state and EMA sharded over ranks.

Wrapping policy: every child of every ``nn.ModuleList`` (the SiT blocks, the REPA projectors) is its own FSDP unit,
then the root (embedders, final layer, frozen ``pos_embed``). Parameters stay fp32 with no ``MixedPrecisionPolicy``:
bf16/fp16 is the loop's torch.autocast, as on every backend, and gradients are reduce-scattered in fp32 (same numerics
as DDP). Gradient accumulation turns the reduce-scatter off on all but the last micro-batch
(``set_requires_gradient_sync``). Clipping uses the global norm of the sharded gradients (the shards' squared norms
all-reduced: a replicated DTensor), folded into the fused AdamW step's ``grad_scale`` as in one process, and the step
skips non-finite steps through ``found_inf`` with no host sync.

Checkpoints: ``torch.distributed.checkpoint.state_dict`` assembles full fp32 model and optimizer state keyed by
parameter name (rank 0, CPU); loading cuts full tensors into this rank's shards (``distribute_tensor`` with
``src_data_rank=None``: every rank already read the file, no communication).

Phase changes (ERW, the HASTE-style stop): ``unshard`` gathers the full weights into a new plain module, which the
trainer wraps and shards again for the new trainable set (docs/training.md §Phase changes under sharding).
"""

import inspect

import torch
import torch.nn as nn

from repa_fast.engine.ema import FullReplica, ShardedEMA
from repa_fast.engine.parallel.base import (
    check_optimizer_names,
    load_param_group_settings,
    param_group_settings,
    trainable,
)
from repa_fast.engine.parallel.process_group import DistributedBackend, bound_process_groups


def _dtensor_api():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    return fully_shard, DTensor, distribute_tensor, StateDictOptions, get_model_state_dict, get_optimizer_state_dict


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class FSDPBackend(DistributedBackend):
    name = "fsdp"
    replica: FullReplica | None = None

    def wrap(self, model, optimizer):
        fully_shard = _dtensor_api()[0]
        self.replica = FullReplica(model)
        self._model = model
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for child in module:
                    fully_shard(child)
        fully_shard(model)
        # fully_shard swaps every parameter for a DTensor: rebuild the optimizer over them, same hyper-parameters.
        accepted = inspect.signature(type(optimizer).__init__).parameters
        kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        self.optimizer = type(optimizer)([p for _, p in trainable(model)], **kwargs)
        self._params = dict(model.named_parameters())
        bound_process_groups()  # in case the device mesh made its own group
        return model

    def unshard(self, model):
        """A phase change: every rank all-gathers the full state dict (``full_state_dict=True`` without
        ``cpu_offload``: on every rank, not rank 0 only) into a plain module built from the replica's skeleton (the
        non-persistent buffers, the RoPE tables, come from the replica). ``fully_shard`` swapped the module's class
        and parameters in place, so the module itself cannot be wrapped again; the new one is, by ``wrap``."""
        _, _, _, options, get_model_state_dict, _ = _dtensor_api()
        full = get_model_state_dict(model, options=options(full_state_dict=True))
        plain = self.replica.materialize(full, self.device).train(model.training)
        self.replica = self._model = self._params = self.optimizer = None
        return plain

    def no_sync(self, train_model, last_micro_step):
        train_model.set_requires_gradient_sync(last_micro_step)
        return super().no_sync(train_model, last_micro_step)

    def _grad_norm(self, grads):
        # The local shards' squared norms, all-reduced (sum) over the ranks: a Partial DTensor made replicated and
        # plain (``full_tensor``). The clip itself is the fused step's grad_scale (Backend.clip_and_step).
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- EMA ---------------------------------------------------------------------------------------------------------
    def make_ema(self, model):
        names = [n for n, _ in trainable(model)]
        return ShardedEMA(
            names, lambda: [_local(self._params[n]) for n in names], self._gather_full, self._local_slice, self.replica
        )

    def _gather_full(self, name, local):
        DTensor = _dtensor_api()[1]
        p = self._params[name]
        full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        return full.cpu()

    def _local_slice(self, name, full):
        distribute_tensor = _dtensor_api()[2]
        p = self._params[name]
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()

    # -- state ---------------------------------------------------------------------------------------------------
    def full_state_dict(self, model):
        _, _, _, options, get_model_state_dict, _ = _dtensor_api()
        return get_model_state_dict(model, options=options(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, model):
        _, _, _, options, _, get_optimizer_state_dict = _dtensor_api()
        sd = get_optimizer_state_dict(model, self.optimizer, options=options(full_state_dict=True, cpu_offload=True))
        state = {name: {k: v.detach().cpu() for k, v in s.items()} for name, s in sd.get("state", {}).items()}
        return {"state": state, "param_groups": param_group_settings(self.optimizer)}

    def load_optimizer_state_dict(self, model, saved):
        params = check_optimizer_names(model, saved)
        for name, s in saved["state"].items():
            p = params[name]
            self.optimizer.state[p] = {
                k: self._local_state(p, v) if v.shape == p.shape else v.to(self.device, copy=True) for k, v in s.items()
            }
        load_param_group_settings(self.optimizer, saved)

    def _local_state(self, p, full):
        """This rank's shard of a full optimizer-state tensor, as the DTensor the optimizer itself would hold."""
        distribute_tensor = _dtensor_api()[2]
        return distribute_tensor(full.to(self.device, torch.float32), p.device_mesh, p.placements, src_data_rank=None)
