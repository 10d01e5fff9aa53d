"""Command line of ``train.py``: every reference flag, plus --config, --preset, --dry-run and --resume.

Resolution order: dataclass defaults < preset < the --config file's "trainer" section < flags given on the command
line. ``python train.py`` with no data flags and no --config runs the ``demo`` preset; naming a model or an encoder
without ``--data-dir`` is an error (the demo is asked for, never fallen into). Every option is checked where it is
declared (repa_fast/config.py), and every rule between options (``TrainConfig.validate``) runs before anything is
built or written; ``check_runtime`` then checks this machine (not for --dry-run).
"""

import argparse
import json
import os
import shlex
import sys
import typing

from repa_fast import errors
from repa_fast.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    default_exp_name,
    field_specs,
    load_config_file,
    reg_flags,
    run_dir,
)

# Options that name a recipe rather than tweak the demo: given without --data-dir they are a mistake, not a demo.
RECIPE_OPTIONS = ("model", "enc_type", "encoder_checkpoint_dir")
# Options that ERW's train.py spells with an underscore (LINs-lab/ERW train.py:50); both spellings are accepted.
UNDERSCORE_ALIASES = ("use_rope",)


def _arg_type(f):
    hint = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307 (own annotations)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def ranged(typ, check):
    """An argparse ``type`` for the flags of the other commands (tools/): parses with ``typ``, then checks ``check``
    (a ``config.Range``), so their ranges read as train.py's."""

    def parse(text: str):
        value = typ(text)
        if value not in check:
            raise argparse.ArgumentTypeError(f"must be {check}, got {text}")
        return value

    parse.__name__ = typ.__name__  # argparse names the type in its "invalid int value" message
    return parse


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
    errors.add_debug_flag(p)
    defaults = TrainConfig().flat()
    for name, f in field_specs():
        check = f" [{f.metadata['check']}]" if "check" in f.metadata else ""
        text = f"{f.metadata['help']}{check} (default: {defaults[name]})".replace("%", "%%")  # argparse %-formats
        kw = {"dest": name, "default": argparse.SUPPRESS, "help": text}
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
    args.pop("local_rank"), args.pop("debug")
    trainer, deepspeed = load_config_file(config_path) if config_path else ({}, None)
    implied_demo = preset is None and config_path is None and "data_dir" not in args and "dataset" not in args
    if implied_demo:
        preset = "demo"
    cfg = TrainConfig()
    if preset:
        cfg.update(PRESETS[preset], source=f"preset {preset}")
    cfg.update(reg_flags(trainer), source=f"--config {config_path} (trainer section)")
    cfg.update(reg_flags(args), source="command line")  # REG's --cls turns REG on (config.reg_flags)
    cfg.deepspeed = deepspeed
    if not cfg.run.exp_name:
        cfg.run.exp_name = default_exp_name(cfg)
    world = _launch_world()
    cfg.validate(world)  # every cross-option rule (repa_fast/config.py)
    _check_vae(cfg)
    named = [k for k in RECIPE_OPTIONS if k in args]
    if implied_demo and named:
        flags = " ".join(f"--{k.replace('_', '-')} {args[k]}" for k in named)
        raise ConfigError(
            f"{flags} given without --data-dir: a named model or encoder trains on your data, not on the embedded "
            "demo. Pass --data-dir DIR (REPA folder or packed dataset), or --preset demo to run the demo with it"
        )
    if cfg.run.parallel == "deepspeed":  # the one resolution: the trainer's numbers fill/check DeepSpeed's
        from repa_fast.engine.parallel.dsconfig import resolve_deepspeed_config

        where = f"--config {config_path}" if config_path else "--parallel deepspeed"
        cfg.deepspeed = resolve_deepspeed_config(cfg, world, cli=set(args), where=where)
    return cfg, dry_run


def _launch_world() -> int:
    from repa_fast.engine.parallel.process_group import launch_env

    return launch_env()[1]


def _check_vae(cfg: TrainConfig) -> None:
    """The --vae weights are there (a file check, done for --dry-run too; not a rule between options)."""
    if cfg.data.vae:
        from repa_fast.data.vae import read_vae_config

        read_vae_config(cfg.data.vae)  # a DataError naming the path and how to get the weights


