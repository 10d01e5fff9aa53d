"""Predicted peak memory per GPU by part, the largest per-GPU batch that fits, and what ``train.py --dry-run`` prints
and proposes (issue 18 item 2g).

The peak is at the start of the backward: the parameters, their gradients, AdamW's two moments, the EMA, the
tensors autograd keeps for the backward (activations and the bf16 weight copies autocast made, both from
``repa_fast.cost.sit``'s op list, checked against real steps by tests/test_cost_crosscheck.py), the target encoder
and the batch, plus the backward's transients (its largest output twice; with activation checkpointing, one
recomputed block or MLP at a time). Sharding divides what the backend shards (engine/parallel: ZeRO-1/2 the
optimizer state, ZeRO-2 the gradients, FSDP2 / ZeRO-3 everything; the EMA is sliced over the ranks under DDP and
ZeRO-1/2). The caching allocator's overhead and the memory no tensor can use (CUDA context, workspaces) are
``Efficiency.fragmentation`` and ``Efficiency.reserved_gb``. Everything is a prediction (GB = 1e9 bytes).

Per SiT block and image, as built (impl="triton", bf16 autocast; T tokens, width D, H heads), the bytes autograd
keeps (``block_activation_bytes``, measured on CPU under engine/activation_checkpoint.py by the tests):
    none: 40 T D + 4 H T + 18 D     mlp: none - 16 T D     full: 4 T D + 4 D     every:K: depth // K blocks at full
(18 D and 4 D count the conditioning c, which all blocks share: a model keeps it once), and per step the bf16
weight copies of a block (``block_weight_copy_bytes``): 36 D^2 without checkpointing, 20 D^2 with "mlp" (fc1's and
fc2's are remade in the recompute), 0 for a fully checkpointed block. fp8 Linears (engine/fp8.py) keep their fp32
master weight only: no bf16 copy.

``Setup`` holds what ``train.py --dry-run`` knows before building anything; ``memory_report(setup)`` is its table,
``fits(setup, gpu_gb)`` the verdict and ``suggest(setup, gpu_gb)`` the options that make a configuration fit.
"""

from dataclasses import dataclass, field, replace

from repa_fast.cost.hardware import Efficiency
from repa_fast.cost.shapes import Config, encoder_params, numel, param_counts, sit_params
from repa_fast.cost.sit import Policy, SiTStep
from repa_fast.cost.structure import AS_BUILT, StepStructure, parse_act_ckpt
from repa_fast.models.encoder_archs import encoder_arch

GB = 1e9


@dataclass
class Memory:
    parts_gb: dict = field(default_factory=dict)

    @property
    def total_gb(self) -> float:
        return sum(self.parts_gb.values())


def block_activation_bytes(mode: str, tokens: int, dim: int, heads: int) -> float:
    """Bytes one SiT block keeps for the backward per image (as built, bf16 autocast; the module docstring)."""
    kind, _ = parse_act_ckpt(mode)
    none = 40 * tokens * dim + 4 * heads * tokens + 18 * dim
    if kind == "every":
        return 4 * tokens * dim + 4 * dim
    return none - 16 * tokens * dim if kind == "mlp" else none


def block_weight_copy_bytes(mode: str, dim: int) -> float:
    """bf16 weight copies one SiT block keeps per step (qkv 3, proj 1, fc1 4, fc2 4, adaLN 6 D^2 weights)."""
    kind, _ = parse_act_ckpt(mode)
    return 0.0 if kind == "every" else (20.0 if kind == "mlp" else 36.0) * dim * dim


