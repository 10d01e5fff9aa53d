"""The step structure the cost model prices: one switch per design choice, and the named configurations.

``StepStructure`` says what each kernel of a step does (dtypes it writes, which ops are fused, which optimizer, EMA
and clipping passes run, how state is sharded); ``repa_fast.cost.step`` turns it into kernels with bytes and FLOPs.
Three families of presets:
- ``REFERENCE``: sihyun-yu/REPA's train.py step (fp16 autocast via accelerate, timm SiT blocks with fp32 residual,
  LayerNorm and modulation, DINOv2 from torch.hub whose attention falls back to an explicit softmax without
  xformers, the per-sample projection-loss loop, foreach AdamW after GradScaler's unscale and a separate
  clip_grad_norm_, the per-parameter EMA loop, three .item() per step): train.py:295-371, loss.py:52-90,
  models/sit.py:106-157, train.py:81-91.
- ``OURS``: repa_fast as built today (models/sit.py, kernels/adaln.py, engine/ema.py, engine/parallel/base.py):
  fused adaLN kernels that write fp32 under autocast, bias + GELU and the MLP's gated residual unfused, the
  residual D-strided in block 0 (PatchEmbed's ``flatten(2).transpose(1, 2)``), clipping as its own foreach pass,
  torch's fused AdamW, the EMA in three foreach passes, no host synchronisation.
- ``cuts()``: OURS with issue 18's cuts applied one after the other (2a..2f), then cached targets, fp8 and the
  further steps that close a gap; each row names what it changes.
"""

from dataclasses import dataclass, replace

ATTN_BACKENDS = ("flash2", "flash3", "cudnn", "sdpa-flash", "math")
PARALLEL = ("none", "ddp", "zero1", "zero2", "fsdp")


@dataclass(frozen=True)
class StepStructure:
    name: str
    amp: str = "bf16"  # autocast dtype: "bf16" | "fp16" | "no" (fp32 everywhere)
    impl: str = "triton"  # adaLN / gated residual / alignment loss: fused Triton kernels or their PyTorch references
    adaln_out: str = "fp32"  # what the fused adaLN kernels write under autocast: "fp32" (today) | "amp" (cut 2d)
    # fc1 bias + GELU: "unfused" (addmm with the bias in cuBLAS's epilogue, then a gelu kernel) | "epilogue" (cut 2d:
    # GELU in the GEMM epilogue, keeping its input for the backward, and dGELU in fc2's input-gradient epilogue, as
    # cuBLASLt's GELU_AUX / DGELU epilogues do). torch.compile's split, an mm then one bias + GELU kernel, moves the
    # same forward bytes as "unfused" (cuBLAS already adds the bias in its epilogue).
    bias_gelu: str = "unfused"
    mlp_gate: str = "unfused"  # x + gate * mlp(h): "unfused" (mul, add) | "fused" (one kernel) | "next_block"
    contiguous_residual: bool = False  # cut 2a: (N, T, D) contiguous from the patch embedding on
    attn_backend: str = "flash2"  # SiT attention kernel (ATTN_BACKENDS)
    attn_glue: str = "unbind"  # q, k, v from the qkv output: "unbind" (ours: views; stack in the backward) | "timm"
    encoder: str = "ours"  # "ours" (repa_fast DINOv2, attention through kernels.attention) | "hub" (torch.hub code)
    encoder_attn: str = "flash2"  # the encoder's attention kernel
    encoder_weights: str = "fp32"  # frozen encoder weights "fp32" (cast at every use) | "amp" (stored in bf16)
    targets: str = "computed"  # "computed" (encoder every step) | "cached" (repa_fast.data.cache_targets)
    loss: str = "fused"  # alignment loss: "fused" (one cosine kernel over all rows) | "per_sample" (reference loop)
    optimizer: str = "fused"  # AdamW: "fused" (torch fused=True, one pass) | "foreach" (torch's CUDA default)
    clip: str = "separate"  # "separate" (norm + foreach scale pass) | "in_step" (norm, scale inside the step) | "off"
    grad_scaler: bool = False  # fp16 GradScaler: an unscale pass over the gradients and a host read of found_inf
    ema: str = "foreach3"  # "per_param" (reference loop, 2 kernels per tensor) | "foreach3" (today) | "one_pass"
    ema_frozen: bool = False  # the reference also averages the frozen pos_embed
    parallel: str = "none"  # PARALLEL: ZeRO-1/2 and FSDP2 shard the optimizer state
    shard_ema: bool = False  # cut 2f: the EMA sharded like the optimizer state
    fp8: str = "none"  # "none" | "tensorwise" | "rowwise": torchao float8 on the block linears
    fp8_casts: str = "separate"  # "separate" (amax + cast passes per tensor) | "fused" (the producer writes fp8)
    act_ckpt: str = "none"  # "none" | "full" (every block recomputed in the backward)
    weights: str = "fp32"  # "fp32" (autocast casts each weight at each use) | "bf16_copy" (optimizer writes bf16)
    wgrad: str = "cast"  # weight gradients: "cast" (GEMM writes bf16, cast to fp32) | "fp32" (GEMM writes fp32)
    cuda_graphs: bool = False  # no host dispatch cost
    host_syncs: int = 0  # device -> host reads per step
    note: str = ""

    def __post_init__(self):
        for name, value, allowed in (
            ("amp", self.amp, ("bf16", "fp16", "no")),
            ("impl", self.impl, ("triton", "ref")),
            ("attn_backend", self.attn_backend, ATTN_BACKENDS),
            ("encoder_attn", self.encoder_attn, ATTN_BACKENDS),
            ("parallel", self.parallel, PARALLEL),
            ("fp8", self.fp8, ("none", "tensorwise", "rowwise")),
            ("fp8_casts", self.fp8_casts, ("separate", "fused")),
            ("clip", self.clip, ("separate", "in_step", "off")),
            ("ema", self.ema, ("per_param", "foreach3", "one_pass")),
            ("optimizer", self.optimizer, ("fused", "foreach")),
            ("act_ckpt", self.act_ckpt, ("none", "full")),
        ):
            if value not in allowed:
                raise ValueError(f"StepStructure.{name}={value!r}; choose one of {allowed}")

    @property
    def amp_bytes(self) -> int:
        """Bytes of the matmul operand dtype: 2 under autocast, 4 without."""
        return 4 if self.amp == "no" else 2

    @property
    def shards_optimizer(self) -> bool:
        return self.parallel in ("zero1", "zero2", "fsdp")