def check_runtime(cfg: TrainConfig) -> None:
    """Checks that need this machine (not done for --dry-run, which may run on a login node)."""
    import torch

    from repa_fast.engine.metrics import import_sink
    from repa_fast.engine.parallel.process_group import launch_env

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    check_speed_options(cfg)
    if cfg.run.gpu_memory_gb is not None:  # a stated budget is honoured by a real run too, before anything is built
        from repa_fast.memory_check import check_memory, refuse_if_too_big

        _, world, local_rank = launch_env()
        refuse_if_too_big(check_memory(cfg, world, local_rank))
    if launch_env()[0] == 0:
        import_sink(cfg.run.report_to)  # a missing logging package is refused before anything is written
    _check_writable(run_dir(cfg))


def _train_device(cfg: TrainConfig):
    """The device this process will train on (engine/parallel's rule: --device, else CUDA LOCAL_RANK if available)."""
    import torch

    from repa_fast.engine.parallel.process_group import launch_env

    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", launch_env()[2] % torch.cuda.device_count())


def check_speed_options(cfg: TrainConfig) -> None:
    """--fp8 and an explicit --attn-backend can run on this machine (before anything is built or written)."""
    m = cfg.model
    if m.fp8 == "none" and m.attn_backend in ("auto", "sdpa", "math"):
        return
    import torch

    device = _train_device(cfg)
    if m.fp8 != "none":
        from repa_fast.engine.fp8 import check_fp8

        check_fp8(device)  # ConfigError naming the GPU fp8 needs and the one found
    if m.attn_backend not in ("auto", "sdpa", "math"):
        from repa_fast.cost.shapes import sit_shape
        from repa_fast.kernels.attention import select_backend

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision, torch.float32)
        head_dim = sit_shape(m.model).head_dim
        q = torch.empty(1, 16, 1, head_dim, dtype=dtype, device=device)  # the SiT's head width and autocast dtype
        try:
            select_backend(q, m.attn_backend)
        except RuntimeError as e:
            raise ConfigError(
                f"--attn-backend {m.attn_backend} cannot run here ({device}, {cfg.run.mixed_precision}): {e} "
                "Drop --attn-backend (auto picks the fastest available) or choose sdpa."
            ) from e


def _check_writable(path: str) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory (checked without writing anything)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--output-dir: cannot write to {path} ({probe} is not a writable directory); "
            "choose a writable --output-dir"
        )


def resume_command(argv: list[str]) -> str:
    """``argv`` as a command continuing this run: --resume instead of any --resume-step."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume-step":
            skip = True
        elif not a.startswith("--resume-step=") and a != "--resume":
            out.append(a)
    return shlex.join(["python", "train.py", *out, "--resume"])


@errors.entry_point("train.py")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, dry_run = resolve_config(argv)
    if dry_run:
        from repa_fast.engine.parallel.process_group import launch_env
        from repa_fast.memory_check import check_memory, format_table, refuse_if_too_big

        rank, world, local_rank = launch_env()
        memory = check_memory(cfg, world, local_rank)  # predicted peak per GPU by part (repa_fast/cost/memory.py)
        refuse_if_too_big(memory)  # a ConfigError naming the options that fit
        if rank == 0:  # one copy under a launcher
            from repa_fast.recipe import build_recipe, method_summary

            summary = {"method": method_summary(cfg), **cfg.to_json(), "recipe": build_recipe(cfg).describe()}
            print(json.dumps({**summary, "memory": memory.to_json()}, indent=2))
            print(format_table(memory), file=sys.stderr)
        return errors.EXIT_OK
    check_runtime(cfg)
    from repa_fast.engine.parallel import PeerFailure
    from repa_fast.engine.trainer import train

    try:
        summary = train(cfg, resume_command=resume_command(argv))
    except PeerFailure as e:
        raise errors.PeerError(str(e)) from e
    if summary.get("stopped_by"):
        print(
            f"train.py: stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint "
            f"{summary['checkpoint']}. Continue with: {summary['resume_command']}",
            file=sys.stderr,
        )
        return errors.EXIT_SIGNAL
    skipped = summary.get("skipped_steps", 0)
    print(f"done: {summary['step']} steps ({skipped} skipped), outputs in {summary['run_dir']}", file=sys.stderr)
    return errors.EXIT_OK
