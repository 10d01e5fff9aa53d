"""Training configuration: nested dataclasses with flat, unique field names.

Every field is a reference ``train.py`` flag (same name with ``-`` for ``_``, same meaning and default unless its
doc says otherwise) or a repa_fast addition. The CLI, the ``"trainer"`` section of a ``--config`` JSON file and the
written ``<run_dir>/config.json`` all use the flat names, so a user's reference command line keeps working.
Precedence: defaults < preset < --config file < explicit CLI flags.
"""

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str = _f("SiT-XL/2", "SiT_models name (SiT-{S,B,L,XL}/{2,4,8}; SiT-T/* is a tiny demo size)")
    encoder_depth: int = _f(8, "1-indexed block whose output is aligned (8 for L/XL, 4 for B)")
    projector_dim: int = _f(2048, "hidden width of the REPA projector MLP")
    qk_norm: bool = _f(False, "per-head LayerNorm on q and k")
    fused_attn: bool = _f(True, "fused attention (SDPA/FlashAttention); off = explicit softmax as timm's manual path")
    use_rope: bool = _f(False, "2-D axial RoPE on q and k (ERW/LightningDiT); off in the reference")
    kernels: str = _f("auto", "fused kernels: auto (Triton on CUDA), triton, ref", choices=("auto", "triton", "ref"))
    compile: bool = _f(False, "torch.compile each SiT block (repeated structure compiles once)")
    compile_backend: str = _f("inductor", "torch.compile backend for --compile (e.g. inductor, aot_eager, cudagraphs)")
    cfg_prob: float = _f(0.1, "label dropout probability (the reference hard-codes 0.1 in the model; here it is real)")
    legacy: bool = _f(False, "reference quirk: drop labels a second time in the loop (effective 19% at 0.1)")


@dataclass
class TargetConfig:
    enc_type: str = _f("dinov2-vit-b", "comma-separated target encoders, e.g. dinov2-vit-b,dinov2-vit-l")
    encoder_checkpoint_dir: str | None = _f(None, "directory with the encoder weight files (default: torch hub cache)")
    encoder_pretrained: bool = _f(True, "load encoder weights; off = random init (demo and tests only)")
    encoder_grid: int | None = _f(
        None, "encoder token grid (default resolution // 16 as the reference; the demo sets it to the SiT grid)"
    )


@dataclass
class DataConfig:
    data_dir: str | None = _f(None, "dataset: reference layout (images/ + vae-sd/) or packed; none = demo data")
    dataset: str = _f(
        "auto", "auto (from data_dir), digits (scikit-learn digits, the embedded demo)", choices=("auto", "digits")
    )
    resolution: int = _f(256, "image resolution (256 or 512 in the reference)")
    num_classes: int = _f(1000, "number of classes (the null class is num_classes)")
    num_workers: int = _f(4, "DataLoader workers per process")
    latent_scale: float = _f(0.18215, "x0 = (mean + std * eps) * latent_scale (SD-VAE); 1.0 in pixel space")
    vae: str | None = _f(None, "local diffusers AutoencoderKL directory to decode preview samples (optional)")


@dataclass
class LossConfig:
    path_type: str = _f("linear", "interpolant path", choices=("linear", "cosine"))
    prediction: str = _f("v", "model prediction (the reference only has v)", choices=("v",))
    weighting: str = _f("uniform", "time sampling law (the reference's name)", choices=("uniform", "lognormal"))
    proj_coeff: float = _f(0.5, "weight of the alignment loss (lambda)")


@dataclass
class OptimConfig:
    batch_size: int = _f(256, "GLOBAL batch size, split over processes")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (global batch = all of them)")
    learning_rate: float = _f(1e-4, "AdamW learning rate (constant)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient-norm clip")
    ema_decay: float = _f(0.9999, "EMA decay, updated every optimizer step (not on skipped steps)")


