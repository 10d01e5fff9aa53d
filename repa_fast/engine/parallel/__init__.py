"""Process backends behind one interface; the model code stays single-device (parallelism is applied from outside).

``make_backend(kind)`` reads the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK through
``process_group.launch_env``; MASTER_ADDR/PORT), which torchrun, the ``deepspeed`` launcher and a manual launch all
set the same way, on one node or many: nothing here depends on the node count (LOCAL_RANK only picks the GPU).

    kind        module            model                       optimizer state        EMA (fp32)
    none        base.py           as is                       full                   full copy
    ddp         ddp.py            DistributedDataParallel     full, replicated       1/world slices (slices.py)
    fsdp        fsdp.py           FSDP2 ``fully_shard``       DTensor shards         shards (DTensor local)
    deepspeed   deepspeed.py      ZeRO stage 1/2/3 engine     ZeRO partitions        slices (1-2), shards (3)

"auto" picks ddp when WORLD_SIZE > 1, else none. A backend module is imported only when it is picked (the base never
imports its subclasses). ``process_group.py`` owns the group's lifetime, timeouts and peer failures; ``dsconfig.py``
resolves a --config file's DeepSpeed section; ``parallelize.py`` applies the from-outside transforms (compile, then
the backend's wrap).

Common semantics (whatever the backend): the global batch is split over ranks, RNG streams are seed + rank, weights
stay fp32 and bf16/fp16 is torch.autocast around the forward (DeepSpeed gets the same through its torch_autocast
section), gradients are reduced in fp32, the frozen target encoders are plain replicated modules (never wrapped,
sharded or optimised), checkpoints hold full fp32 tensors with the optimizer state keyed by parameter NAME, so a run
saved by any backend with N processes resumes on any backend with M.
"""

from repa_fast.engine.parallel.base import Backend
from repa_fast.engine.parallel.parallelize import apply_compile, parallelize
from repa_fast.engine.parallel.process_group import PeerFailure, launch_env

__all__ = ["Backend", "PeerFailure", "apply_compile", "launch_env", "make_backend", "parallelize"]


def make_backend(kind: str = "auto", device: str = "auto", ds_config: dict | None = None) -> Backend:
    """The backend for ``--parallel kind``; ``ds_config`` is the resolved DeepSpeed config (deepspeed only)."""
    _, world, _ = launch_env()
    if kind == "auto":
        kind = "ddp" if world > 1 else "none"
    if kind == "none":
        if world > 1:
            raise RuntimeError(
                f"--parallel none with WORLD_SIZE={world}: launch one process or use --parallel ddp/fsdp/deepspeed"
            )
        return Backend(device)
    if kind == "ddp":
        from repa_fast.engine.parallel.ddp import DDPBackend

        return DDPBackend(device)
    if kind == "fsdp":
        from repa_fast.engine.parallel.fsdp import FSDPBackend

        return FSDPBackend(device)
    if kind == "deepspeed":
        from repa_fast.engine.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(device, ds_config)
    raise ValueError(f"--parallel {kind!r} is unknown; choose auto, none, ddp, fsdp or deepspeed")
