"""Shared command-line flags (repa_fast.cli_flags) from typed fields (repa_fast.options, repa_fast.config): one flag
means one thing in train, generate and evaluate; REPA's generate.py command lines parse; values are checked with
errors naming the flag; the libraries import no argparse."""

import ast
import dataclasses
import os

import pytest

from repa_fast import cli_flags, options
from repa_fast.cli import build_parser
from repa_fast.errors import ConfigError
from repa_fast.options import EvalOptions, LayerFeatureOptions, ModelOptions, SamplingOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _actions(p):
    return {a.dest: a for a in p._actions}


def test_flags_linked_to_training_options_take_their_doc_type_and_values():
    from repa_fast.generate import GenerateOptions

    train = _actions(build_parser())
    p = cli_flags.parser("x", "")
    cli_flags.add_model_flags(p)
    cli_flags.add_sampling_flags(p)
    cli_flags.add_eval_flags(p)
    mine = _actions(p)
    linked = {f.name: f.metadata["config"] for cls in (ModelOptions, SamplingOptions, EvalOptions)
              for f in dataclasses.fields(cls) if "config" in f.metadata}  # fmt: skip
    assert {"model", "resolution", "use_rope", "fused_attn", "path_type", "feature_net"} <= set(linked)
    for dest, name in linked.items():
        ours, theirs = mine[dest], train[name]
        assert theirs.help.split(" [")[0].split(" (default")[0] in ours.help, dest  # the training flag's doc
        assert ours.type == theirs.type and ours.choices == theirs.choices, dest
        assert type(ours) is type(theirs), dest  # bool flags: --x / --no-x in both
    assert mine["path_type"].option_strings == train["path_type"].option_strings == ["--path-type"]
    assert "--use_rope" in mine["use_rope"].option_strings  # ERW's spelling, as train.py takes it
    assert GenerateOptions(ckpt="x").sit.fused_attn is True


def test_add_config_flags_makes_the_training_flags_with_other_defaults():
    p = cli_flags.parser("x", "")
    cli_flags.add_config_flags(p, ["model", "encoder_depth", "qk_norm"], defaults={"model": None}, notes={"model": "n"})
    a = _actions(p)
    assert a["model"].default is None and a["model"].help.endswith("; n")
    assert a["encoder_depth"].default == 8 and "[>= 1]" in a["encoder_depth"].help and a["encoder_depth"].type is int
    ns = p.parse_args(["--encoder-depth", "3", "--qk-norm"])
    assert (ns.model, ns.encoder_depth, ns.qk_norm) == (None, 3, True)
    assert p.parse_args(["--no-qk-norm"]).qk_norm is False


def test_repa_generate_command_line_parses():
    """Every flag of REPA's generate.py (generate.py:172-210), with its spelling."""
    from repa_fast.generate import parse_args

    argv = ["--global-seed", "3", "--no-tf32", "--ckpt", "last.pt", "--sample-dir", "s", "--model", "SiT-XL/2",
            "--num-classes", "1000", "--encoder-depth", "8", "--resolution", "256", "--no-fused-attn", "--no-qk-norm",
            "--vae", "mse", "--per-proc-batch-size", "16", "--num-fid-samples", "100", "--mode", "sde",
            "--cfg-scale", "1.8", "--projector-embed-dims", "768", "--path-type", "linear", "--num-steps", "250",
            "--no-heun", "--guidance-low", "0.", "--guidance-high", "0.7", "--no-legacy"]  # fmt: skip
    o = parse_args(argv)
    assert (o.ckpt, o.sample_dir, o.vae, o.tf32) == ("last.pt", "s", "mse", False)
    assert (o.sit.model, o.sit.num_classes, o.sit.encoder_depth, o.sit.fused_attn, o.sit.legacy) == (
        "SiT-XL/2", 1000, 8, False, False
    )  # fmt: skip
    s = o.sampling
    assert (s.global_seed, s.per_proc_batch_size, s.num_fid_samples, s.mode, s.cfg_scale) == (3, 16, 100, "sde", 1.8)
    assert (s.num_steps, s.heun, s.guidance_low, s.guidance_high, s.path_type) == (250, False, 0.0, 0.7, "linear")
    d = parse_args(["--ckpt", "x"])
    assert d.sampling == SamplingOptions() and d.sit == ModelOptions() and d.evaluation == EvalOptions()
    assert (d.weights, d.sample_dir, d.tf32, d.vae, d.calculate_fid) == ("ema", "samples", True, None, False)


