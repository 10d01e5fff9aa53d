"""torch DistributedDataParallel under torchrun (NCCL on CUDA, gloo on CPU): full replicas, gradients all-reduced
in fp32, the EMA sliced over the ranks (``slices.py``: each rank averages 1/world of every parameter).

The optimizer state stays replicated (every rank runs the full fused AdamW): sharding it here
(``ZeroRedundancyOptimizer``) would add a broadcast of every updated parameter on top of DDP's all-reduce, 1.5x the
communication, where ``--parallel fsdp`` or ``deepspeed`` (ZeRO-1/2) shard it with a reduce-scatter + all-gather
that costs what the all-reduce does.
"""

import contextlib

import torch.nn as nn

from repa_fast.engine.parallel.process_group import DistributedBackend
from repa_fast.engine.parallel.slices import replicated_ema


class DDPBackend(DistributedBackend):
    name = "ddp"

    def wrap(self, model, optimizer):
        self.optimizer = optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def make_ema(self, model):
        return replicated_ema(model, self.rank, self.world_size)

    def no_sync(self, train_model, last_micro_step):
        return contextlib.nullcontext() if last_micro_step else train_model.no_sync()
