"""Training configuration: nested dataclasses with flat, unique field names.

Every field is a reference ``train.py`` flag (same name with ``-`` for ``_``, same meaning and default unless its
doc says otherwise) or a repa_fast addition. The CLI, the ``"trainer"`` section of a ``--config`` JSON file and the
written ``<run_dir>/config.json`` all use the flat names, so a user's reference command line keeps working.
Precedence: defaults < preset < --config file < explicit CLI flags.

Each field declares, next to its default and doc, its valid values (``choices`` or a ``Range``) and whether it defines
the weights (``weights``, read by ``--resume``'s compatibility check); ``_checked`` enforces them for flags, --config
files and presets alike, before anything is built. Adding an option is one field here.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from repa_fast.errors import ConfigError
from repa_fast.recipe import family_presets as _family_presets


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: ``lo <= v`` (``<`` when ``lo_open``), ``v <= hi`` (``<`` when
    ``hi_open``), finite; ``note`` says what a boundary value means (e.g. "0 = no clipping")."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is None:
            text = "finite"
        else:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return text + (f" ({self.note})" if self.note else "")


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1)


@dataclass(frozen=True)
class Matches:
    """The valid values of a string option given by a pattern (``regex``, matched in full); ``text`` says them in
    words for the help and the error."""

    regex: str
    text: str

    def __contains__(self, v) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def __str__(self) -> str:
        return self.text


# engine/activation_checkpoint.py's modes (``parse_ac_mode``; tests/engine/test_speed_flags.py checks they agree).
AC_MODES = Matches(r"none|full|mlp|every:[1-9][0-9]*", "one of none, full, mlp, every:K (K >= 1)")
# kernels/attention.py's BACKENDS (the same test checks they agree; this module imports no torch).
ATTN_BACKENDS = ("auto", "flash", "xformers", "sdpa", "cudnn_attention", "math")


def _f(default, help: str, *, choices=None, check: Range | Matches | None = None, weights: bool = False):
    """A config field: its default, one-line doc, valid values (``choices`` or a ``check`` Range: every numeric
    option has one) and whether it defines the weights (``weights``: architecture or the meaning of the weights; a
    checkpoint only continues a run that agrees on all of these)."""
    meta = {"help": help, "weights": weights}
    if choices is not None:
        meta["choices"] = choices
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    model: str = _f("SiT-XL/2", "SiT_models name (SiT-{S,B,L,XL}/{2,4,8}; SiT-T/* is a tiny demo size)", weights=True)
    encoder_depth: int = _f(
        8, "1-indexed block whose output is aligned (8 for L/XL, 4 for B)", check=AT_LEAST_1, weights=True
    )
    projector_dim: int = _f(2048, "hidden width of the REPA projector MLP", check=AT_LEAST_1, weights=True)
    qk_norm: bool = _f(False, "per-head LayerNorm on q and k", weights=True)
    fused_attn: bool = _f(True, "fused attention (SDPA/FlashAttention); off = explicit softmax as timm's manual path")
    use_rope: bool = _f(False, "2-D axial RoPE on q and k (ERW/LightningDiT); off in the reference", weights=True)
    kernels: str = _f("auto", "fused kernels: auto (Triton on CUDA), triton, ref", choices=("auto", "triton", "ref"))
    compile: bool = _f(False, "torch.compile each SiT block (repeated structure compiles once)")
    compile_backend: str = _f("inductor", "torch.compile backend for --compile (e.g. inductor, aot_eager, cudagraphs)")
    # Speed options (issue 18; docs/performance.md): they change how a step runs, not what the weights mean, so a
    # resume may change them. Applied in build.build_phase: fp8, activation checkpointing, compile, parallel wrap.
    fp8: str = _f(
        "none",
        "fp8 training of the SiT blocks' Linear layers (torchao float8; engine/fp8.py): tensorwise or rowwise "
        "scaling; needs an NVIDIA GPU of compute capability 8.9+",
        choices=("none", "tensorwise", "rowwise"),
    )
    activation_checkpointing: str = _f(
        "none",
        "recompute activations in the backward (engine/activation_checkpoint.py): full (every block), mlp (the MLP "
        "of every block), every:K (blocks K, 2K, ...)",
        check=AC_MODES,
    )
    attn_backend: str = _f(
        "auto",
        "attention of the SiT blocks (kernels/attention.py): auto picks by GPU; an explicit backend this machine "
        "cannot run is refused; math = --no-fused-attn",
        choices=ATTN_BACKENDS,
    )
    cfg_prob: float = _f(
        0.1,
        "label dropout probability (the reference hard-codes 0.1 in the model; here it is real)",
        check=Range(0, 1, hi_open=True),
    )
    legacy: bool = _f(False, "reference quirk: drop labels a second time in the loop (effective 19% at 0.1)")
    l2r_depth: int = _f(
        4, "ERW warm-up: blocks 1..N (with the embedders and projectors) train in the warm-up phase", check=AT_LEAST_1
    )
    # The REPA family (docs/methods.md §REG, §iREPA): REG's class token, iREPA's projectors.
    reg: bool = _f(
        False,
        "REG: the encoder's class token joins the tokens, noised, with its own velocity loss (--cls)",
        weights=True,
    )
    projection_layer_type: str = _f(
        "mlp",
        "alignment projector: mlp (REPA's), linear or conv (iREPA's ProjectionLayer over the token grid)",
        choices=("mlp", "linear", "conv"),
        weights=True,
    )
    proj_kwargs_kernel_size: int = _f(
        3,
        "iREPA conv projector kernel size (iREPA's model and README: 3; its train.py defaults to 1)",
        choices=(1, 3, 5, 7),
        weights=True,
    )


@dataclass
class TargetConfig:
    enc_type: str = _f("dinov2-vit-b", "comma-separated target encoders, e.g. dinov2-vit-b,dinov2-vit-l", weights=True)
    encoder_checkpoint_dir: str | None = _f(None, "directory with the encoder weight files (default: torch hub cache)")
    encoder_pretrained: bool = _f(True, "load encoder weights; off = random init (demo and tests only)")
    encoder_grid: int | None = _f(
        None,
        "encoder token grid (default resolution // 16 as the reference; the demo sets it to the SiT grid)",
        check=AT_LEAST_1,
        weights=True,
    )
    targets: str = _f(
        "computed",
        "computed: run the encoders every step; cached: read targets made by repa_fast.tools.cache_targets",
        choices=("computed", "cached"),
    )
    targets_dir: str | None = _f(None, "target cache directory for --targets cached (default <data_dir>/targets)")


@dataclass
class DataConfig:
    data_dir: str | None = _f(None, "dataset: reference layout (images/ + vae-sd/) or packed; none = demo data")
    dataset: str = _f(
        "auto", "auto (from data_dir), digits (scikit-learn digits, the embedded demo)", choices=("auto", "digits")
    )
    resolution: int = _f(256, "image resolution (256 or 512 in the reference)", check=AT_LEAST_1, weights=True)
    num_classes: int = _f(1000, "number of classes (the null class is num_classes)", check=AT_LEAST_1, weights=True)
    num_workers: int = _f(4, "DataLoader workers per process", check=NON_NEGATIVE)
    loader: str = _f(
        "auto",
        "REPA folder layout reader: dali (NVIDIA DALI decoding), dataloader (PIL in workers), auto (DALI when "
        "installed and on CUDA)",
        choices=("auto", "dataloader", "dali"),
    )
    latent_scale: float = _f(
        0.18215, "x0 = (mean + std * eps) * latent_scale (SD-VAE); 1.0 in pixel space", check=POSITIVE
    )
    vae: str | None = _f(None, "VAE to decode preview samples: ema, mse, a hub id or a local diffusers directory")
    # Bad samples (docs/run_directories.md §Data).
    on_bad_sample: str = _f(
        "error",
        "a sample that cannot be read: error (stop, naming the file) or skip (log it, read the next one)",
        choices=("error", "skip"),
    )
    bad_sample_budget: float = _f(
        0.001,
        "with --on-bad-sample skip: most bad samples skipped, a count (>= 1) or a fraction of the epoch (< 1)",
        check=NON_NEGATIVE,
    )


@dataclass
class LossConfig:
    path_type: str = _f("linear", "interpolant path", choices=("linear", "cosine"))
    prediction: str = _f("v", "model prediction (the reference only has v)", choices=("v",))
    weighting: str = _f("uniform", "time sampling law (the reference's name)", choices=("uniform", "lognormal"))
    proj_coeff: float = _f(
        0.5,
        "weight of the alignment loss (lambda); ERW: the warm-up phase's weight",
        check=Range(0, note="0 = no alignment"),
    )
    warmup_steps: int = _f(
        0, "ERW representation warm-up steps before full training (0 = plain REPA)", check=NON_NEGATIVE
    )
    proj_coeff_schedule: str = _f(
        "auto",
        "alignment weight over the full phase: constant, exp (ERW's 2^(-s/half-life)), cosine (to 0 at the end); "
        "auto = exp with --warmup-steps > 0 (ERW's command line gives ERW's recipe), else constant",
        choices=("auto", "constant", "exp", "cosine"),
    )
    proj_coeff_start: float | None = _f(
        None,
        "alignment weight at the start of the full phase (default: --proj-coeff; ERW exp: 6 XL, 3 L, 1 other)",
        check=NON_NEGATIVE,
    )
    proj_half_life: int = _f(
        50000, "steps for the exp schedule to halve the alignment weight (ERW: 50000)", check=AT_LEAST_1
    )
    align_stop_step: int = _f(
        0, "HASTE: alignment term off from this step on (0 = never)", check=Range(0, note="0 = never")
    )
    # The REPA family (docs/methods.md §REG, §iREPA).
    cls: float = _f(
        0.03,
        "REG: weight of the class-token velocity loss (REG train.py --cls); given alone it turns --reg on (0: off)",
        check=NON_NEGATIVE,
    )
    spnorm_method: str = _f(
        "none", "iREPA: spatial normalisation of the patch-token targets", choices=("none", "zscore")
    )
    zscore_alpha: float = _f(
        0.6, "iREPA: z = (z - alpha mean_T z) / (std_T z + 1e-6) with --spnorm-method zscore", check=Range(0, 1)
    )


@dataclass
class OptimConfig:
    batch_size: int = _f(256, "GLOBAL batch size, split over processes", check=AT_LEAST_1)
    gradient_accumulation_steps: int = _f(
        1, "micro-batches per optimizer step (global batch = all of them)", check=AT_LEAST_1
    )
    learning_rate: float = _f(1e-4, "AdamW learning rate (constant)", check=POSITIVE)
    adam_beta1: float = _f(0.9, "AdamW beta1", check=Range(0, 1, hi_open=True))
    adam_beta2: float = _f(0.999, "AdamW beta2", check=Range(0, 1, hi_open=True))
    adam_weight_decay: float = _f(0.0, "AdamW weight decay", check=NON_NEGATIVE)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", check=POSITIVE)
    max_grad_norm: float = _f(
        1.0,
        "gradient-norm clip (0 = no clipping, as DeepSpeed's gradient_clipping)",
        check=Range(0, note="0 = no clipping"),
    )
    ema_decay: float = _f(0.9999, "EMA decay, updated every optimizer step (not on skipped steps)", check=PROBABILITY)


@dataclass
class RunConfig:
    output_dir: str = _f("exps", "results go to <output_dir>/<exp_name>")
    exp_name: str | None = _f(None, "run name (default: derived from model and encoder)")
    seed: int = _f(0, "global seed; each process uses seed + rank", check=NON_NEGATIVE)
    max_train_steps: int = _f(400000, "optimizer steps to train", check=AT_LEAST_1)
    epochs: int = _f(1400, "upper bound on epochs (the loop stops at max_train_steps)", check=AT_LEAST_1)
    checkpointing_steps: int = _f(50000, "save a checkpoint every N steps (and at the end)", check=AT_LEAST_1)
    checkpoints_total_limit: int = _f(
        3, "keep the last N checkpoints (0 = keep all)", check=Range(0, note="0 = keep all")
    )
    sampling_steps: int = _f(
        10000, "preview grid from the EMA model every N steps (0 = never)", check=Range(0, note="0 = never")
    )
    preview_num_steps: int = _f(50, "Euler steps of the preview sampler (reference: 50)", check=AT_LEAST_1)
    preview_cfg_scale: float = _f(
        4.0, "CFG scale of the preview sampler (reference: 4.0)", check=Range(1, note="1 = no guidance")
    )
    log_every: int = _f(100, "read the on-device loss accumulators and log every N steps", check=AT_LEAST_1)
    resume_step: int = _f(
        0, "resume from the checkpoint of this step (reference flag)", check=Range(0, note="0 = not set")
    )
    resume: bool = _f(False, "resume from the latest checkpoint in the run directory")
    init_from: str | None = _f(
        None, "start from these weights (a repa_fast checkpoint, a reference/ERW .pt, REPA's last.pt); step 0"
    )
    init_ema_from: str = _f(
        "file-ema",
        "with --init-from: start the EMA from the file's EMA when it has one (file-ema), or from its raw weights",
        choices=("file-ema", "weights"),
    )
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
    device: str = _f("auto", "auto (cuda if available), cpu, cuda (device LOCAL_RANK)", choices=("auto", "cpu", "cuda"))
    gpu_memory_gb: float | None = _f(
        None,
        "GPU memory per process in GB (1e9 bytes): the predicted peak must fit it (--dry-run and training; default: "
        "the visible GPU's, checked by --dry-run only)",
        check=POSITIVE,
    )
    # In-training evaluation of the EMA model (repa_fast.eval.training); never changes the weights.
    eval_every: int = _f(
        0,
        "sample --eval-samples images from the EMA every N steps and log FID-N and IS (0 = never)",
        check=Range(0, note="0 = never"),
    )
    eval_samples: int = _f(1000, "images per in-training evaluation (the N of the logged FID-N)", check=AT_LEAST_1)
    fid_reference: str | None = _f(None, "reference .npz (ADM batch or any arr_0 uint8 NHWC) for --eval-every")
    eval_feature_net: str = _f(
        "inception", "feature network: inception, or digits (the demo's stand-in)", choices=("inception", "digits")
    )
    inception_weights: str | None = _f(None, "Inception weights file (default: the torch hub cache)")
    eval_cache_dir: str | None = _f(None, "reference statistics cache (default: ~/.cache/repa_fast/eval)")
    eval_mode: str = _f("ode", "sampler of the in-training evaluation", choices=("ode", "sde"))
    eval_num_steps: int = _f(50, "sampler steps of the in-training evaluation", check=AT_LEAST_1)
    eval_cfg_scale: float = _f(
        1.0, "CFG scale of the in-training evaluation (1.0 = no guidance)", check=Range(1, note="1 = no guidance")
    )
    eval_batch_size: int = _f(64, "images per sampling batch of the in-training evaluation", check=AT_LEAST_1)
    # Reliability (docs/run_directories.md).
    max_skipped_steps: int = _f(
        20,
        "stop (exit 7) after this many consecutive skipped (non-finite) steps (0 = never)",
        check=Range(0, note="0 = never"),
    )
    reset_data_position: bool = _f(
        False, "--resume on changed data: keep weights, EMA and optimizer, restart the data order at the next epoch"
    )


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

    def validate(self, world_size: int = 1) -> None:
        """Every rule between options, in one place; a ConfigError names the options and what to change.

        Each option's own valid values are declared on its field (``_f``: choices, a Range) and checked when it is
        set through ``update``; they are checked again here, for a library caller that set an attribute directly.
        Needs no data, weights or machine (``repa_fast.cli.check_runtime`` checks those), so ``--dry-run`` runs it,
        and so do ``engine.trainer.train`` (for library callers) and the in-training evaluation (``check_eval``).
        ``world_size`` is the process count the global batch is split over.
        """
        for section in self.sections():
            for f in dataclasses.fields(section):
                _checked(section, f.name, getattr(section, f.name), "TrainConfig")
        depth = _check_model(self)
        _check_family(self)
        _check_resume(self)
        _check_recipe(self, depth)
        _check_speed(self)
        _check_data_policy(self)
        if self.data.dataset == "auto" and not self.data.data_dir:
            raise ConfigError(
                "no --data-dir: pass --data-dir DIR (REPA folder or packed dataset), or run the embedded "
                "demo with `python train.py` (or --preset demo)"
            )
        check_eval(self)
        micro_batch_size(self, world_size)


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
    check = f.metadata.get("check")
    if check is not None and value is not None and value not in check:
        raise ConfigError(f"{source}: {_name(key, source)} must be {check}, got {value!r}")
    return value


def _name(key: str, source: str) -> str:
    return "--" + key.replace("_", "-") if source == "command line" else f"option {key!r} (--{key.replace('_', '-')})"


def _check_model(cfg: TrainConfig) -> int:
    """The model and target encoders exist and fit each other and the resolution; returns the SiT's depth."""
    from repa_fast.models.encoders import VIT_SPECS, check_resolution, parse_encoder_name
    from repa_fast.models.sit import SIT_SIZES, SiT_models, parse_model_name

    m = cfg.model
    if m.model not in SiT_models:
        raise ConfigError(f"--model {m.model!r} is unknown; choose one of {', '.join(SiT_models)}")
    depth = SIT_SIZES[parse_model_name(m.model)[0]][0]
    if cfg.target.enc_type and (cfg.loss.proj_coeff != 0 or m.reg):
        if not 1 <= m.encoder_depth <= depth:
            raise ConfigError(f"--encoder-depth {m.encoder_depth} is outside 1..{depth} for {m.model}")
        for name in cfg.target.enc_type.split(","):
            try:
                parse_encoder_name(name.strip())
                if name.strip() in VIT_SPECS:  # MoCo v3 / MAE / I-JEPA / CLIP / DINO v1: 256 px, 16x16 only
                    check_resolution(VIT_SPECS[name.strip()], cfg.data.resolution, cfg.target.encoder_grid or None)
            except (ValueError, NotImplementedError) as e:
                raise ConfigError(f"--enc-type: {e}") from e
    return depth


