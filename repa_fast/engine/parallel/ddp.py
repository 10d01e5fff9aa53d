"""torch DistributedDataParallel under torchrun (NCCL on CUDA, gloo on CPU): full replicas, gradients all-reduced
in fp32, a full EMA copy per rank."""

import contextlib

import torch.nn as nn

from repa_fast.engine.parallel.process_group import DistributedBackend


class DDPBackend(DistributedBackend):
    name = "ddp"

    def wrap(self, model, optimizer):
        self.optimizer = optimizer
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, train_model, last_micro_step):
        return contextlib.nullcontext() if last_micro_step else train_model.no_sync()
