"""Typed options of the commands besides training: sampling, the SiT built from a checkpoint, evaluation, layer
features. The libraries take these dataclasses; the command lines fill them from their flags (``repa_fast.cli_flags``
makes each flag from its field: name, default, doc and valid values, declared once here).

As the training options (``repa_fast.config``), each field carries its default, a one-line doc and its valid values
(``choices`` or a ``Range``). A field that is a training option under another command (``config="path_type"``)
takes that option's doc and valid values, so a flag means one thing in ``train.py``, generate and evaluate.
``check_options`` enforces the values (a ConfigError naming the flag, the value and what it takes); the
dataclasses check themselves when built.
"""

import dataclasses
import os
from dataclasses import dataclass, field

from repa_fast.config import AT_LEAST_1, NON_NEGATIVE, PROBABILITY, Range, field_specs
from repa_fast.errors import ConfigError

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "repa_fast", "eval")
FEATURE_NETS = ("inception", "digits")
SAMPLER_MODES = ("ode", "sde")  # the keys of repa_fast.sample.SAMPLERS (tests/test_cli_flags.py checks)
WEIGHTS = ("ema", "model")  # which weights of a checkpoint (repa_fast.engine.checkpoint.load_run)
VAE_HELP = (
    "ema | mse (stabilityai/sd-vae-ft-*, hub or local cache), a hub id or a local diffusers directory; none = pixel "
    "space. Default: ema for latent models (as generate.py), none for pixel-space runs"
)


def option(default=dataclasses.MISSING, help: str = "", *, choices=None, check=None, config=None, **meta):
    """A field of an options dataclass: default, one-line doc, valid values; ``config``: the training option it is
    (its doc and valid values are used). Other keys (``flag``, ``aliases``, ``note``, ``hidden``) shape the flag."""
    meta = {"help": help, **meta}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    if config is not None:
        meta["config"] = config
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults need default_factory")
    return field(default=default, metadata=meta)


def _config_field(name: str):
    for n, f in field_specs():
        if n == name:
            return f
    raise KeyError(f"no training option {name!r} in repa_fast.config")


def spec(f: dataclasses.Field) -> dict:
    """The field's flag description: help, choices, check, flag name, aliases (a linked training option's doc and
    valid values first, the field's own keys on top)."""
    out = {}
    if "config" in f.metadata:
        base = _config_field(f.metadata["config"]).metadata
        out |= {k: base[k] for k in ("help", "choices", "check") if k in base}
    out |= {k: v for k, v in f.metadata.items() if v != "" or k != "help"}
    out.setdefault("flag", "--" + f.name.replace("_", "-"))
    return out


def check_options(obj) -> None:
    """Every field of the options dataclass ``obj`` within its choices / range, else a ConfigError naming the flag."""
    for f in dataclasses.fields(obj):
        value, s = getattr(obj, f.name), spec(f)
        if value is None or dataclasses.is_dataclass(value):
            continue
        if "choices" in s and value not in s["choices"]:
            raise ConfigError(f"{s['flag']} must be one of {list(s['choices'])}, got {value!r}")
        if "check" in s and value not in s["check"]:
            raise ConfigError(f"{s['flag']} must be {s['check']}, got {value}")


class Checked:
    """Mixin: the dataclass checks its values when built."""

    def __post_init__(self):
        check_options(self)


@dataclass
class SamplingOptions(Checked):
    """How samples are drawn (generate; REPA generate.py's flags and defaults)."""

    mode: str = option("ode", "sampler: ode (Euler / Heun) or sde (Euler-Maruyama)", choices=SAMPLER_MODES)
    num_steps: int = option(50, "sampler steps", check=AT_LEAST_1)
    heun: bool = option(False, "Heun's second-order ODE steps (ode only)")
    cfg_scale: float = option(1.5, "classifier-free guidance scale", check=Range(1, note="1 = no guidance"))
    guidance_low: float = option(0.0, "guidance interval start: CFG applies for t in [low, high]", check=PROBABILITY)
    guidance_high: float = option(1.0, "guidance interval end", check=PROBABILITY)
    cls_cfg_scale: float | None = option(
        None, "REG checkpoints only: guidance scale of the class token where the image is guided (<= 0: its "
        "conditional half)", note="default 1.5, REG generate.py's", check=Range(),
    )  # fmt: skip
    path_type: str = option("linear", config="path_type")
    labels: str = option(
        "balanced", "class labels: balanced (each class equally often) or random (generate.py's draws)",
        choices=("balanced", "random"),
    )  # fmt: skip
    rounding: str = option("round", "to uint8: round, or truncate (generate.py's)", choices=("round", "truncate"))
    global_seed: int = option(0, "seed; process r draws from seed * world + r (generate.py's rule)", check=NON_NEGATIVE)
    num_fid_samples: int = option(50000, "samples to draw", check=AT_LEAST_1)
    per_proc_batch_size: int = option(32, "samples per batch and process", check=AT_LEAST_1)

    def __post_init__(self):
        check_options(self)
        if self.guidance_low > self.guidance_high:
            raise ConfigError(
                f"--guidance-low {self.guidance_low} is above --guidance-high {self.guidance_high}; the guidance "
                "interval needs low <= high"
            )