def _check_family(cfg: TrainConfig) -> None:
    """REG's and iREPA's options (docs/methods.md §Combinations): what is not defined is refused, never guessed."""
    m, loss = cfg.model, cfg.loss
    aligns = bool(cfg.target.enc_type) and loss.proj_coeff != 0
    if m.reg and not cfg.target.enc_type:
        raise ConfigError(
            "--reg (REG) diffuses the target encoder's class token: it needs --enc-type (e.g. dinov2-vit-b); "
            "drop --reg / --cls to train without REG"
        )
    if m.reg and m.projection_layer_type == "conv":
        raise ConfigError(
            "--reg with --projection-layer-type conv is not defined: REG's class token is not on the token grid the "
            "convolution runs over, and neither REG nor iREPA says how to project it; use --projection-layer-type "
            "mlp or linear with REG, or drop --reg (--cls 0) for the conv projector"
        )
    if not m.reg and loss.cls not in (0.0, 0.03):
        raise ConfigError(f"--cls {loss.cls:g} is REG's class-token loss weight: add --reg, or drop --cls")
    if m.projection_layer_type != "conv" and m.proj_kwargs_kernel_size != 3:
        raise ConfigError(
            f"--proj-kwargs-kernel-size {m.proj_kwargs_kernel_size} is the conv projector's kernel: add "
            "--projection-layer-type conv, or drop it"
        )
    if loss.spnorm_method != "none" and not aligns:
        raise ConfigError(
            f"--spnorm-method {loss.spnorm_method} normalises the alignment targets: it needs --enc-type and "
            "--proj-coeff > 0"
        )
    if loss.spnorm_method == "none" and loss.zscore_alpha != 0.6:
        raise ConfigError(
            f"--zscore-alpha {loss.zscore_alpha:g} is read with --spnorm-method zscore: add it, or drop it"
        )


