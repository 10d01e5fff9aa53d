"""The pieces the loop asks instead of deciding: ``checkpoint.Checkpointer`` (when a save is due, how it is written),
``build.rank_seed`` (the one reseed rule), ``process_group.launch_env`` (the launcher environment) and
``io.publish`` (a work area's last step)."""

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repa_fast.build import rank_seed, seed_everything
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.parallel import Backend
from repa_fast.engine.parallel.process_group import launch_env
from repa_fast.io import publish


def test_a_save_is_due_on_the_cadence_at_the_end_at_phase_ends_and_on_a_stop(tmp_path):
    c = ckpt.Checkpointer(str(tmp_path), every=5, last_step=12, boundaries=[3])
    assert [s for s in range(1, 13) if c.due(s)] == [3, 5, 10, 12]
    assert c.due(7, stopping=True) and not c.due(7)


def test_save_writes_the_loops_state_on_rank_0_and_resumes_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    backend = Backend("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    backend.wrap(model, opt)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sampler = SimpleNamespace(state_dict=lambda: {"epoch": 1, "consumed": 8})
    state = SimpleNamespace(model=model, ema=backend.make_ema(model), scaler=None, sampler=sampler, step=7,
                            nonfinite_total=2, phase=SimpleNamespace(name="full"))  # fmt: skip
    c = ckpt.Checkpointer(str(tmp_path), every=5, last_step=10, keep=1, config={"seed": 3})
    path = c.save(state, backend)
    assert path == ckpt.step_dir(str(tmp_path), 7)
    saved = ckpt.read_checkpoint(path, rank=0)
    assert torch.equal(saved["model"]["weight"], model.weight.detach())
    s = saved["state"]
    assert (s["step"], s["phase"], s["nonfinite_total"], s["world_size"], s["config"]) == (7, "full", 2, 1, {"seed": 3})
    assert s["sampler"] == {"epoch": 1, "consumed": 8} and s["optimizer"]["state"]  # the AdamW moments
    assert "rng" in saved
    state.step = 10
    c.save(state, backend)
    assert ckpt.list_checkpoints(str(tmp_path)) == [10]  # keep=1: the older one is gone once the new one is in place


def test_the_reseed_rule_is_seed_plus_rank_at_step_0_and_distinct_after():
    assert rank_seed(5, 3) == 8  # the reference's seed + process index
    for seed in (0, 1, 12345):
        seeds = {rank_seed(seed, rank, step) for rank in range(64) for step in (0, 1, 2, 1000, 400000)}
        assert len(seeds) == 64 * 5  # within a run every (rank, step) has its own stream
    assert rank_seed(0, 2, 7) == 7 * 1_000_003 + 2  # at seed 0 the foreign-resume formula it replaced
    seed_everything(rank_seed(1, 1, 4))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(rank_seed(1, 1, 4))
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.mark.parametrize(
    "env,default,want",
    [
        ({}, 0, (0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, 0, (3, 4, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, 5, (3, 4, 1)),  # a launcher's LOCAL_RANK wins
        ({}, 2, (0, 1, 2)),  # a --workers child without a launcher: its index
    ],
)
def test_launch_env_reads_the_launcher_variables(monkeypatch, env, default, want):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launch_env(default_local_rank=default) == want


def test_publish_moves_a_finished_work_area_and_keeps_it_when_the_move_fails(tmp_path):
    work, dest = tmp_path / "out.tmp", tmp_path / "out"
    work.mkdir()
    (work / "a.bin").write_bytes(os.urandom(64))
    data = (work / "a.bin").read_bytes()
    assert publish(str(work), str(dest)) == str(dest)
    assert not work.exists() and (dest / "a.bin").read_bytes() == data
    work.mkdir()
    (work / "b.bin").write_bytes(b"x")
    with pytest.raises(OSError):  # dest exists and is not empty: the work area stays for a rerun
        publish(str(work), str(dest))
    assert (work / "b.bin").exists() and (dest / "a.bin").read_bytes() == data