# Named sampling settings (generate --preset): flags given explicitly win over them.
SAMPLING_PRESETS = {
    "paper": {"mode": "sde", "num_steps": 250, "cfg_scale": 1.8, "guidance_low": 0.0, "guidance_high": 0.7},
}


@dataclass
class ModelOptions(Checked):
    """What builds a SiT from a checkpoint besides its keys (the keys give projector widths, depth, qk-norm, channels,
    classes, tokens). None: from the run's config.json (or a foreign file's saved flags), else the default named."""

    model: str | None = option(None, config="model", note="default: the run's config.json; required for a .pt file")
    resolution: int | None = option(None, config="resolution", note="default: config.json, else 256")
    num_classes: int | None = option(None, config="num_classes", note="default: config.json, else 1000")
    in_channels: int = option(4, "latent channels (generate.py's flag; the checkpoint's keys decide)", check=AT_LEAST_1)
    latent_scale: float | None = option(None, config="latent_scale", note="default: config.json's, else 0.18215")
    encoder_depth: int | None = option(
        None, config="encoder_depth", note="default: config.json, else 8; with --legacy: where decoder_blocks start"
    )
    use_rope: bool | None = option(
        None, config="use_rope", aliases=("--use_rope",),
        note="it leaves no key, so: the file's saved args, else this flag, else the run's config.json",
    )  # fmt: skip
    legacy: bool = option(
        False, "remap the old decoder_blocks.i keys to blocks.(i + --encoder-depth) as generate.py --legacy"
    )
    fused_attn: bool = option(True, config="fused_attn", note="generate.py defaults to explicit fp32 softmax")
    # REPA generate.py's two flags for what our checkpoints' keys state (generate.py:187-202): checked, never ignored.
    qk_norm: bool | None = option(
        None, "REPA generate.py's --qk-norm/--no-qk-norm; the checkpoint's keys decide, a contradiction is an error"
    )
    projector_embed_dims: str | None = option(
        None, "REPA generate.py's projector widths, e.g. 768 or 768,1024; checked against the checkpoint's projectors"
    )


@dataclass
class EvalOptions(Checked):
    """The feature network and its caches (evaluate, generate --fid-reference, in-training evaluation)."""

    feature_net: str = option("inception", config="eval_feature_net", choices=FEATURE_NETS)
    inception_weights: str | None = option(None, config="inception_weights")
    batch_size: int = option(64, "images per feature batch (ADM: 64)", check=AT_LEAST_1, flag="--eval-batch-size")
    cache_dir: str = option(DEFAULT_CACHE, "reference statistics cache and digits network", config="eval_cache_dir")


@dataclass
class LayerFeatureOptions(Checked):
    """Which run, images and noise level the per-layer features (CKNNA, linear probes) come from."""

    ckpt: str = option(help="repa_fast run directory (or one of its checkpoint directories)", required=True)
    weights: str = option("ema", "which weights of the checkpoint", choices=WEIGHTS)
    t: float = option(0.5, "interpolation time of x_t (0 = clean; REPA: 0, 0.25, 0.5)", check=PROBABILITY)
    num_images: int = option(1024, "images of the run's dataset, in order", check=AT_LEAST_1)
    batch_size: int = option(64, "images per batch", check=AT_LEAST_1)
    enc_type: str | None = option(None, "target encoder (default: the run's first one)")
    encoder_checkpoint_dir: str | None = option(
        None, "directory with the encoder weight files (default: the run's)", config="encoder_checkpoint_dir"
    )
    seed: int = option(0, "seed of the noise in x_t", check=NON_NEGATIVE)
    out: str | None = option(None, "output directory (default: <run dir>/eval)")
