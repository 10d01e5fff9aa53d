"""The DeepSpeed section of a --config file, resolved against the trainer section (no deepspeed import needed).

Resolved once, at the config boundary (``repa_fast.cli.resolve_config``); the DeepSpeed backend receives the result
and only checks it (``check_resolved``).

One source of truth: the TRAINER options own every number that both sections carry. DeepSpeed values that are absent
or "auto" are derived from them; values that are given are checked against them, and a mismatch is an error that
shows the arithmetic. A trainer option set on the command line replaces the file's DeepSpeed value (CLI flags
override the file). The correspondence:

    train_batch_size                  = batch_size                      (global, reference semantics)
    gradient_accumulation_steps       = gradient_accumulation_steps
    train_micro_batch_size_per_gpu    = batch_size / (processes x gradient_accumulation_steps)
    gradient_clipping                 = max_grad_norm
    torch_autocast.enabled / dtype    = mixed_precision != "no" / bfloat16 (fp16 is refused, see resolve_precision)

Precision: weights stay fp32 on every backend and bf16/fp16 is torch.autocast around the forward. DeepSpeed's
``torch_autocast`` section is exactly that; its ``bf16``/``fp16`` sections instead store bf16/fp16 weights with fp32
master copies (other numerics than DDP/FSDP/one process), so they are refused with the fix. ``lower_precision_safe_
modules`` defaults to [] so gradients are reduced in fp32 as with DDP; list module classes there to reduce their
gradients in the autocast dtype (less traffic, other numerics).

The optimizer is the trainer's (AdamW from the trainer section), so "optimizer" and "scheduler" sections are refused.
The loop owns gradient accumulation (``managed_gradient_accumulation: false``: backward accumulates locally, the one
``step()`` per optimizer step reduces and updates).
"""

import copy

from repa_fast.config import ConfigError

# Trainer option -> the DeepSpeed key it owns (for the "set on the command line" rule).
OWNED = {
    "batch_size": "train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "gradient_clipping",
    "mixed_precision": "torch_autocast",
}
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
}


def _given(ds: dict, key: str, cli: set, option: str):
    """The file's value for ``key``, or None when it is absent, "auto", or overridden by a CLI flag."""
    value = ds.get(key)
    if value is None or value == "auto" or option in cli:
        return None
    return value


def _int(ds: dict, key: str, where: str) -> int:
    v = ds[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f'{where}: deepspeed.{key} must be a positive integer or "auto", got {v!r}')
    return v


def resolve_batch(ds: dict, cfg, world: int, cli: set, where: str) -> None:
    o = cfg.optim
    accum = o.gradient_accumulation_steps
    tb = _given(ds, "train_batch_size", cli, "batch_size")
    ga = _given(ds, "gradient_accumulation_steps", cli, "gradient_accumulation_steps")
    mb = _given(ds, "train_micro_batch_size_per_gpu", cli, "batch_size")
    if "gradient_accumulation_steps" in cli or "batch_size" in cli:
        mb = None  # the CLI changed the batch arithmetic: the micro batch follows
    for key, v in (
        ("train_batch_size", tb),
        ("gradient_accumulation_steps", ga),
        ("train_micro_batch_size_per_gpu", mb),
    ):
        if v is not None:
            _int(ds, key, where)
    if tb is not None and tb != o.batch_size:
        raise ConfigError(
            f"{where}: deepspeed.train_batch_size {tb} != trainer batch_size {o.batch_size} (the global "
            'batch); make them equal, set train_batch_size to "auto", or pass --batch-size'
        )
    if ga is not None and ga != accum:
        raise ConfigError(
            f"{where}: deepspeed.gradient_accumulation_steps {ga} != trainer gradient_accumulation_steps "
            f'{accum}; make them equal, use "auto", or pass --gradient-accumulation-steps'
        )
    if mb is not None and mb * accum * world != o.batch_size:
        raise ConfigError(
            f"{where}: train_micro_batch_size_per_gpu {mb} x gradient_accumulation_steps {accum} x {world} "
            f'process(es) = {mb * accum * world} != train_batch_size {o.batch_size}; set the micro batch to "auto" '
            f"(it becomes {o.batch_size} / ({accum} x {world})) or change --gradient-accumulation-steps / --batch-size"
        )
    if o.batch_size % (accum * world):
        raise ConfigError(
            f"{where}: train_batch_size {o.batch_size} is not divisible by gradient_accumulation_steps {accum} x "
            f"{world} process(es) = {accum * world}; use a multiple of {accum * world}"
        )
    ds["train_batch_size"] = o.batch_size
    ds["gradient_accumulation_steps"] = accum
    ds["train_micro_batch_size_per_gpu"] = o.batch_size // (accum * world)