def memory(cfg: Config, st: StepStructure, eff: Efficiency, policy: Policy = Policy()) -> Memory:
    """Predicted peak bytes per GPU by part (GB = 1e9 bytes)."""
    sh = cfg.shape()
    P, _, frozen = param_counts(cfg)
    W, B = cfg.world, cfg.batch
    sit = SiTStep(sh, st, B, policy)
    kept = [o for o in sit.ops() if o.stage == "fwd" and o.saved]
    copies = sum(o.saved for o in kept if o.part == "weight_cast")
    if st.weights == "bf16_copy":  # a persistent bf16 copy the optimizer writes (not built)
        copies += 2 * sum(numel(s) for n, s, t in sit_params(sh) if t and "embedding" not in n)
    computed = st.targets != "cached"
    enc = sum(4.0 * encoder_params(encoder_arch(e)) for e in cfg.enc_types) if computed else 0.0
    targets = sum(4 * B * sh.tokens * z for z in sh.z_dims)
    parts = {
        "weights": 4 * (P + frozen) / (W if st.parallel == "fsdp" else 1),
        "grads": 4 * P / (W if st.parallel in ("zero2", "fsdp") else 1)
        + (4 * P if st.parallel == "ddp" and W > 1 else 0),  # DDP's gradient buckets
        "optimizer": 8 * P / (W if st.shards_optimizer else 1),
        "ema": 4 * P / (W if (st.shard_ema or st.parallel == "fsdp") else 1),
        "weight_copies": copies,
        "activations": sum(o.saved for o in kept if o.part != "weight_cast"),
        "encoder": enc + (B * 3 * cfg.resolution**2 if computed else 0.0),  # weights, the uint8 images
        "batch": B * 4 * 2 * sh.latent_numel + targets,  # the latent moments and the targets
        "transient": 2 * sit.largest_backward_write() + sit.recompute_peak(),
    }
    parts["allocator"] = eff.fragmentation * sum(parts.values())
    parts["reserved"] = eff.reserved_gb * GB
    return Memory({k: v / GB for k, v in parts.items()})


def max_batch(cfg: Config, st: StepStructure, card, eff: Efficiency, policy: Policy = Policy(), cap=8192) -> int:
    """The largest per-GPU batch whose predicted peak fits ``card.memory_gb`` (a Card, or a number of GB; 0 if none
    does). The estimate is affine in the batch, so two evaluations place it and a few more confirm it."""
    budget = getattr(card, "memory_gb", card)

    def total(b: int) -> float:
        return memory(replace(cfg, batch=b), st, eff, policy).total_gb

    m1, m2 = total(1), total(2)
    if m1 > budget:
        return 0
    b = min(cap, max(1, int((budget - m1) / max(m2 - m1, 1e-12)) + 1))
    while b > 1 and total(b) > budget:
        b -= 1
    while b < cap and total(b + 1) <= budget:
        b += 1
    return b


# ---------------------------------------------------------------------------------------------------------------
# train.py --dry-run
# ---------------------------------------------------------------------------------------------------------------
PARALLEL_NAMES = {  # the backend as train.py runs it -> the cost model's accounting
    "none": "none",
    "ddp": "ddp",
    "zero1": "zero1",  # --parallel deepspeed, ZeRO stage 1
    "zero2": "zero2",
    "zero3": "fsdp",  # ZeRO-3 shards parameters, gradients and state like FSDP2
    "fsdp": "fsdp",
}


@dataclass(frozen=True)
class Setup:
    """A training configuration as ``train.py --dry-run`` has it before building anything. ``batch`` is the per-GPU
    micro-batch (global batch / (world x accumulation)); ``parallel`` one of ``PARALLEL_NAMES``."""

    model: str = "SiT-XL/2"
    enc_types: tuple = ("dinov2-vit-b",)
    resolution: int = 256
    batch: int = 32
    world: int = 1
    accumulation: int = 1
    parallel: str = "none"
    amp: str = "bf16"  # "bf16" | "fp16" | "no"
    targets: str = "computed"  # "computed" | "cached"
    act_ckpt: str = "none"  # engine/activation_checkpoint.py mode
    fp8: str = "none"  # "none" | "tensorwise" | "rowwise"
    impl: str = "triton"  # the kernels a GPU runs (--kernels auto on CUDA)
    reg: bool = False
    projection_layer_type: str = "mlp"
    proj_kernel_size: int = 3
    encoder_depth: int = 8
    projector_dim: int = 2048

    def __post_init__(self):
        if self.parallel not in PARALLEL_NAMES:
            raise ValueError(f"Setup.parallel={self.parallel!r}; choose one of {tuple(PARALLEL_NAMES)}")
        if self.batch < 1 or self.accumulation < 1 or self.world < 1:
            raise ValueError(f"Setup: batch, accumulation and world must be >= 1, got {self}")

    @property
    def global_batch(self) -> int:
        return self.batch * self.world * self.accumulation

    def config(self) -> Config:
        return Config(
            self.model,
            tuple(self.enc_types),
            self.resolution,
            self.batch,
            self.world,
            self.encoder_depth,
            self.projector_dim,
            reg=self.reg,
            projection_layer_type=self.projection_layer_type,
            proj_kernel_size=self.proj_kernel_size,
        )

    def structure(self) -> StepStructure:
        parallel = PARALLEL_NAMES[self.parallel] if self.world > 1 else "none"
        return replace(
            AS_BUILT,
            name="dry-run",
            amp=self.amp,
            impl=self.impl,
            targets=self.targets,
            act_ckpt=self.act_ckpt,
            fp8=self.fp8,
            parallel=parallel,
        )


