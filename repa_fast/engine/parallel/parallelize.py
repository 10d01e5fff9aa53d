"""The transforms applied to the single-device model from outside, in one place and in torchtitan's order
(torchtitan/models/llama3/infra/parallelize.py: compile each block, then shard): models/ never compiles or wraps
itself.

``Module.compile`` compiles in place, so state-dict keys stay unchanged (checkpoints are the same with and without
--compile), and copies taken later (the EMA, FSDP2/ZeRO-3's ``FullReplica``) are plain eager modules: ``deepcopy``
drops the compiled call. The hooks a backend registers (FSDP2's all-gathers, ZeRO-3's parameter fetches) run inside
the block's compiled call whichever comes first.
"""

import torch
import torch.nn as nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each SiT block in place: the blocks share one structure, so it compiles once."""
    for block in model.blocks:
        block.compile(backend=backend)


def parallelize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, backend) -> nn.Module:
    """Compile (``cfg.model.compile``), then ``backend.wrap``; returns the module to train. ``backend.optimizer`` is
    the optimizer to use from then on (FSDP2 rebuilds it over its sharded parameters)."""
    if cfg.model.compile:
        apply_compile(model, cfg.model.compile_backend)
    return backend.wrap(model, optimizer)
