"""Non-finite training is visible and bounded (issue 20 item 2): skipped steps log loss NaN (never 0.0) and are
counted; --max-skipped-steps consecutive ones stop the run with exit code 7 naming the step the divergence started;
the streak is counted on device (no host sync in the step)."""

import json
import math
import os

import torch

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.engine import trainer
from repa_fast.engine.metrics import LossMeter
from repa_fast.engine.profiling import count_ops, host_syncs

from ..engine.helpers import StepRig, tiny_cfg
from .common import ckpt, tiny_args


def _poison(monkeypatch, bad_calls):
    """training_loss returns NaN losses on the given (1-based) calls: one call per step here (no accumulation)."""
    real, calls = trainer.training_loss, {"n": 0}

    def loss(*a, **kw):
        calls["n"] += 1
        out = real(*a, **kw)
        if calls["n"] in bad_calls:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(trainer, "training_loss", loss)


def _log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_a_diverged_run_stops_with_exit_7_naming_where_it_started(tmp_path, capsys, monkeypatch):
    _poison(monkeypatch, range(3, 1000))
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "--max-skipped-steps", "3", steps=20, ckpt_every=2)) == errors.EXIT_DIVERGED == 7
    err = capsys.readouterr().err
    run = str(tmp_path / "run")
    assert "training diverged at step 3: 3 consecutive steps" in err and "stopped at step 5" in err
    assert f"the newest intact checkpoint is {ckpt.step_dir(run, 4)}" in err and "Traceback" not in err
    assert ckpt.list_checkpoints(run) == [2, 4]  # nothing after the divergence
    log = _log(run)
    assert [s for s in log if math.isnan(log[s]["loss"])] == [3, 4, 5]  # NaN, not 0.0
    assert all(log[s]["skipped_steps"] == 1 for s in (3, 4, 5)) and log[2]["skipped_steps"] == 0
    assert log[2]["loss"] > 0
    a, b = (ckpt.read_checkpoint(ckpt.step_dir(run, s)) for s in (2, 4))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # skipped steps changed nothing
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_a_short_streak_is_counted_and_reported(tmp_path, capsys, monkeypatch):
    _poison(monkeypatch, {3, 4})
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "--max-skipped-steps", "3", "--log-every", "2", steps=8, ckpt_every=8)) == 0
    err = capsys.readouterr().err
    assert "done: 8 steps (2 skipped)" in err
    log = _log(str(tmp_path / "run"))
    assert log[4]["skipped_steps"] == 2 and math.isnan(log[4]["loss"])  # every micro-batch of 3..4 non-finite
    assert all(log[s]["skipped_steps"] == 0 and log[s]["loss"] > 0 for s in (2, 6, 8))
    state = ckpt.read_checkpoint(ckpt.step_dir(str(tmp_path / "run"), 8))["state"]
    assert state["skipped_total"] == 2


def test_the_streak_is_counted_on_device_without_a_host_sync(tmp_path):
    rig = StepRig(tiny_cfg(tmp_path))
    rig.meter = LossMeter(rig.device, max_skipped=2)
    rig.step()  # lazy optimizer state
    counts = count_ops(rig.step)
    assert host_syncs(counts) == 0 and sum(counts.values()) > 100
    for skipped in (True, True, False):  # the meter alone: a streak of 2 from the step given reaches the bound
        rig.meter.add_step(torch.tensor(float("nan")), torch.tensor(skipped), step=rig.state.step + 1)
        rig.state.step += 1
    assert rig.meter.pending_divergence(rig.backend) == 3  # steps 1-2 trained, 3-4 skipped: started at 3
    rig.meter.read(rig.backend)
    assert rig.meter.diverged_at == 3
