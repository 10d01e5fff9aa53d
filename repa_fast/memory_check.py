"""``train.py --dry-run``'s memory check: the predicted peak memory per GPU by part, and the refusal of a configuration
predicted not to fit the GPU, naming the options that make it fit (issue 18 item 2g).

The numbers are the cost model's (``repa_fast.cost.memory``: ``memory_report``, ``fits``, ``suggest``; all
predicted, GB = 1e9 bytes); this module only turns a ``TrainConfig`` into its ``Setup``, finds the GPU's memory
(``--gpu-memory-gb``, else the visible CUDA device of this process) and words the result. It builds nothing: a
login node without a GPU prints the table, and ``--gpu-memory-gb 80`` checks the fit for a card it does not have.

Not predicted (the table says why): the digits demo (pixel space, while the model prices SD-VAE latents of 4 x
resolution/8 x resolution/8) and encoders the cost model has no shape for (``repa_fast.models.encoder_archs``).
"""

import dataclasses
from dataclasses import dataclass, field

from repa_fast.config import TrainConfig, micro_batch_size
from repa_fast.cost.memory import Option, Setup, memory_report, suggest
from repa_fast.errors import ConfigError


@dataclass
class MemoryCheck:
    """What the check found: the table (``report``: [(part, GB), ..., ("total", GB)]) unless ``skipped`` says why
    not, the GPU memory it was held against (``gpu_gb``, None when there is none to compare with) and where that
    number came from, and the options that fit (empty when it fits)."""

    setup: Setup | None = None
    report: list = field(default_factory=list)
    gpu_gb: float | None = None
    gpu: str = ""
    options: list = field(default_factory=list)
    skipped: str = ""

    @property
    def total_gb(self) -> float | None:
        return self.report[-1][1] if self.report else None

    @property
    def fits(self) -> bool | None:
        """True / False against ``gpu_gb``; None when nothing was predicted or there is no GPU to compare with."""
        if self.total_gb is None or self.gpu_gb is None:
            return None
        return self.total_gb <= self.gpu_gb

    def to_json(self) -> dict:
        if self.skipped:
            return {"predicted": False, "why": self.skipped}
        return {
            "predicted_gb_per_gpu": {k: round(v, 3) for k, v in self.report},
            "gpu_gb": self.gpu_gb,
            "gpu": self.gpu,
            "fits": self.fits,
            "options": [dataclasses.asdict(o) for o in self.options],
        }


def _parallel(cfg: TrainConfig, world: int) -> str:
    """The backend as the cost model accounts for it (``cost.memory.PARALLEL_NAMES``)."""
    kind = cfg.run.parallel
    if world == 1 or kind == "none":
        return "none"
    if kind == "deepspeed":
        zero = (cfg.deepspeed or {}).get("zero_optimization", {}) if isinstance(cfg.deepspeed, dict) else {}
        stage = zero.get("stage", 2) if isinstance(zero, dict) else 2  # engine/parallel/dsconfig.py's default
        return {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}.get(stage, "zero2")
    return "fsdp" if kind == "fsdp" else "ddp"  # auto with several processes is DDP (engine/parallel)


def setup_from_config(cfg: TrainConfig, world: int = 1) -> Setup:
    """The cost model's ``Setup`` of a validated config on ``world`` processes (ValueError: not predictable)."""
    if cfg.data.dataset == "digits":
        raise ValueError("the digits demo trains in pixel space; the cost model prices SD-VAE latents")
    aligns = bool(cfg.target.enc_type) and cfg.loss.proj_coeff != 0
    encs = tuple(e.strip() for e in cfg.target.enc_type.split(",")) if aligns else ()
    m = cfg.model
    setup = Setup(
        model=m.model,
        enc_types=encs,
        resolution=cfg.data.resolution,
        batch=micro_batch_size(cfg, world),
        world=world,
        accumulation=cfg.optim.gradient_accumulation_steps,
        parallel=_parallel(cfg, world),
        amp=cfg.run.mixed_precision,
        targets=cfg.target.targets,
        act_ckpt=m.activation_checkpointing,
        fp8=m.fp8,
        impl="ref" if m.kernels == "ref" else "triton",  # --kernels auto runs Triton on a GPU
        encoder_depth=m.encoder_depth,
        projector_dim=m.projector_dim,
        reg=m.reg,  # REG's class token: 1 + T tokens through the blocks (repa_fast/cost/shapes.py)
        projection_layer_type=m.projection_layer_type,
        proj_kernel_size=m.proj_kwargs_kernel_size,
    )
    memory_report(setup)  # ValueError for a model or encoder the cost model does not know
    return setup


