"""Command line of ``train.py``: every reference flag, plus --config, --preset, --dry-run and --resume.

Resolution order: dataclass defaults < preset < the --config file's "trainer" section < flags given on the command
line. ``python train.py`` with no data flags and no --config runs the ``demo`` preset.
"""

import argparse
import json
import os
import sys
import typing

from repa_fast.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    default_exp_name,
    field_specs,
    load_config_file,
    micro_batch_size,
)

# Options that ERW's train.py spells with an underscore (LINs-lab/ERW train.py:50); both spellings are accepted.
UNDERSCORE_ALIASES = ("use_rope",)


def _arg_type(f):
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (own annotations)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train SiT with REPA (repa_fast). Flags keep the reference train.py names.",
        allow_abbrev=False,  # an unknown or misspelt flag is an error, never a silent prefix match
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help='JSON file: {"trainer": {flat options}, "deepspeed": {...}}')
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="start from a named recipe (default: demo when no data is given)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same information.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    defaults = TrainConfig().flat()
    for name, f in field_specs():
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {defaults[name]})"}
        typ = _arg_type(f)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        flags = ["--" + name.replace("_", "-")]
        if name in UNDERSCORE_ALIASES:  # ERW's spelling (--use_rope / --no-use_rope) besides ours
            flags.append("--" + name)
        p.add_argument(*flags, **kw)
    return p


