"""One training step priced as a whole: its kernels, their roofline time on a card, and the peak memory per GPU.

``step_ops`` lists every kernel of one optimizer step (SiT forward and backward with its losses, the target
encoder or the cached-target cast, clipping, optimizer, EMA, communication). ``roofline`` gives each kernel
max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)) plus a per-launch cost, sums them by part, and
compares with the host's dispatch time (eager ops; none under CUDA graphs): the step takes the larger, plus a drain
per host synchronisation. ``memory`` is the predicted peak per GPU by part, ``max_batch`` the largest per-GPU batch
predicted to fit. Everything here is a prediction from repa_fast.cost.hardware's datasheet peaks and assumed
efficiencies; nothing is measured.
"""

import re
from dataclasses import dataclass, field, replace

from repa_fast.cost.encoder import cached_target_ops, encoder_ops
from repa_fast.cost.fixed import clip_ops, comm_ops, ema_ops, optimizer_ops
from repa_fast.cost.hardware import Card, Efficiency
from repa_fast.cost.ops import PARTS, Op
from repa_fast.cost.shapes import encoder_params, numel, sit_params, sit_shape
from repa_fast.cost.sit import Policy, SiTStep
from repa_fast.cost.structure import StepStructure
from repa_fast.flops import repa_step_flops
from repa_fast.models.encoder_archs import encoder_arch

GB = 1e9
_BLOCK = re.compile(r"b\d+\.")  # names of the ops inside SiT blocks (repa_fast.cost.sit.SiTStep.block)


@dataclass(frozen=True)
class Config:
    """What is trained, at which per-GPU batch and on how many GPUs (the structure says how)."""

    model: str = "SiT-XL/2"
    enc_types: tuple = ("dinov2-vit-b",)
    resolution: int = 256
    batch: int = 32  # per GPU
    world: int = 1
    encoder_depth: int = 8
    projector_dim: int = 2048
    cached_bytes: int = 2  # bytes per stored target value under --targets cached (fp16)

    def shape(self):
        z = tuple(encoder_arch(e).embed_dim for e in self.enc_types)
        return sit_shape(self.model, self.resolution, z, self.encoder_depth, projector_dim=self.projector_dim)

    @property
    def encoder_grid(self) -> int:
        return self.resolution // 16


def param_counts(cfg: Config) -> tuple[float, int, float]:
    """(trainable elements, trainable tensors, frozen elements) of the SiT."""
    params = sit_params(cfg.shape())
    trainable = [numel(s) for _, s, t in params if t]
    return float(sum(trainable)), len(trainable), float(sum(numel(s) for _, s, t in params if not t))


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
# Memory
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Memory:
    parts_gb: dict = field(default_factory=dict)

    @property
    def total_gb(self) -> float:
        return sum(self.parts_gb.values())


def _activations(ops: list[Op], st: StepStructure, depth: int, batch_md: float) -> float:
    saved = sum(o.saved for o in ops if o.stage == "fwd")
    if st.act_ckpt != "full":
        return saved
    in_blocks = sum(o.saved for o in ops if o.stage == "fwd" and _BLOCK.match(o.name))
    per_block = in_blocks / depth
    return saved - in_blocks + depth * 4 * batch_md + per_block  # block inputs kept, one block recomputed at a time


def memory(cfg: Config, st: StepStructure, eff: Efficiency, policy: Policy = Policy()) -> Memory:
    """Predicted peak bytes per GPU by part (GB = 1e9 bytes)."""
    sh = cfg.shape()
    P, _, frozen = param_counts(cfg)
    W = cfg.world
    shard_state = W if st.shards_optimizer else 1
    sit = SiTStep(sh, st, cfg.batch, policy).ops()
    act = _activations(sit, st, sh.depth, cfg.batch * sh.tokens * sh.dim)
    lin = sum(numel(s) for n, s, t in sit_params(sh) if t and "embedding" not in n)
    enc = 0.0 if st.targets == "cached" else sum(4.0 * encoder_params(encoder_arch(e)) for e in cfg.enc_types)
    B = cfg.batch
    data = B * (3 * cfg.resolution**2 + 4 * 2 * sh.latent_numel)
    transient = 2 * SiTStep(sh, st, cfg.batch, policy).largest_backward_write()
    parts = {
        "weights": 4 * (P + frozen) / (W if st.parallel == "fsdp" else 1),
        "grads": 4 * P / (W if st.parallel in ("zero2", "fsdp") else 1)
        + (4 * P if st.parallel == "ddp" and W > 1 else 0),
        "optimizer": 8 * P / shard_state,
        "ema": 4 * P / (W if (st.shard_ema or st.parallel == "fsdp") else 1),
        "weight_copies": (0 if st.amp == "no" else 2) * lin,
        "activations": act,
        "encoder": enc + (0 if st.targets == "cached" else data - B * 4 * 2 * sh.latent_numel),
        "batch": B * 4 * 2 * sh.latent_numel,
        "transient": transient,
    }
    parts["allocator"] = eff.fragmentation * sum(parts.values())
    parts["reserved"] = eff.reserved_gb * GB
    return Memory({k: v / GB for k, v in parts.items()})


def max_batch(cfg: Config, st: StepStructure, card: Card, eff: Efficiency, policy: Policy = Policy(), cap=8192) -> int:
    """The largest per-GPU batch whose predicted peak fits ``card.memory_gb`` (0 if none does). The estimate is
    affine in the batch, so two evaluations place it and a few more confirm it."""

    def fits(b: int) -> bool:
        return memory(replace(cfg, batch=b), st, eff, policy).total_gb <= card.memory_gb

    m1, m2 = (memory(replace(cfg, batch=b), st, eff, policy).total_gb for b in (1, 2))
    if m1 > card.memory_gb:
        return 0
    b = min(cap, max(1, int((card.memory_gb - m1) / max(m2 - m1, 1e-12)) + 1))
    while b > 1 and not fits(b):
        b -= 1
    while b < cap and fits(b + 1):
        b += 1
    return b


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
        "world": cfg.world,
    }