def visible_gpu(cfg: TrainConfig, local_rank: int = 0) -> tuple[float, str] | None:
    """(GB, "cuda:i (name)") of this process's CUDA device, or None (no CUDA, or ``--device cpu``)."""
    import torch

    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        return None
    index = local_rank % torch.cuda.device_count()
    props = torch.cuda.get_device_properties(index)
    return props.total_memory / 1e9, f"cuda:{index} ({props.name})"


def check_memory(cfg: TrainConfig, world: int = 1, local_rank: int = 0) -> MemoryCheck:
    """The prediction for ``cfg`` and its verdict against ``--gpu-memory-gb`` or the visible GPU."""
    try:
        setup = setup_from_config(cfg, world)
    except ValueError as e:
        return MemoryCheck(skipped=str(e))
    check = MemoryCheck(setup=setup, report=memory_report(setup))
    if cfg.run.gpu_memory_gb is not None:
        check.gpu_gb, check.gpu = cfg.run.gpu_memory_gb, "--gpu-memory-gb"
    elif (found := visible_gpu(cfg, local_rank)) is not None:
        check.gpu_gb, check.gpu = found
    if check.fits is False:
        check.options = suggest(setup, check.gpu_gb)
    return check


def format_table(check: MemoryCheck) -> str:
    """The table ``--dry-run`` prints: one row per part, the total and the verdict."""
    if check.skipped:
        return f"predicted peak memory per GPU: not predicted ({check.skipped})"
    s = check.setup
    head = (
        f"predicted peak memory per GPU (repa_fast/cost/memory.py; GB = 1e9 bytes): {s.model}"
        f"{' + ' + ','.join(s.enc_types) if s.enc_types else ''}, {s.resolution} px, per-GPU batch {s.batch} x "
        f"{s.accumulation} accumulation on {s.world} GPU(s) ({s.parallel}), {s.amp}, targets {s.targets}, "
        f"activation checkpointing {s.act_ckpt}, fp8 {s.fp8}"
    )
    rows = [f"  {part:<14}{gb:9.2f}" for part, gb in check.report]
    if check.fits is None:
        verdict = "no GPU visible: pass --gpu-memory-gb N to check the fit"
    else:
        verdict = f"{'fits' if check.fits else 'does NOT fit'} the {check.gpu_gb:.1f} GB of {check.gpu}"
    return "\n".join([head, *rows, f"  -> {verdict}"])


def describe_option(o: Option, setup: Setup) -> str:
    how = [f"per-GPU micro-batch {o.batch} with {o.accumulation} accumulation steps"] if o.batch != setup.batch else []
    how += [f"activation checkpointing {o.act_ckpt}"] if o.act_ckpt != setup.act_ckpt else []
    same = f"global batch {setup.global_batch} unchanged"
    return f"{' and '.join(how)} ({same}): add {o.flags} (predicted {o.predicted_gb:.1f} GB)"


def refuse_if_too_big(check: MemoryCheck) -> None:
    """ConfigError (exit 2) when the configuration is predicted not to fit, naming the options that fit."""
    if check.fits is not False:
        return
    s = check.setup
    lines = [
        f"predicted peak memory {check.total_gb:.1f} GB per GPU does not fit the {check.gpu_gb:.1f} GB of {check.gpu}",
        format_table(check),
    ]
    if check.options:
        lines.append("options predicted to fit:")
        lines += [f"  - {describe_option(o, s)}" for o in check.options]
    else:
        lines.append(
            "no per-GPU micro-batch fits even with --activation-checkpointing full: use more GPUs with a sharding "
            "backend (--parallel fsdp, or deepspeed with ZeRO), --targets cached, or a smaller model"
        )
    raise ConfigError("\n".join(lines))