def reg_flags(values: dict) -> dict:
    """REG's command line turns REG on: ``--cls C`` without ``--reg`` / ``--no-reg`` means ``--reg`` when C > 0 and
    no REG when C = 0 (REG's train.py always trains REG; ``--cls`` is its class-token weight, train.py:436)."""
    if "cls" in values and "reg" not in values:
        return {**values, "reg": values["cls"] > 0}
    return values


def _check_resume(cfg: TrainConfig) -> None:
    """Where the run starts from: one of --resume, --resume-step, --init-from (whether a checkpoint fits the run is
    ``engine.checkpoint.check_compatible``'s rule, applied once the checkpoint is read)."""
    r = cfg.run
    if r.resume and r.resume_step:
        raise ConfigError("--resume and --resume-step both given: use one (latest checkpoint, or that step)")
    if r.init_from and (r.resume or r.resume_step):
        raise ConfigError("--init-from starts a new run from weights; drop --resume/--resume-step, or drop --init-from")
    if r.init_ema_from != "file-ema" and not r.init_from:
        raise ConfigError(f"--init-ema-from {r.init_ema_from} only applies with --init-from FILE; drop it or add one")


def _check_recipe(cfg: TrainConfig, depth: int) -> None:
    """The ERW / HASTE / schedule options (repa_fast.recipe) agree with each other and the model."""
    m, loss, r = cfg.model, cfg.loss, cfg.run
    if loss.warmup_steps:
        if loss.warmup_steps >= r.max_train_steps:
            raise ConfigError(
                f"--warmup-steps {loss.warmup_steps} leaves no full training before --max-train-steps "
                f"{r.max_train_steps}; use fewer warm-up steps or more training steps"
            )
        if not 1 <= m.l2r_depth <= depth:
            raise ConfigError(f"--l2r-depth {m.l2r_depth} is outside 1..{depth} for {m.model}")
        if not cfg.target.enc_type or loss.proj_coeff == 0:
            raise ConfigError(
                "--warmup-steps > 0 trains on the alignment loss alone: it needs --enc-type and --proj-coeff > 0"
            )
    if loss.align_stop_step and loss.align_stop_step <= loss.warmup_steps:
        raise ConfigError(
            f"--align-stop-step {loss.align_stop_step} must be after --warmup-steps {loss.warmup_steps} (0 = never)"
        )


