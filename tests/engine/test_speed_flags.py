"""The speed options of train.py (issue 18): --fp8, --activation-checkpointing, --attn-backend, --gpu-memory-gb.

Declared once (repa_fast/config.py), checked before anything is built or written (repa_fast/cli.py
``check_speed_options``), applied in repa_fast/build.py ``apply_speed_options`` (fp8, checkpointing, then compile and
wrap), recorded in config.json and free to change on resume (not weight options).
"""

import json
import os

import pytest
import torch

from repa_fast import build as B
from repa_fast.cli import check_runtime, main
from repa_fast.config import AC_MODES, ATTN_BACKENDS, TrainConfig, weight_options
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine import fp8 as fp8_mod
from repa_fast.engine.activation_checkpoint import is_checkpointed, parse_ac_mode
from repa_fast.engine.trainer import train
from repa_fast.errors import ConfigError
from repa_fast.kernels.attention import BACKENDS

from .helpers import tiny_args, tiny_cfg

SPEED = ("fp8", "activation_checkpointing", "attn_backend", "gpu_memory_gb")


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_declared_values_agree_with_the_engine():
    assert ATTN_BACKENDS == BACKENDS
    for mode in ("none", "full", "mlp", "every:1", "every:3", "every:12"):
        assert mode in AC_MODES
        parse_ac_mode(mode)  # the engine accepts what the config accepts
    for bad in ("every:0", "every:", "every:-1", "all", "MLP", "every:2x", "", None, 3):
        assert bad not in AC_MODES
    for bad in ("every:0", "all"):
        with pytest.raises(ConfigError):
            parse_ac_mode(bad)


def test_defaults_keep_todays_model_and_record_the_options(tmp_path):
    cfg = TrainConfig()
    assert (cfg.model.fp8, cfg.model.activation_checkpointing, cfg.model.attn_backend) == ("none", "none", "auto")
    assert cfg.run.gpu_memory_gb is None
    assert B.model_kwargs(cfg.model)["attn_backend"] == "auto" and B.model_kwargs(cfg.model)["fused_attn"] is True
    assert not set(SPEED) & set(weight_options())  # speed options may change on resume
    flat = tiny_cfg(tmp_path, "--activation-checkpointing", "every:2", "--gpu-memory-gb", "40").to_json()["trainer"]
    assert (flat["activation_checkpointing"], flat["gpu_memory_gb"], flat["fp8"]) == ("every:2", 40.0, "none")


def test_attn_backend_reaches_the_sit(tmp_path):
    cfg = tiny_cfg(tmp_path, "--attn-backend", "math")
    model = B.build_model(cfg, (2, 4, 4), 10, [32])
    assert {b.attn.attn_backend for b in model.blocks} == {"math"}
    cfg = tiny_cfg(tmp_path, "--no-fused-attn")  # the reference switch still means math
    assert {b.attn.attn_backend for b in B.build_model(cfg, (2, 4, 4), 10, [32]).blocks} == {"math"}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--activation-checkpointing", "every:0"], "--activation-checkpointing must be one of none, full, mlp"),
        (["--gpu-memory-gb", "0"], "--gpu-memory-gb must be > 0"),
        (["--attn-backend", "flash", "--no-fused-attn"], "contradicts --attn-backend flash"),
    ],
)
def test_bad_values_are_config_errors(tmp_path, capsys, flags, message):
    assert main([*tiny_args(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without fp8 tensor cores")
def test_fp8_without_a_capable_gpu_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main([*tiny_args(tmp_path), "--fp8", "tensorwise"]) == 2
    err = capsys.readouterr().err
    assert "--fp8 needs an NVIDIA GPU of compute capability 8.9" in err and "Train without --fp8" in err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU some explicit backends can run")
@pytest.mark.parametrize("backend", ["flash", "cudnn_attention", "xformers"])
def test_explicit_attn_backend_unavailable_here_is_refused(tmp_path, capsys, backend):
    assert main([*tiny_args(tmp_path), "--attn-backend", backend]) == 2
    assert f"--attn-backend {backend} cannot run here (cpu" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
    check_runtime(tiny_cfg(tmp_path, "--attn-backend", "sdpa"))  # always available


def test_fp8_behind_a_passing_gate_converts_the_blocks_and_trains(tmp_path, monkeypatch):
    """The capability gate (engine/fp8.py ``check_fp8``) monkeypatched to pass: check_runtime accepts --fp8 and the
    trainer converts the SiT blocks' Linears (torchao's CPU emulation standing in for the fp8 GEMMs)."""
    pytest.importorskip("torchao.float8", reason="pip install 'repa_fast[fp8]'")
    monkeypatch.setattr(fp8_mod, "check_fp8", lambda device=None: None)
    real, seen = fp8_mod.apply_fp8, {}

    def emulated(model, recipe="tensorwise", **kw):
        seen["recipe"], seen["names"] = recipe, real(model, recipe, emulate=True)
        return seen["names"]

    monkeypatch.setattr(fp8_mod, "apply_fp8", emulated)
    cfg = tiny_cfg(tmp_path, "--fp8", "rowwise", "--model", "SiT-T/4", steps=2, ckpt_every=2)
    cfg.model.model = "SiT-S/4"  # width 384: the blocks' Linears have dims that are multiples of 16
    cfg.model.projector_dim = 64
    check_runtime(cfg)
    summary = train(cfg)
    assert seen["recipe"] == "rowwise"
    assert len(seen["names"]) == 4 * 12 and all(".mlp.fc" in n or ".attn." in n for n in seen["names"])
    losses = [r["loss"] for r in _log(summary["run_dir"])]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    sd = ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], 2))["model"]
    assert "blocks.0.mlp.fc1.weight" in sd  # Float8Linear keeps the parameter names


