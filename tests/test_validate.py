"""``TrainConfig.validate``: every rule between options in one place, so a library caller of ``train(cfg)`` is refused
with the CLI's message, and the in-training evaluation applies the same rule as both (repa_fast/config.py)."""

import os
import re

import pytest

from repa_fast.config import ConfigError, TrainConfig, check_eval

from .engine.helpers import tiny_args, tiny_cfg

# (flags for train.py, the same options set as attributes by a library caller, a part of the message)
BAD = [
    (["--warmup-steps", "4"], {"warmup_steps": 4}, "--warmup-steps 4 leaves no full training"),
    (["--resume", "--resume-step", "2"], {"resume": True, "resume_step": 2}, "--resume and --resume-step both"),
    (["--init-from", "w.pt", "--resume"], {"init_from": "w.pt", "resume": True}, "--init-from starts a new run"),
    (["--warmup-steps", "2", "--align-stop-step", "1"], {"warmup_steps": 2, "align_stop_step": 1}, "must be after"),
    (["--encoder-depth", "9"], {"encoder_depth": 9}, "--encoder-depth 9 is outside 1..6 for SiT-T/4"),
    (["--gradient-accumulation-steps", "3"], {"gradient_accumulation_steps": 3}, "not divisible"),
    (
        ["--eval-every", "2", "--eval-samples", "1", "--fid-reference", "x.npz"],
        {"eval_every": 2, "eval_samples": 1, "fid_reference": "x.npz"},
        "--eval-samples 1 is too small",
    ),
]


def _set(cfg: TrainConfig, values: dict) -> TrainConfig:
    """Set flat options as a library user does: plain attribute assignment, no ``update`` and its checks."""
    for key, value in values.items():
        (section,) = [s for s in cfg.sections() if hasattr(s, key)]
        setattr(section, key, value)
    return cfg


def _cli_message(capsys) -> str:
    err = capsys.readouterr().err
    m = re.search(r"train\.py: error: (.*) \(--debug shows the traceback\)", err, re.S)
    assert m, err
    return m.group(1)


@pytest.mark.parametrize("flags,attrs,text", BAD, ids=[b[2][:24] for b in BAD])
def test_library_train_is_refused_with_the_clis_message(tmp_path, capsys, flags, attrs, text):
    from repa_fast.cli import main
    from repa_fast.engine.trainer import train

    assert main(tiny_args(tmp_path / "cli", *flags, steps=4)) == 2
    cli = _cli_message(capsys)
    assert text in cli
    cfg = _set(tiny_cfg(tmp_path / "lib", steps=4), attrs)  # valid when made, broken afterwards
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert str(e.value) == cli
    assert not os.path.exists(tmp_path / "lib") and not os.path.exists(tmp_path / "cli")  # nothing was written


def test_a_range_bypassed_by_assignment_is_still_refused(tmp_path):
    from repa_fast.engine.trainer import train

    cfg = _set(tiny_cfg(tmp_path, steps=2), {"eval_every": -1})
    with pytest.raises(ConfigError, match=r"option 'eval_every' \(--eval-every\) must be >= 0 \(0 = never\), got -1"):
        train(cfg)
    cfg = _set(tiny_cfg(tmp_path, steps=2), {"learning_rate": 0.0})
    with pytest.raises(ConfigError, match="'learning_rate'.* must be > 0"):
        cfg.validate()


def test_in_training_evaluation_applies_the_same_eval_rule(tmp_path):
    """One rule for the smallest FID-N: the evaluator refuses what the CLI refuses, with the same message, and
    accepts what the CLI accepts (2 samples, the minimum of eval.fid.MIN_SAMPLES)."""
    from repa_fast.build import build_dataset
    from repa_fast.eval.fid import MIN_SAMPLES, FeatureStats
    from repa_fast.eval.training import make_training_evaluator

    cfg = _set(tiny_cfg(tmp_path, steps=2), {"eval_every": 2, "eval_samples": MIN_SAMPLES - 1})
    with pytest.raises(ConfigError) as by_config:
        cfg.validate()
    with pytest.raises(ConfigError) as by_evaluator:
        make_training_evaluator(cfg, build_dataset(cfg), "cpu", True)
    assert str(by_config.value) == str(by_evaluator.value)
    assert f"at least {MIN_SAMPLES} samples" in str(by_config.value)
    cfg.run.eval_samples = MIN_SAMPLES
    check_eval(cfg)  # the smallest accepted N
    with pytest.raises(ConfigError, match="pass --fid-reference"):  # the evaluator's own (file) check comes next
        make_training_evaluator(cfg, build_dataset(cfg), "cpu", True)
    import numpy as np

    FeatureStats.from_features(np.random.default_rng(0).standard_normal((MIN_SAMPLES, 3)))  # the FID computes
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES} feature vectors"):
        FeatureStats.from_features(np.random.default_rng(0).standard_normal((MIN_SAMPLES - 1, 3)))


@pytest.mark.parametrize("flags", [["--align-stop-step", 2], ["--warmup-steps", 2]], ids=["haste", "erw"])
def test_a_phase_boundary_is_accepted_under_every_backend(tmp_path, flags):
    """ERW's and the HASTE-style stop's phase change runs under FSDP2 and ZeRO-3 too (the shards are gathered and the
    model wrapped again: engine/parallel ``unshard``); validate once refused them. The runs themselves are
    tests/engine/test_method_matrix.py."""
    cfg = tiny_cfg(tmp_path, *flags, steps=4)
    for parallel, ds in [("fsdp", None), ("deepspeed", {"zero_optimization": {"stage": 3}})]:
        cfg.run.parallel, cfg.deepspeed = parallel, ds
        cfg.validate()