REFERENCE = StepStructure(
    name="reference",
    amp="fp16",
    impl="ref",
    attn_backend="sdpa-flash",  # timm Attention with fused_attn -> F.scaled_dot_product_attention -> flash (FA2)
    attn_glue="timm",
    encoder="hub",
    encoder_attn="math",
    loss="per_sample",
    optimizer="foreach",
    grad_scaler=True,
    ema="per_param",
    ema_frozen=True,
    parallel="ddp",
    host_syncs=4,  # loss, proj_loss and grad_norm .item() (train.py:365-371) + GradScaler's found_inf check
    note="sihyun-yu/REPA train.py step: fp16, unfused, foreach AdamW + clip + per-parameter EMA",
)

OURS = StepStructure(name="ours (as built)", note="repa_fast today: fused adaLN kernels writing fp32, FA2")


def cuts(world_size: int = 1) -> list[StepStructure]:
    """OURS, then issue 18's cuts applied cumulatively, then what goes beyond them."""
    steps = [
        ("+2a contiguous residual", dict(contiguous_residual=True)),
        ("+2b one-pass EMA", dict(ema="one_pass")),
        ("+2c clip in the optimizer step", dict(clip="in_step")),
        ("+2d bf16 adaLN outputs, bias+GELU fused", dict(adaln_out="amp", bias_gelu="epilogue")),
        ("+2e cuDNN attention", dict(attn_backend="cudnn", encoder_attn="cudnn")),
        ("+2f optimizer and EMA sharded", dict(parallel="zero2" if world_size > 1 else "none", shard_ema=True)),
        ("+cached targets", dict(targets="cached")),
        ("+fp8 tensorwise (torchao casts)", dict(fp8="tensorwise")),
        ("+fp8 casts fused into producers", dict(fp8_casts="fused")),
        ("+bf16 weight copies, fp32 wgrad", dict(weights="bf16_copy", wgrad="fp32")),
        ("+MLP gate fused into the next adaLN, CUDA graphs", dict(mlp_gate="next_block", cuda_graphs=True)),
    ]
    base = replace(OURS, parallel="ddp" if world_size > 1 else "none")
    rows = [base]
    for name, change in steps:
        rows.append(replace(rows[-1], name=name, note="", **change))
    return rows


def alternatives(rows: list[StepStructure]) -> list[StepStructure]:
    """Variants of the last row that are not on the cumulative path: fp8 rowwise, and no fp8 at all."""
    last = rows[-1]
    return [
        replace(last, name="alt: last row with fp8 rowwise", fp8="rowwise", note="instead of tensorwise"),
        replace(last, name="alt: last row without fp8", fp8="none", fp8_casts="separate", note="bf16 GEMMs"),
    ]