def resolve_config(argv=None) -> tuple[TrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    config_path, preset, dry_run = args.pop("config"), args.pop("preset"), args.pop("dry_run")
    args.pop("local_rank")
    trainer, deepspeed = load_config_file(config_path) if config_path else ({}, None)
    if preset is None and config_path is None and "data_dir" not in args and "dataset" not in args:
        preset = "demo"
    cfg = TrainConfig()
    if preset:
        cfg.update(PRESETS[preset], source=f"preset {preset}")
    cfg.update(trainer, source=f"--config {config_path} (trainer section)")
    cfg.update(args, source="command line")
    cfg.deepspeed = deepspeed
    if not cfg.run.exp_name:
        cfg.run.exp_name = default_exp_name(cfg)
    validate(cfg)
    if cfg.run.parallel == "deepspeed":  # fill/check the DeepSpeed numbers from the trainer's (parallel_dsconfig)
        from repa_fast.engine.parallel_dsconfig import resolve_deepspeed_config

        where = f"--config {config_path}" if config_path else "--parallel deepspeed"
        cfg.deepspeed = resolve_deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", 1)), cli=set(args), where=where)
        if _phase_flag(cfg) and cfg.deepspeed.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ConfigError(
                f"{where}: {_phase_flag(cfg)} with ZeRO stage 3: the phase change rebuilds the engine over the new "
                "trainable set, which partitioned parameters do not allow; use ZeRO stage 1 or 2, or --parallel ddp"
            )
    return cfg, dry_run


def validate(cfg: TrainConfig) -> None:
    """Cheap consistency checks that need no data or weights; each error says what to change."""
    from repa_fast.models.encoders import parse_encoder_name
    from repa_fast.models.sit import SIT_SIZES, SiT_models

    m, o, r = cfg.model, cfg.optim, cfg.run
    if m.model not in SiT_models:
        raise ConfigError(f"--model {m.model!r} is unknown; choose one of {', '.join(SiT_models)}")
    depth = SIT_SIZES[m.model.split("-")[1].split("/")[0]][0]
    if cfg.target.enc_type and cfg.loss.proj_coeff != 0:
        if not 1 <= m.encoder_depth <= depth:
            raise ConfigError(f"--encoder-depth {m.encoder_depth} is outside 1..{depth} for {m.model}")
        for name in cfg.target.enc_type.split(","):
            try:
                parse_encoder_name(name.strip())
            except (ValueError, NotImplementedError) as e:
                raise ConfigError(f"--enc-type: {e}") from e
    for flag, value, low in [
        ("--batch-size", o.batch_size, 1),
        ("--gradient-accumulation-steps", o.gradient_accumulation_steps, 1),
        ("--max-train-steps", r.max_train_steps, 1),
        ("--checkpointing-steps", r.checkpointing_steps, 1),
        ("--log-every", r.log_every, 1),
        ("--sampling-steps", r.sampling_steps, 0),
        ("--num-workers", cfg.data.num_workers, 0),
        ("--resolution", cfg.data.resolution, 1),
        ("--num-classes", cfg.data.num_classes, 1),
    ]:
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if r.preview_num_steps < 1 or r.preview_cfg_scale < 1:
        raise ConfigError(
            f"--preview-num-steps must be >= 1 and --preview-cfg-scale >= 1 (1 = no guidance), got "
            f"{r.preview_num_steps} and {r.preview_cfg_scale}"
        )
    if not 0 <= o.ema_decay <= 1:
        raise ConfigError(f"--ema-decay must be in [0, 1], got {o.ema_decay}")
    if not 0 <= m.cfg_prob < 1:
        raise ConfigError(f"--cfg-prob must be in [0, 1), got {m.cfg_prob}")
    if r.resume and r.resume_step:
        raise ConfigError("--resume and --resume-step both given: use one (latest checkpoint, or that step)")
    _validate_recipe(cfg, depth)
    if cfg.data.dataset == "auto" and not cfg.data.data_dir:
        raise ConfigError(
            "no --data-dir: pass --data-dir DIR (REPA folder or packed dataset), or run the embedded "
            "demo with `python train.py` (or --preset demo)"
        )
    micro_batch_size(cfg, int(os.environ.get("WORLD_SIZE", 1)))


def _phase_flag(cfg: TrainConfig) -> str | None:
    """The flag that gives the recipe a phase boundary (repa_fast.recipe), if any."""
    if cfg.loss.warmup_steps:
        return "--warmup-steps"
    return "--align-stop-step" if cfg.loss.align_stop_step else None


def _validate_recipe(cfg: TrainConfig, depth: int) -> None:
    """The ERW / HASTE / schedule options (repa_fast.recipe) agree with each other and the model."""
    m, loss, r = cfg.model, cfg.loss, cfg.run
    for flag, value in [("--warmup-steps", loss.warmup_steps), ("--align-stop-step", loss.align_stop_step)]:
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if loss.proj_half_life < 1:
        raise ConfigError(f"--proj-half-life must be >= 1, got {loss.proj_half_life}")
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
    if r.parallel == "fsdp" and _phase_flag(cfg):
        raise ConfigError(
            f"{_phase_flag(cfg)} with --parallel fsdp: the phase change rebuilds the parallel wrapper over the new "
            "trainable set, which FSDP2 (sharding the model in place) does not allow; use --parallel ddp or "
            "deepspeed with ZeRO stage 1/2"
        )
    if loss.align_stop_step and loss.align_stop_step <= loss.warmup_steps:
        raise ConfigError(
            f"--align-stop-step {loss.align_stop_step} must be after --warmup-steps {loss.warmup_steps} (0 = never)"
        )
    if r.init_from and (r.resume or r.resume_step):
        raise ConfigError("--init-from starts a new run from weights; drop --resume/--resume-step, or drop --init-from")


def main(argv=None) -> int:
    from repa_fast.data import DataError
    from repa_fast.engine.checkpoint import CheckpointError

    try:
        cfg, dry_run = resolve_config(argv)
        if dry_run:
            if int(os.environ.get("RANK", 0)) == 0:  # one copy under a launcher
                from repa_fast.recipe import build_recipe

                print(json.dumps({**cfg.to_json(), "recipe": build_recipe(cfg).describe()}, indent=2))
            return 0
        from repa_fast.engine.parallel import PeerFailure
        from repa_fast.engine.trainer import TrainingStopped, train

        try:
            summary = train(cfg)
        except TrainingStopped as e:
            print(f"train.py: stopped: {e}", file=sys.stderr)
            return 3
        except PeerFailure as e:
            print(f"train.py: error: {e}", file=sys.stderr)
            return 4
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary['step']} steps, outputs in {summary['run_dir']}", file=sys.stderr)
    return 0