def _check_data_policy(cfg: TrainConfig) -> None:
    """The bad-sample and data-position options only where they are read (docs/run_directories.md §Data)."""
    d, r = cfg.data, cfg.run
    if d.on_bad_sample == "skip" and d.loader == "dali":
        raise ConfigError(
            "--on-bad-sample skip reads samples one by one, which the DALI loader does not; use --loader dataloader "
            "(or auto, which then picks it), or drop --on-bad-sample skip"
        )
    if d.on_bad_sample == "error" and d.bad_sample_budget != 0.001:
        raise ConfigError(
            f"--bad-sample-budget {d.bad_sample_budget:g} is read with --on-bad-sample skip: add it, or drop the budget"
        )
    if r.reset_data_position and not (r.resume or r.resume_step):
        raise ConfigError("--reset-data-position applies to --resume / --resume-step only; drop it for a new run")


def _check_speed(cfg: TrainConfig) -> None:
    """The speed options agree with the older attention switch (models/sit.py: fused_attn=False is "math")."""
    m = cfg.model
    if not m.fused_attn and m.attn_backend not in ("auto", "math"):
        raise ConfigError(
            f"--no-fused-attn is the explicit-softmax attention (--attn-backend math); it contradicts --attn-backend "
            f"{m.attn_backend}: drop one of them"
        )


