"""One training step priced as a whole: its kernels, their roofline time on a card, and the peak memory per GPU.

``step_ops`` lists every kernel of one optimizer step (SiT forward and backward with its losses, the target
encoder or the cached-target cast, clipping, optimizer, EMA, communication). ``roofline`` gives each kernel
max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)) plus a per-launch cost, sums them by part, and
compares with the host's dispatch time (eager ops; none under CUDA graphs): the step takes the larger, plus a drain
per host synchronisation. ``predict`` is one table row; the peak memory per GPU by part is repa_fast.cost.memory.
Everything here is a prediction from repa_fast.cost.hardware's datasheet peaks and assumed
efficiencies; nothing is measured.
"""

from dataclasses import dataclass

from repa_fast.cost.encoder import cached_target_ops, encoder_ops
from repa_fast.cost.fixed import clip_ops, comm_ops, ema_ops, optimizer_ops
from repa_fast.cost.hardware import Card, Efficiency
from repa_fast.cost.memory import GB, memory
from repa_fast.cost.ops import PARTS, Op
from repa_fast.cost.shapes import Config, param_counts
from repa_fast.cost.sit import Policy, SiTStep
from repa_fast.cost.structure import StepStructure
from repa_fast.flops import repa_step_flops
from repa_fast.models.encoder_archs import encoder_arch


def step_ops(cfg: Config, st: StepStructure, policy: Policy = Policy()) -> list[Op]:
    """Every kernel of one optimizer step at ``cfg.batch`` images per GPU."""
    sh = cfg.shape()
    ops = SiTStep(sh, st, cfg.batch, policy).ops()
    if st.targets == "cached":
        ops += cached_target_ops(st, cfg.batch, sh.tokens, sh.z_dims, cfg.cached_bytes)
    else:
        for e in cfg.enc_types:
            ops += encoder_ops(st, encoder_arch(e), cfg.batch, cfg.resolution, cfg.encoder_grid, policy)
    P, n, frozen = param_counts(cfg)
    ops += clip_ops(st, P, n, cfg.world) + optimizer_ops(st, P, n, cfg.world)
    ops += ema_ops(st, P, n, frozen, cfg.world) + comm_ops(st, P, cfg.world)
    return ops


# ---------------------------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------------------------
def op_seconds(op: Op, card: Card, eff: Efficiency) -> float:
    """The kernel's roofline time plus its launch cost (communication: link time, the overlap applied later)."""
    if op.rate == "link":
        return op.read / (card.nvlink_gb_s / 2 * GB * eff.nvlink)
    memory = op.bytes / (card.hbm_tb_s * 1e12 * eff.bandwidth)
    compute = 0.0
    if op.flops:
        if op.rate.startswith("attn:"):
            peak = card.bf16_tflops * eff.attn(op.rate[5:])
        elif op.rate in ("fp8", "fp8_rowwise"):
            if not card.fp8_tflops:
                raise ValueError(f"{card.name} has no FP8 tensor cores; drop fp8 from the structure")
            peak = card.fp8_tflops * (eff.fp8_matmul if op.rate == "fp8" else eff.fp8_rowwise)
        else:  # bf16/fp16 tensor cores; "fp32" matmuls are charged as TF32 (half the rate)
            peak = card.bf16_tflops * eff.matmul / (2 if op.rate == "fp32" else 1)
        compute = op.flops / (peak * 1e12)
    return max(memory, compute) + op.launches * eff.kernel_us * 1e-6


@dataclass
class StepTime:
    parts_s: dict  # seconds per part (GPU), per step
    gpu_s: float
    host_s: float
    step_s: float
    img_s: float
    bound: str  # "gpu" or "host"


def roofline(ops: list[Op], card: Card, eff: Efficiency, st: StepStructure, batch: int) -> StepTime:
    parts = dict.fromkeys(PARTS, 0.0)
    dispatches = 0.0
    for op in ops:
        dispatches += op.launches
        if op.part == "host":
            continue
        t = op_seconds(op, card, eff)
        if op.rate == "link":
            t *= 1 - eff.comm_overlap
        parts[op.part] += t
    gpu = sum(parts.values())
    host = 0.0 if st.cuda_graphs else dispatches * eff.host_us * 1e-6
    step = max(gpu, host) + st.host_syncs * eff.sync_us * 1e-6
    return StepTime(parts, gpu, host, step, batch / step, "gpu" if gpu >= host else "host")


# ---------------------------------------------------------------------------------------------------------------
# Per-image summary
# ---------------------------------------------------------------------------------------------------------------
def model_flops_per_img(cfg: Config, st: StepStructure) -> float:
    """MFU FLOPs (repa_fast.flops: 3x the trainable forward + the encoders), without padding or recompute."""
    sh = cfg.shape()
    f = repa_step_flops(
        sh.depth,
        sh.dim,
        sh.tokens,
        sh.patch,
        sh.z_dims,
        sh.projector_dim,
        cfg.enc_types,
        cfg.encoder_grid,
        sh.in_channels,
        reg=sh.reg,
        projection_layer_type=sh.projection_layer_type,
        proj_kernel_size=sh.proj_kernel_size,
    )
    return f.train_step_cached_targets if st.targets == "cached" else f.train_step


def per_image(ops: list[Op], batch: int) -> dict:
    """{part: (FLOPs, HBM bytes, launches)} per image (link bytes of collectives are not HBM traffic)."""
    out = {p: [0.0, 0.0, 0.0] for p in PARTS}
    for o in ops:
        row = out[o.part]
        row[0] += o.flops / batch
        row[1] += (0.0 if o.rate == "link" else o.bytes) / batch
        row[2] += o.launches
    return {p: tuple(v) for p, v in out.items()}


def predict(cfg: Config, st: StepStructure, card: Card, eff: Efficiency, policy: Policy = Policy()) -> dict:
    """Everything one table row needs, for one configuration."""
    ops = step_ops(cfg, st, policy)
    t = roofline(ops, card, eff, st, cfg.batch)
    img = per_image(ops, cfg.batch)
    mem = memory(cfg, st, eff, policy)
    mflops = model_flops_per_img(cfg, st)
    peak = card.bf16_tflops * 1e12
    return {
        "name": st.name,
        "batch": cfg.batch,
        "predicted_img_s": t.img_s,
        "predicted_ms_per_img": 1e3 * t.step_s / cfg.batch,
        "flops_per_img": sum(v[0] for v in img.values()),
        "model_flops_per_img": mflops,
        "hbm_bytes_per_img": sum(v[1] for v in img.values()),
        "predicted_mfu": mflops * t.img_s / peak,
        "predicted_ms_per_img_by_part": {p: 1e3 * s / cfg.batch for p, s in t.parts_s.items() if s},
        "bytes_per_img_by_part": {p: v[1] for p, v in img.items() if v[1]},
        "flops_per_img_by_part": {p: v[0] for p, v in img.items() if v[0]},
        "launches_per_step": sum(v[2] for v in img.values()),
        "predicted_host_ms_per_step": 1e3 * t.host_s,
        "predicted_gpu_ms_per_step": 1e3 * t.gpu_s,
        "bound": t.bound,
        "predicted_memory_gb": mem.total_gb,
        "predicted_memory_gb_by_part": mem.parts_gb,
        "fits": mem.total_gb <= card.memory_gb,
        "structure": st.name,
        "note": st.note,
        "not_built": st.not_built(),
        "world": cfg.world,
    }