def resolve_precision(ds: dict, cfg, cli: set, where: str) -> None:
    for native in ("bf16", "fp16"):
        section = ds.get(native)
        if isinstance(section, dict) and section.get("enabled") not in (False, "auto", None):
            raise ConfigError(
                f"{where}: deepspeed.{native} stores {native} weights (fp32 master copies in the optimizer), unlike "
                "every other backend here; repa_fast keeps fp32 weights and autocasts the forward. Remove the "
                f'"{native}" section and use "torch_autocast": {{"enabled": true, "dtype": '
                f'"{AUTOCAST_DTYPES[native]}"}} (or --mixed-precision {native})'
            )
        ds.pop(native, None)
    mp = cfg.run.mixed_precision
    ta = dict(ds.get("torch_autocast") or {})
    if "mixed_precision" not in cli and ta:
        enabled = ta.get("enabled", False)
        dtype = _DTYPE_ALIASES.get(str(ta.get("dtype", "bfloat16")))
        file_mp = (dtype or "?") if enabled else "no"
        if enabled and dtype is None:
            raise ConfigError(f"{where}: deepspeed.torch_autocast.dtype {ta.get('dtype')!r}: use bfloat16 or float16")
        if file_mp != mp:
            raise ConfigError(
                f"{where}: deepspeed.torch_autocast says {file_mp} but the trainer's mixed_precision is "
                f"{mp}; make them agree or pass --mixed-precision"
            )
    if mp == "no":
        ds["torch_autocast"] = {"enabled": False}
        return
    if mp == "fp16":
        # Measured with DeepSpeed 0.19.8 (tiny SiT, ZeRO-2/3, CPU): its torch_autocast GradScaler leaves the loss scale
        # in the gradients that ZeRO clips, so clipping acts on a norm 65536x too large (logged 92410 vs 1.41) and the
        # trajectory leaves the one-process fp16 run by 3% at step 2.
        raise ConfigError(
            f"{where}: --mixed-precision fp16 is not supported with --parallel deepspeed (DeepSpeed's "
            "torch_autocast fp16 clips the loss-scaled gradients); use bf16 (the default) or fp16 with "
            "--parallel ddp / fsdp, which use torch's GradScaler"
        )
    ta.update(enabled=True, dtype=AUTOCAST_DTYPES[mp])
    ta.setdefault("lower_precision_safe_modules", [])  # [] = fp32 gradient reduction, as DDP/FSDP
    ds["torch_autocast"] = ta


def resolve_deepspeed_config(cfg, world_size: int, cli: set | None = None, where: str | None = None) -> dict:
    """The DeepSpeed config to pass to ``deepspeed.initialize`` for ``cfg`` on ``world_size`` processes."""
    cli = cli or set()
    where = where or "deepspeed config"
    raw = cfg.deepspeed or {}
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: the "deepspeed" section must be a JSON object')
    ds = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"{where}: deepspeed.{section} is not used: the trainer section owns the optimizer "
                "(AdamW: learning_rate, adam_beta1/2, adam_epsilon, adam_weight_decay; constant lr as "
                f'the reference). Remove the "{section}" section'
            )
    resolve_batch(ds, cfg, world_size, cli, where)
    clip = _given(ds, "gradient_clipping", cli, "max_grad_norm")
    if clip is not None and float(clip) != float(cfg.optim.max_grad_norm):
        raise ConfigError(
            f"{where}: deepspeed.gradient_clipping {clip} != trainer max_grad_norm "
            f'{cfg.optim.max_grad_norm}; make them equal, use "auto", or pass --max-grad-norm'
        )
    ds["gradient_clipping"] = float(cfg.optim.max_grad_norm)
    resolve_precision(ds, cfg, cli, where)
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f'{where}: deepspeed.zero_optimization must be an object like {{"stage": 2}}')
    stage = zero.setdefault("stage", 2)
    if stage == 0:
        raise ConfigError(
            f"{where}: deepspeed.zero_optimization.stage 0 is plain data parallelism without DeepSpeed's "
            "non-finite-gradient skip; use --parallel ddp (same numerics) or ZeRO stage 1, 2 or 3"
        )
    if stage not in (1, 2, 3):
        raise ConfigError(f"{where}: deepspeed.zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    if ds.get("managed_gradient_accumulation", False) not in (False, "auto"):
        raise ConfigError(
            f"{where}: managed_gradient_accumulation must be false: the training loop owns the "
            "accumulation boundary (remove the key)"
        )
    ds["managed_gradient_accumulation"] = False
    if stage == 1 and zero.setdefault("overlap_comm", False):
        raise ConfigError(
            f"{where}: zero_optimization.overlap_comm needs stage 2 or 3 here (with the loop owning the "
            "accumulation, DeepSpeed overlaps reduction only for partitioned gradients); remove it"
        )
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's fused AdamW on the flat fp32 partitions
    ds.setdefault("steps_per_print", 2**31 - 1)  # the loop logs; DeepSpeed's own progress lines off
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])


def check_resolved(ds: dict | None, world_size: int) -> dict:
    """``ds`` itself when it is a config resolved by ``resolve_deepspeed_config`` for ``world_size`` processes."""
    fix = (
        "resolve the training config with repa_fast.cli.resolve_config (train.py does), which fills TrainConfig."
        "deepspeed from the --config file's deepspeed section and the trainer options, under the launcher's WORLD_SIZE"
    )
    keys = ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "torch_autocast")
    if not isinstance(ds, dict) or any(k not in ds for k in keys) or "stage" not in ds.get("zero_optimization", {}):
        raise ConfigError(f"--parallel deepspeed got an unresolved DeepSpeed config; {fix}")
    product = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if product != ds["train_batch_size"]:
        raise ConfigError(
            f"the DeepSpeed config's train_micro_batch_size_per_gpu {ds['train_micro_batch_size_per_gpu']} x "
            f"gradient_accumulation_steps {ds['gradient_accumulation_steps']} x {world_size} process(es) != "
            f"train_batch_size {ds['train_batch_size']}: it was resolved for another process count; {fix}"
        )
    return ds