def check_eval(cfg: TrainConfig) -> None:
    """The in-training evaluation's rules (``--eval-every``; repa_fast.eval.training): FID and IS statistics need
    ``eval.fid.MIN_SAMPLES`` images (a covariance of one sample is undefined)."""
    r = cfg.run
    if not r.eval_every:
        return
    from repa_fast.eval.fid import MIN_SAMPLES

    if r.eval_samples < MIN_SAMPLES:
        raise ConfigError(
            f"--eval-samples {r.eval_samples} is too small for --eval-every: FID and IS need at least {MIN_SAMPLES} "
            "samples"
        )


def field_specs():
    """(name, field) pairs of every flat option, for the CLI."""
    return [
        (f.name, f)
        for cls in (ModelConfig, TargetConfig, DataConfig, LossConfig, OptimConfig, RunConfig)
        for f in dataclasses.fields(cls)
    ]


def weight_options() -> tuple[str, ...]:
    """Options that define the weights (field metadata ``weights``): a checkpoint continues only a run agreeing on
    all of them (``--resume`` compatibility)."""
    return tuple(name for name, f in field_specs() if f.metadata.get("weights"))


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
# ERW (LINs-lab/ERW README, SiT-XL/2): 100K warm-up steps of blocks 1-4, then full training to 300K with the
# projectors at block 14 and lambda = 6 * 2^(-(step - 100K) / 50K); RoPE on; a checkpoint every 10K steps as ERW.
# fp16 as ERW's command; our bf16 default applies unless the preset says otherwise, so it is set here.
PRESETS["erw"] = {
    "model": "SiT-XL/2",
    "encoder_depth": 14,
    "l2r_depth": 4,
    "use_rope": True,
    "warmup_steps": 100000,
    "max_train_steps": 300000,
    "checkpointing_steps": 10000,
    "mixed_precision": "fp16",
}
# The digits demo the ERW way: 100 warm-up steps of blocks 1-2, then 300 full steps (the demo's half-life scaled).
PRESETS["erw-demo"] = {
    **PRESETS["demo"],
    "encoder_depth": 3,
    "l2r_depth": 2,
    "use_rope": True,
    "warmup_steps": 100,
    "proj_half_life": 150,
    "max_train_steps": 400,
    "checkpointing_steps": 100,
    "exp_name": "erw-demo",
}

# REG and iREPA: the published recipes and their digits demos (repa_fast.recipe holds them: docs/methods.md).
PRESETS.update(_family_presets(PRESETS["demo"]))


def load_config_file(path: str) -> tuple[dict, dict | None]:
    """Read a --config JSON: {"trainer": {flat options}, "deepspeed": {...}}. Returns (trainer, deepspeed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: must be a JSON object with a 'trainer' section, got a {_json_type(raw)}")
    if not set(raw) <= {"trainer", "deepspeed", "comment"}:
        raise ConfigError(f"--config {path}: top-level keys must be 'trainer' and/or 'deepspeed', got {sorted(raw)}")
    for section in ("trainer", "deepspeed"):
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(
                f"--config {path}: the {section!r} section must be a JSON object "
                f'({{"option": value, ...}}), got a {_json_type(raw[section])}'
            )
    return raw.get("trainer", {}), raw.get("deepspeed")


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


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