@dataclass
class RunConfig:
    output_dir: str = _f("exps", "results go to <output_dir>/<exp_name>")
    exp_name: str | None = _f(None, "run name (default: derived from model and encoder)")
    seed: int = _f(0, "global seed; each process uses seed + rank")
    max_train_steps: int = _f(400000, "optimizer steps to train")
    epochs: int = _f(1400, "upper bound on epochs (the loop stops at max_train_steps)")
    checkpointing_steps: int = _f(50000, "save a checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int = _f(3, "keep the last N checkpoints (0 = keep all)")
    sampling_steps: int = _f(10000, "preview grid from the EMA model every N steps (0 = never)")
    preview_num_steps: int = _f(50, "Euler steps of the preview sampler (reference: 50)")
    preview_cfg_scale: float = _f(4.0, "CFG scale of the preview sampler (reference: 4.0)")
    log_every: int = _f(100, "read the on-device loss accumulators and log every N steps")
    resume_step: int = _f(0, "resume from the checkpoint of this step (reference flag)")
    resume: bool = _f(False, "resume from the latest checkpoint in the run directory")
    mixed_precision: str = _f("bf16", "autocast dtype (reference default fp16)", choices=("no", "fp16", "bf16"))
    allow_tf32: bool = _f(False, "allow TF32 matmuls and convolutions on Ampere+")
    report_to: str = _f(
        "tensorboard",
        "logging sinks besides log.jsonl: tensorboard, wandb, none (reference: wandb)",
        choices=("tensorboard", "wandb", "none"),
    )
    logging_dir: str = _f("tensorboard", "TensorBoard/wandb directory, relative to <output_dir>/<exp_name>")
    on_nan: str = _f("skip", "non-finite loss: skip the step (counted) or stop", choices=("skip", "stop"))
    parallel: str = _f(
        "auto",
        "process backend: auto, none, ddp, fsdp, deepspeed",
        choices=("auto", "none", "ddp", "fsdp", "deepspeed"),
    )
    device: str = _f("auto", "auto (cuda if available), cpu, cuda")
    # In-training evaluation of the EMA model (repa_fast.eval.training); never changes the weights.
    eval_every: int = _f(0, "sample --eval-samples images from the EMA every N steps and log FID-N and IS (0 = never)")
    eval_samples: int = _f(1000, "images per in-training evaluation (the N of the logged FID-N)")
    fid_reference: str | None = _f(None, "reference .npz (ADM batch or any arr_0 uint8 NHWC) for --eval-every")
    eval_feature_net: str = _f(
        "inception", "feature network: inception, or digits (the demo's stand-in)", choices=("inception", "digits")
    )
    inception_weights: str | None = _f(None, "Inception weights file (default: the torch hub cache)")
    eval_cache_dir: str | None = _f(None, "reference statistics cache (default: ~/.cache/repa_fast/eval)")
    eval_mode: str = _f("ode", "sampler of the in-training evaluation", choices=("ode", "sde"))
    eval_num_steps: int = _f(50, "sampler steps of the in-training evaluation")
    eval_cfg_scale: float = _f(1.0, "CFG scale of the in-training evaluation (1.0 = no guidance)")
    eval_batch_size: int = _f(64, "images per sampling batch of the in-training evaluation")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict | None = field(default=None, metadata={"help": "DeepSpeed section of the --config file"})

    def flat(self) -> dict:
        return {f.name: getattr(section, f.name) for section in self.sections() for f in dataclasses.fields(section)}

    def sections(self):
        return [self.model, self.target, self.data, self.loss, self.optim, self.run]

    def update(self, values: dict, source: str) -> None:
        """Set flat fields; unknown names are an error naming ``source`` and the closest valid names."""
        owners = {f.name: s for s in self.sections() for f in dataclasses.fields(s)}
        for key, value in values.items():
            if key not in owners:
                close = difflib.get_close_matches(key, owners, n=3)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
            setattr(owners[key], key, _checked(owners[key], key, value, source))

    def to_json(self) -> dict:
        return {"trainer": self.flat(), **({"deepspeed": self.deepspeed} if self.deepspeed else {})}


class ConfigError(ValueError):
    """A configuration mistake; the message says what to change."""


def _checked(section, key: str, value, source: str):
    """``value`` as the field's type (ints widen to float), or a ConfigError naming the option and what it takes."""
    f = next(f for f in dataclasses.fields(section) if f.name == key)
    hint = typing.get_type_hints(type(section))[key]
    types = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    want = types[0]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: option {key!r} takes a {want.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: option {key!r} must be one of {list(choices)}, got {value!r}")
    return value


def field_specs():
    """(name, field) pairs of every flat option, for the CLI."""
    return [
        (f.name, f)
        for cls in (ModelConfig, TargetConfig, DataConfig, LossConfig, OptimConfig, RunConfig)
        for f in dataclasses.fields(cls)
    ]


# Presets by public name: flat overrides on top of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference SiT-XL/2 + DINOv2-B recipe (README of REPA), in bf16.
    "sit-xl-repa": {},
    "sit-l-repa": {"model": "SiT-L/2"},
    "sit-b-repa": {"model": "SiT-B/2", "encoder_depth": 4},
    # The embedded demo: 16x16 digits in pixel space, tiny SiT (8x8 tokens), a small CNN trained on the digits
    # without labels as the target (models/digits_encoder.py; trained once in seconds and cached).
    "demo": {
        "model": "SiT-T/2",
        "encoder_depth": 2,
        "projector_dim": 256,
        "enc_type": "digits-ssl",
        "encoder_pretrained": True,
        "encoder_grid": 8,
        "dataset": "digits",
        "resolution": 16,
        "num_classes": 10,
        "num_workers": 0,
        "latent_scale": 1.0,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "ema_decay": 0.99,
        "max_train_steps": 400,
        "checkpointing_steps": 200,
        "sampling_steps": 200,
        "log_every": 20,
        "exp_name": "demo",
        "output_dir": "demo_out",
        "report_to": "tensorboard",
    },
}


def load_config_file(path: str) -> tuple[dict, dict | None]:
    """Read a --config JSON: {"trainer": {flat options}, "deepspeed": {...}}. Returns (trainer, deepspeed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not set(raw) <= {"trainer", "deepspeed", "comment"}:
        raise ConfigError(f"--config {path}: top-level keys must be 'trainer' and/or 'deepspeed', got {sorted(raw)}")
    return raw.get("trainer", {}), raw.get("deepspeed")


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Per-process micro-batch: the global batch / (processes x accumulation), or an error showing the arithmetic."""
    denom = world_size * cfg.optim.gradient_accumulation_steps
    if cfg.optim.batch_size % denom:
        raise ConfigError(
            f"--batch-size {cfg.optim.batch_size} (global) is not divisible by processes x accumulation = "
            f"{world_size} x {cfg.optim.gradient_accumulation_steps} = {denom}; use a multiple of {denom}"
        )
    return cfg.optim.batch_size // denom


def run_dir(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.output_dir, cfg.run.exp_name)


def default_exp_name(cfg: TrainConfig) -> str:
    name = f"{cfg.model.model}-{cfg.target.enc_type}-d{cfg.model.encoder_depth}"
    return name.replace("/", "_").replace(",", "+")