@pytest.mark.parametrize("mode", ["full", "mlp", "every:2"])
def test_activation_checkpointing_trains_bitwise_like_without(tmp_path, monkeypatch, mode):
    """Same losses at every step and the same weights after 3 optimizer steps (the gradients of each step equal),
    with the modules the mode names really checkpointed in the trained model."""
    applied = {}
    real = B.apply_speed_options

    def spy(cfg, model, device):
        real(cfg, model, device)
        applied["n"] = sum(is_checkpointed(m) for m in model.modules())

    monkeypatch.setattr(B, "apply_speed_options", spy)
    plain = train(tiny_cfg(tmp_path / "plain", steps=3, ckpt_every=1))
    assert applied.pop("n") == 0
    ac = train(tiny_cfg(tmp_path / "ac", "--activation-checkpointing", mode, steps=3, ckpt_every=3))
    depth = 6  # SiT-T
    assert applied["n"] == {"full": depth, "mlp": depth, "every:2": depth // 2}[mode]
    a, b = _log(plain["run_dir"]), _log(ac["run_dir"])
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 3
    first, sa, sb = (
        ckpt.read_checkpoint(ckpt.step_dir(r["run_dir"], s))["model"] for r, s in ((plain, 1), (plain, 3), (ac, 3))
    )
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert sum(not torch.equal(first[k], sa[k]) for k in sa) > 0  # the weights moved: not two untouched models


def test_a_resume_may_change_the_speed_options(tmp_path):
    """A run checkpointed at step 2 without activation checkpointing resumes with --activation-checkpointing mlp: not
    refused (speed options are not weight options), its config.json records the new mode, and its step-4 weights
    are bitwise those of the straight run (checkpointing is exact)."""
    straight = train(tiny_cfg(tmp_path / "straight", steps=4, ckpt_every=2))
    base = tiny_cfg(tmp_path / "resumed", steps=4, ckpt_every=2)
    base.run.max_train_steps = 2
    first = train(base)
    resumed = train(tiny_cfg(tmp_path / "resumed", "--resume", "--activation-checkpointing", "mlp", steps=4))
    assert resumed["step"] == 4 and first["run_dir"] == resumed["run_dir"]
    with open(os.path.join(resumed["run_dir"], "config.json")) as f:
        assert json.load(f)["trainer"]["activation_checkpointing"] == "mlp"
    a, b = (ckpt.read_checkpoint(ckpt.step_dir(r["run_dir"], 4))["model"] for r in (straight, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_activation_checkpointing_under_compile_matches_eager(tmp_path):
    """build_phase's order: checkpointing first, then each block compiled (aot_eager), whose compiled forward is
    the checkpointed one; the losses match the eager plain run (compile reorders float ops: 1e-5 relative)."""
    plain = train(tiny_cfg(tmp_path / "plain", steps=2, ckpt_every=2))
    args = ("--activation-checkpointing", "full", "--compile", "--compile-backend", "aot_eager")
    both = train(tiny_cfg(tmp_path / "both", *args, steps=2, ckpt_every=2))
    a, b = _log(plain["run_dir"]), _log(both["run_dir"])
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])
