"""Command-line flags shared by the commands, each defined once (the habit of SiT's ``parse_transport_args``,
willisma/SiT train_utils.py:6, which train, sample and sample_ddp all call).

Every flag is made from a typed field: a training option (``repa_fast.config``: ``add_config_flags``) or a field of
an options dataclass (``repa_fast.options``: ``add_option_flags``), with that field's name, type, default, doc and
valid values; a field linked to a training option (``option(config=...)``) gets the training flag's doc and values.
The groups, and the commands that take them:

    add_checkpoint_flags   --ckpt --weights                          generate, cknna, linear_probe (export: --weights)
    add_model_flags        --model --resolution --num-classes --in-channels --latent-scale --encoder-depth
                           --use-rope --legacy --fused-attn --qk-norm --projector-embed-dims   generate
    add_vae_flag           --vae                                          generate
    add_sampling_flags     --preset --mode --num-steps --heun --cfg-scale --guidance-low --guidance-high
                           --path-type --labels --rounding --global-seed --num-fid-samples --per-proc-batch-size
                                                                          generate
    add_eval_flags         --inception-weights --feature-net --eval-batch-size --cache-dir   evaluate, generate
    add_layer_feature_flags  --t --num-images --batch-size --enc-type --encoder-checkpoint-dir --seed --out
                                                                          cknna, linear_probe

``options_from(namespace, cls)`` builds the dataclass back from the parsed flags (nested dataclasses included), which
checks the values (``repa_fast.options.check_options``). This is the command-line layer: libraries never import it.
"""

import argparse
import dataclasses
import sys
import typing

from repa_fast import errors
from repa_fast.config import TrainConfig
from repa_fast.options import (
    SAMPLING_PRESETS,
    VAE_HELP,
    WEIGHTS,
    EvalOptions,
    LayerFeatureOptions,
    ModelOptions,
    SamplingOptions,
    spec,
)


def parser(prog: str, description: str, allow_abbrev: bool = False) -> argparse.ArgumentParser:
    """A command's parser: no abbreviations (a misspelt flag is an error, never a prefix match; export has always
    taken them), the module doc as description, ``--debug`` (repa_fast.errors)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=allow_abbrev,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    errors.add_debug_flag(p)
    return p


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(s: dict, default) -> str:
    text = s.get("help", "")
    if "check" in s:
        text += f" [{s['check']}]"
    if s.get("note"):
        text += f"; {s['note']}"
    elif default is not None and default is not False and default is not dataclasses.MISSING:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse %-formats help texts


def add_field_flag(p, f: dataclasses.Field, hint, *, default=dataclasses.MISSING, **overrides) -> None:
    """One flag for field ``f`` (type ``hint``): bool fields get --x / --no-x; others their type and choices."""
    s = spec(f) | overrides
    if default is dataclasses.MISSING:
        default = f.default
    kw = {"dest": f.name, "help": _help(s, default)}
    if s.get("required"):
        kw["required"] = True
    else:
        kw["default"] = default
    typ = _base_type(hint)
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = typ
        if "choices" in s:
            kw["choices"] = s["choices"]
    p.add_argument(s["flag"], *s.get("aliases", ()), **kw)


def add_option_flags(p, cls, *, skip=()) -> None:
    """A flag for every field of the options dataclass ``cls`` except nested dataclasses and ``skip``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip and not dataclasses.is_dataclass(_base_type(hints[f.name])):
            add_field_flag(p, f, hints[f.name])


def add_config_flags(p, names, *, defaults=None, notes=None) -> None:
    """The training flags of config fields ``names`` (their doc, type, choices, range; ``defaults`` / ``notes`` where
    another command reads them differently, e.g. None = "from the run's config.json")."""
    fields, hints = {}, {}
    for section in TrainConfig().sections():
        section_hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            fields[f.name], hints[f.name] = f, section_hints[f.name]
    for name in names:
        kw = {"note": notes[name]} if notes and name in notes else {}
        default = (defaults or {}).get(name, dataclasses.MISSING)
        add_field_flag(p, fields[name], hints[name], default=default, **kw)


def options_from(ns: argparse.Namespace, cls):
    """The options dataclass ``cls`` from parsed flags (nested dataclass fields built from the same namespace)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        typ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(typ):
            values[f.name] = options_from(ns, typ)
        elif hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
    return cls(**values)


def explicit_flags(p: argparse.ArgumentParser, argv) -> set[str]:
    """Destinations of the flags written on the command line ``argv`` (None: sys.argv)."""
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("-")]
    return {a.dest for a in p._actions if any(g in a.option_strings for g in given)}


# ---------------------------------------------------------------------------------------------------------------
# The groups


def add_weights_flag(p, help: str = "which weights of the checkpoint: the EMA or the raw model weights") -> None:
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help=help + " (default: ema)")


def add_checkpoint_flags(p, help: str) -> None:
    g = p.add_argument_group("checkpoint")
    g.add_argument("--ckpt", required=True, help=help)
    add_weights_flag(g)


def add_model_flags(p) -> None:
    g = p.add_argument_group("model (what the checkpoint's keys do not say)")
    add_option_flags(g, ModelOptions)  # with REPA generate.py's --qk-norm/--no-qk-norm and --projector-embed-dims


def add_vae_flag(p) -> None:
    p.add_argument_group("VAE").add_argument("--vae", default=None, help=VAE_HELP.replace("%", "%%"))


def add_sampling_flags(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--preset", choices=sorted(SAMPLING_PRESETS), default=None, help="paper = REPA README evaluation (SDE, 250 "
        "steps, cfg 1.8, guidance interval [0, 0.7]); flags given explicitly win",
    )  # fmt: skip
    add_option_flags(g, SamplingOptions)


def apply_sampling_preset(p: argparse.ArgumentParser, ns: argparse.Namespace, argv) -> None:
    """Set ``--preset``'s values on ``ns``, except for flags written on the command line."""
    explicit = explicit_flags(p, argv)
    for k, v in SAMPLING_PRESETS.get(ns.preset, {}).items():
        if k not in explicit:
            setattr(ns, k, v)


def add_eval_flags(p) -> None:
    add_option_flags(p.add_argument_group("evaluation (feature network)"), EvalOptions)


def add_layer_feature_flags(p) -> None:
    add_checkpoint_flags(p, LayerFeatureOptions.__dataclass_fields__["ckpt"].metadata["help"])
    add_option_flags(p.add_argument_group("layer features"), LayerFeatureOptions, skip=("ckpt", "weights"))