def test_values_are_checked_with_the_flag_named():
    cases = [
        (lambda: SamplingOptions(num_steps=0), "--num-steps must be >= 1, got 0"),
        (lambda: SamplingOptions(mode="heun"), r"--mode must be one of \['ode', 'sde'\], got 'heun'"),
        (lambda: SamplingOptions(path_type="vp"), "--path-type must be one of"),
        (lambda: SamplingOptions(guidance_low=0.5, guidance_high=0.2), "needs low <= high"),
        (lambda: ModelOptions(latent_scale=0.0), "--latent-scale must be > 0, got 0.0"),
        (lambda: EvalOptions(batch_size=0), "--eval-batch-size must be >= 1, got 0"),
        (lambda: EvalOptions(feature_net="clip"), "--feature-net must be one of"),
        (lambda: LayerFeatureOptions(ckpt="x", t=1.5), r"--t must be in \[0, 1\], got 1.5"),
    ]
    for make, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            make()


def test_generate_rejects_a_bad_linked_value_before_reading_anything(capsys):
    from repa_fast.generate import main

    assert main(["--ckpt", "nowhere", "--resolution", "0"]) == 2
    assert "--resolution must be >= 1, got 0" in capsys.readouterr().err


def test_every_option_has_a_doc_and_a_distinct_flag():
    from repa_fast.generate import GenerateOptions

    for cls in (SamplingOptions, ModelOptions, EvalOptions, LayerFeatureOptions, GenerateOptions):
        flags = [options.spec(f)["flag"] for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.type)]
        assert len(set(flags)) == len(flags), cls
        for f in dataclasses.fields(cls):
            if f.default_factory is dataclasses.MISSING:
                assert options.spec(f).get("help"), (cls.__name__, f.name)


def test_sampler_modes_are_the_samplers():
    from repa_fast.sample import SAMPLERS

    assert options.SAMPLER_MODES == tuple(sorted(SAMPLERS))


def test_training_evaluation_uses_the_evaluate_options():
    from repa_fast.config import TrainConfig
    from repa_fast.eval.training import eval_options

    cfg = TrainConfig()
    cfg.update({"eval_feature_net": "digits", "eval_batch_size": 7, "inception_weights": "w.pth"}, source="test")
    assert eval_options(cfg) == EvalOptions("digits", "w.pth", 7, options.DEFAULT_CACHE)
    cfg.update({"eval_cache_dir": "/c"}, source="test")
    assert eval_options(cfg).cache_dir == "/c"


LIBRARIES = [
    "repa_fast/options.py",
    "repa_fast/eval/layer_features.py",
    "repa_fast/eval/training.py",
    "repa_fast/engine/checkpoint.py",
    "repa_fast/engine/compat.py",
    "repa_fast/engine/adapters/__init__.py",
    "repa_fast/engine/adapters/base.py",
    "repa_fast/engine/adapters/repa.py",
    "repa_fast/engine/adapters/erw.py",
    "repa_fast/models/encoders.py",
    "repa_fast/models/vit_encoder_files.py",
    "repa_fast/models/weight_files.py",
    # command-line modules whose parsing goes through cli_flags: no argparse of their own either
    "repa_fast/generate.py",
    "repa_fast/evaluate.py",
    "repa_fast/export.py",
    "repa_fast/eval/cknna.py",
    "repa_fast/eval/linear_probe.py",
]


@pytest.mark.parametrize("path", LIBRARIES)
def test_no_argparse_import(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "argparse" not in names
