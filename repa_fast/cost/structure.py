"""The step structure the cost model prices: one switch per design choice, and the named configurations.

``StepStructure`` says what each kernel of a step does (dtypes it writes, which ops are fused, which optimizer, EMA
and clipping passes run, how state is sharded, what is recomputed); ``repa_fast.cost.step`` turns it into kernels
with bytes and FLOPs. The presets:
- ``REFERENCE``: sihyun-yu/REPA's train.py step (fp16 autocast via accelerate, timm SiT blocks with fp32 residual,
  LayerNorm and modulation, DINOv2 from torch.hub whose attention falls back to an explicit softmax without
  xformers, the per-sample projection-loss loop, foreach AdamW after GradScaler's unscale and a separate
  clip_grad_norm_, the per-parameter EMA loop, three .item() per step): train.py:295-371, loss.py:52-90,
  models/sit.py:106-157, train.py:81-91.
- ``BEFORE_ISSUE_18``: repa_fast as its second wave left it, before issue 18's cuts: fused adaLN kernels that write
  fp32 under autocast, bias + GELU and the MLP's gated residual unfused, the residual D-strided in block 0
  (PatchEmbed's ``flatten(2).transpose(1, 2)``), clipping as its own foreach pass, torch's fused AdamW, the EMA in
  three foreach passes, FlashAttention-2, no host synchronisation. Kept as the row the cuts are measured from.
- ``AS_BUILT`` (``OURS``): the code as it is now, every merged cut applied (``cuts()`` lists them): a contiguous
  residual stream (models/sit.py PatchEmbed), the one-pass EMA kernel (kernels/ema_update.py), clipping folded into
  the fused AdamW step (engine/parallel/base.py ``clip_and_step``), adaLN kernels writing bf16 where a GEMM reads
  them, the bias + GELU kernel and the gated-residual kernel (kernels/bias_gelu.py, kernels/adaln.py), cuDNN
  attention (kernels/attention.py's "auto" on sm90 without FlashAttention-3), the EMA sliced over the ranks
  (engine/parallel/slices.py). fp8 (engine/fp8.py) and activation checkpointing (engine/activation_checkpoint.py)
  are options of it: ``fp8="tensorwise"``, ``act_ckpt="mlp"``.
- ``cuts()``: ``BEFORE_ISSUE_18``, then issue 18's cuts applied one after the other (2a..2f; the last row is
  ``AS_BUILT``), then the options and further steps that close a gap; each row names what it changes.
"""

from dataclasses import dataclass, replace

ATTN_BACKENDS = ("flash2", "flash3", "cudnn", "sdpa-flash", "math")
PARALLEL = ("none", "ddp", "zero1", "zero2", "fsdp")
AC_MODES = ("none", "full", "mlp", "every:K")  # engine/activation_checkpoint.py AC_MODES


def parse_act_ckpt(mode: str) -> tuple[str, int]:
    """``"none"`` -> ("none", 0), ``"full"`` -> ("every", 1), ``"every:K"`` -> ("every", K), ``"mlp"`` -> ("mlp", 1):
    engine/activation_checkpoint.py ``parse_ac_mode`` without torch (tests/test_cost.py checks they agree)."""
    if mode == "none":
        return "none", 0
    if mode in ("full", "mlp"):
        return ("every", 1) if mode == "full" else ("mlp", 1)
    head, _, k = mode.partition(":") if isinstance(mode, str) else ("", "", "")
    if head == "every" and k.isdigit() and int(k) >= 1:
        return "every", int(k)
    raise ValueError(f"StepStructure.act_ckpt={mode!r}; choose none, full, mlp or every:K (K >= 1)")