def memory_report(setup: Setup, eff: Efficiency = Efficiency()) -> list[tuple[str, float]]:
    """[(part, predicted GB per GPU), ...] in the order of ``memory``, then ("total", GB)."""
    mem = memory(setup.config(), setup.structure(), eff)
    return [*mem.parts_gb.items(), ("total", mem.total_gb)]


def fits(setup: Setup, gpu_gb: float, eff: Efficiency = Efficiency()) -> bool:
    """Is the predicted peak per GPU within ``gpu_gb`` (the visible GPU's memory, GB = 1e9 bytes)?"""
    return memory_report(setup, eff)[-1][1] <= gpu_gb


@dataclass(frozen=True)
class Option:
    """A change that makes a setup fit: the per-GPU micro-batch and accumulation (same global batch) and the
    activation checkpointing mode, with the flags to pass and the predicted peak."""

    batch: int
    accumulation: int
    act_ckpt: str
    predicted_gb: float
    flags: str


AC_ORDER = ("mlp", "every:2", "full")  # least recompute first


def suggest(setup: Setup, gpu_gb: float, eff: Efficiency = Efficiency(), limit: int = 4) -> list[Option]:
    """Options that make ``setup`` fit ``gpu_gb`` (empty if it fits already), cheapest first: activation
    checkpointing at the same micro-batch (least recompute first), then the largest micro-batch that divides the
    per-GPU batch with gradient accumulation making up the rest (same global batch), then both."""
    if fits(setup, gpu_gb, eff):
        return []
    per_gpu = setup.batch * setup.accumulation
    out = []
    for mode in AC_ORDER if setup.act_ckpt == "none" else ():
        candidate = replace(setup, act_ckpt=mode)
        if fits(candidate, gpu_gb, eff):
            out.append(_option(candidate, eff))
            break
    for mode in (setup.act_ckpt,) + (("full",) if setup.act_ckpt != "full" else ()):
        micro = _largest_micro_batch(replace(setup, act_ckpt=mode), per_gpu, gpu_gb, eff)
        if micro:
            out.append(_option(replace(setup, act_ckpt=mode, batch=micro, accumulation=per_gpu // micro), eff))
    return out[:limit]


def _largest_micro_batch(setup: Setup, per_gpu: int, gpu_gb: float, eff: Efficiency) -> int:
    for micro in sorted((d for d in range(1, per_gpu + 1) if per_gpu % d == 0), reverse=True):
        if micro < setup.batch * setup.accumulation and fits(replace(setup, batch=micro, accumulation=1), gpu_gb, eff):
            return micro
    return 0


def _option(setup: Setup, eff: Efficiency) -> Option:
    flags = [f"--gradient-accumulation-steps {setup.accumulation}"] if setup.accumulation > 1 else []
    flags += [f"--activation-checkpointing {setup.act_ckpt}"] if setup.act_ckpt != "none" else []
    gb = memory_report(setup, eff)[-1][1]
    return Option(setup.batch, setup.accumulation, setup.act_ckpt, gb, " ".join(flags))