@dataclass(frozen=True)
class StepStructure:
    name: str
    amp: str = "bf16"  # autocast dtype: "bf16" | "fp16" | "no" (fp32 everywhere)
    impl: str = "triton"  # adaLN / gated residual / bias + GELU / alignment loss: Triton kernels or their references
    adaln_out: str = "amp"  # what the fused adaLN kernels write under autocast: "fp32" (before cut 2d) | "amp"
    # fc1 bias + GELU: "unfused" (addmm with the bias in cuBLAS's epilogue, then a gelu kernel and, in the backward,
    # gelu_backward and fc1's bias-gradient reduction) | "kernel" (cut 2d, kernels/bias_gelu.py: fc1 as an mm without
    # bias, one bias + GELU kernel, a backward that also writes the bias gradient's partial sums) | "epilogue" (GELU
    # in the GEMM epilogue, keeping its input for the backward, and dGELU in fc2's input-gradient epilogue, as
    # cuBLASLt's GELU_AUX / DGELU epilogues do; not built).
    bias_gelu: str = "kernel"
    # x + gate * mlp(h): "unfused" (mul, add) | "kernel" (cut 2d, kernels/adaln.py ``gated_residual``) |
    # "next_block" (folded into the next block's adaLN kernel; not built)
    mlp_gate: str = "kernel"
    contiguous_residual: bool = True  # cut 2a: (N, T, D) contiguous from the patch embedding on
    attn_backend: str = "cudnn"  # SiT attention kernel (ATTN_BACKENDS)
    attn_glue: str = "unbind"  # q, k, v from the qkv output: "unbind" (ours: views; stack in the backward) | "timm"
    encoder: str = "ours"  # "ours" (repa_fast DINOv2, attention through kernels.attention) | "hub" (torch.hub code)
    encoder_attn: str = "cudnn"  # the encoder's attention kernel
    encoder_weights: str = "fp32"  # frozen encoder weights "fp32" (cast at every use) | "amp" (stored in bf16)
    targets: str = "computed"  # "computed" (encoder every step) | "cached" (repa_fast.data.cache_targets)
    loss: str = "fused"  # alignment loss: "fused" (one cosine kernel over all rows) | "per_sample" (reference loop)
    optimizer: str = "fused"  # AdamW: "fused" (torch fused=True, one pass) | "foreach" (torch's CUDA default)
    # "separate" (norm + foreach scale pass) | "in_step" (cut 2c: one norm, the clip as the fused step's grad_scale,
    # which makes the step write the gradients back) | "norm_only" (--max-grad-norm 0: the norm is still computed, as
    # the non-finite check, and the step gets no grad_scale) | "off" (no norm at all)
    clip: str = "in_step"
    grad_scaler: bool = False  # fp16 GradScaler: an unscale pass over the gradients and a host read of found_inf
    ema: str = "one_pass"  # "per_param" (reference loop, 2 kernels per tensor) | "foreach3" | "one_pass" (cut 2b)
    ema_frozen: bool = False  # the reference also averages the frozen pos_embed
    parallel: str = "none"  # PARALLEL: ZeRO-1/2 and FSDP2 shard the optimizer state
    shard_ema: bool = True  # cut 2f: the EMA sliced over the ranks (DDP, ZeRO-1/2) or sharded (FSDP2, ZeRO-3)
    fp8: str = "none"  # "none" | "tensorwise" | "rowwise": torchao float8 on the block token linears (engine/fp8.py)
    fp8_casts: str = "separate"  # "separate" (amax + cast passes per tensor) | "fused" (the producer writes fp8)
    act_ckpt: str = "none"  # AC_MODES: what engine/activation_checkpoint.py recomputes in the backward
    weights: str = "fp32"  # "fp32" (autocast casts each weight at each use) | "bf16_copy" (optimizer writes bf16)
    wgrad: str = "cast"  # weight gradients: "cast" (GEMM writes bf16, cast to fp32) | "fp32" (GEMM writes fp32)
    cuda_graphs: bool = False  # no host dispatch cost
    host_syncs: int = 0  # device -> host reads per step
    note: str = ""

    def __post_init__(self):
        for name, value, allowed in (
            ("amp", self.amp, ("bf16", "fp16", "no")),
            ("impl", self.impl, ("triton", "ref")),
            ("adaln_out", self.adaln_out, ("fp32", "amp")),
            ("bias_gelu", self.bias_gelu, ("unfused", "kernel", "epilogue")),
            ("mlp_gate", self.mlp_gate, ("unfused", "kernel", "next_block")),
            ("attn_backend", self.attn_backend, ATTN_BACKENDS),
            ("encoder_attn", self.encoder_attn, ATTN_BACKENDS),
            ("parallel", self.parallel, PARALLEL),
            ("fp8", self.fp8, ("none", "tensorwise", "rowwise")),
            ("fp8_casts", self.fp8_casts, ("separate", "fused")),
            ("clip", self.clip, ("separate", "in_step", "norm_only", "off")),
            ("ema", self.ema, ("per_param", "foreach3", "one_pass")),
            ("optimizer", self.optimizer, ("fused", "foreach")),
        ):
            if value not in allowed:
                raise ValueError(f"StepStructure.{name}={value!r}; choose one of {allowed}")
        parse_act_ckpt(self.act_ckpt)

    @property
    def amp_bytes(self) -> int:
        """Bytes of the matmul operand dtype: 2 under autocast, 4 without."""
        return 4 if self.amp == "no" else 2

    @property
    def shards_optimizer(self) -> bool:
        return self.parallel in ("zero1", "zero2", "fsdp")

    def not_built(self) -> list[str]:
        """The switches set to a design repa_fast does not implement (the rows beyond the code), as field=value."""
        return [f"{f}={getattr(self, f)}" for f, values in NOT_BUILT.items() if getattr(self, f) in values]

    def checkpointed(self, depth: int) -> tuple[list[int], bool]:
        """(blocks recomputed whole, MLP sub-blocks recomputed?): engine/activation_checkpoint.py
        ``checkpointed_modules`` (every:K: blocks K, 2K, ..., 1-indexed)."""
        kind, k = parse_act_ckpt(self.act_ckpt)
        if kind == "every":
            return [i for i in range(depth) if (i + 1) % k == 0], False
        return [], kind == "mlp"


NOT_BUILT = {  # values of a switch that only a structure beyond the code has (no module of repa_fast runs them)
    "bias_gelu": ("epilogue",),
    "mlp_gate": ("next_block",),
    "fp8_casts": ("fused",),
    "weights": ("bf16_copy",),
    "wgrad": ("fp32",),
    "cuda_graphs": (True,),
}

REFERENCE = StepStructure(
    name="reference",
    amp="fp16",
    impl="ref",
    adaln_out="fp32",
    bias_gelu="unfused",
    mlp_gate="unfused",
    contiguous_residual=False,
    attn_backend="sdpa-flash",  # timm Attention with fused_attn -> F.scaled_dot_product_attention -> flash (FA2)
    attn_glue="timm",
    encoder="hub",
    encoder_attn="math",
    loss="per_sample",
    optimizer="foreach",
    clip="separate",
    grad_scaler=True,
    ema="per_param",
    ema_frozen=True,
    parallel="ddp",
    shard_ema=False,
    host_syncs=4,  # loss, proj_loss and grad_norm .item() (train.py:365-371) + GradScaler's found_inf check
    note="sihyun-yu/REPA train.py step: fp16, unfused, foreach AdamW + clip + per-parameter EMA",
)

BEFORE_ISSUE_18 = StepStructure(
    name="ours before issue 18 (wave 2)",
    adaln_out="fp32",
    bias_gelu="unfused",
    mlp_gate="unfused",
    contiguous_residual=False,
    attn_backend="flash2",
    encoder_attn="flash2",
    clip="separate",
    ema="foreach3",
    shard_ema=False,
    note="fused adaLN kernels writing fp32, FA2, foreach clip, 3-pass EMA",
)

# The cuts of issue 18 as merged, in order (each a change of the row above). AS_BUILT is the last row.
CUTS = (
    ("+2a contiguous residual", dict(contiguous_residual=True)),
    ("+2b one-pass EMA", dict(ema="one_pass")),
    ("+2c clip in the optimizer step", dict(clip="in_step")),
    (
        "+2d bf16 adaLN outputs, bias+GELU and gated-residual kernels",
        dict(adaln_out="amp", bias_gelu="kernel", mlp_gate="kernel"),
    ),
    ("+2e cuDNN attention", dict(attn_backend="cudnn", encoder_attn="cudnn")),
)
_CUT_2F = dict(shard_ema=True)  # the last cut: its row is AS_BUILT itself

AS_BUILT = StepStructure(
    name="ours (as built)",
    note="= the row above + 2f (EMA sliced over the ranks): every merged cut (repa_fast as it is)",
)
OURS = AS_BUILT  # the name the first version of this package exported (its docstring's example)


def cuts(world_size: int = 1) -> list[StepStructure]:
    """BEFORE_ISSUE_18, issue 18's cuts applied cumulatively (the last is AS_BUILT), then the options of AS_BUILT
    and what goes beyond it."""
    parallel = "ddp" if world_size > 1 else "none"
    rows = [replace(BEFORE_ISSUE_18, parallel=parallel)]
    for name, change in CUTS:
        rows.append(replace(rows[-1], name=name, note="", **change))
    rows.append(replace(rows[-1], name=AS_BUILT.name, note=AS_BUILT.note, **_CUT_2F))
    beyond = [("+ZeRO-2 (optimizer state sharded)", dict(parallel="zero2"))] if world_size > 1 else []
    beyond += [
        ("+cached targets", dict(targets="cached")),
        ("+fp8 tensorwise (torchao casts)", dict(fp8="tensorwise")),
        ("+fp8 casts fused into producers", dict(fp8_casts="fused")),
        ("+bf16 weight copies, fp32 wgrad", dict(weights="bf16_copy", wgrad="fp32")),
        ("+MLP gate fused into the next adaLN, CUDA graphs", dict(mlp_gate="next_block", cuda_graphs=True)),
    ]
    for name, change in beyond:
        rows.append(replace(rows[-1], name=name, note="", **change))
    return rows


def alternatives(rows: list[StepStructure]) -> list[StepStructure]:
    """Variants not on the cumulative path: the last row with fp8 rowwise or without fp8, and the as-built row
    with fp8 alone or with activation checkpointing (which trade recompute for a larger batch)."""
    last = rows[-1]
    built = next(r for r in rows if r.name == AS_BUILT.name)
    return [
        replace(last, name="alt: last row with fp8 rowwise", fp8="rowwise", note="instead of tensorwise"),
        replace(last, name="alt: last row without fp8", fp8="none", fp8_casts="separate", note="bf16 GEMMs"),
        replace(built, name="alt: as built + fp8 tensorwise", fp8="tensorwise", note="--fp8 tensorwise"),
        replace(built, name="alt: as built + AC mlp", act_ckpt="mlp", note="--activation-checkpointing mlp"),
        replace(built, name="alt: as built + AC full", act_ckpt="full", note="--activation-checkpointing full"),
    ]
