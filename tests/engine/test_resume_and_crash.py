"""Resume is bit-exact on CPU, and real kills (mid-run, mid-save) never damage what was already saved."""

import os

import torch
from safetensors.torch import load_file

from repa_fast.engine import checkpoint as ckpt

from .helpers import FAULT_ENTRY, run_train, tiny_args


def _final_state(run_dir, step):
    path = ckpt.step_dir(run_dir, step)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    return load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(path, "ema.safetensors")), state


def _assert_bitwise_equal(a, b):
    model_a, ema_a, st_a = a
    model_b, ema_b, st_b = b
    assert model_a.keys() == model_b.keys() and ema_a.keys() == ema_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), f"model {k} differs"
        assert torch.equal(ema_a[k], ema_b[k]), f"ema {k} differs"
    opt_a, opt_b = st_a["optimizer"]["state"], st_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for name in opt_a:
        for k in opt_a[name]:
            assert torch.equal(opt_a[name][k], opt_b[name][k]), f"optimizer {name}.{k} differs"
    assert st_a["sampler"] == st_b["sampler"] and st_a["step"] == st_b["step"]


def test_kill_then_resume_is_bitwise_identical_to_a_straight_run(tmp_path):
    steps = 6
    straight = run_train(tiny_args(tmp_path / "a", steps=steps, ckpt_every=3))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = run_train(
        tiny_args(tmp_path / "b", steps=steps, ckpt_every=3), {"REPA_FAST_FAULT": "after_step:4"}, script=FAULT_ENTRY
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after step 4: checkpoint 3 exists, 6 does not
    assert ckpt.list_checkpoints(str(tmp_path / "b" / "run")) == [3]

    resumed = run_train(tiny_args(tmp_path / "b", "--resume", steps=steps, ckpt_every=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr

    a = _final_state(str(tmp_path / "a" / "run"), steps)
    b = _final_state(str(tmp_path / "b" / "run"), steps)
    _assert_bitwise_equal(a, b)
    # The run really trained: weights moved away from the step-3 checkpoint.
    mid = load_file(os.path.join(ckpt.step_dir(str(tmp_path / "a" / "run"), 3), "model.safetensors"))
    assert any(not torch.equal(mid[k], a[0][k]) for k in mid)


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    run = str(tmp_path / "run")
    killed = run_train(
        tiny_args(tmp_path, steps=6, ckpt_every=2), {"REPA_FAST_FAULT": "mid_save:4"}, script=FAULT_ENTRY
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert ckpt.list_checkpoints(run) == [2]
    stale = [d for d in os.listdir(ckpt.checkpoint_root(run)) if d.startswith(".tmp-0000004")]
    assert stale, "the half-written checkpoint should exist only as a temporary"
    loaded = ckpt.read_checkpoint(ckpt.step_dir(run, 2), rank=0)
    assert loaded["state"]["step"] == 2 and "rng" in loaded and len(loaded["model"]) > 0

    resumed = run_train(tiny_args(tmp_path, "--resume", steps=6, ckpt_every=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt.list_checkpoints(run) == [2, 4, 6]
    assert not [d for d in os.listdir(ckpt.checkpoint_root(run)) if d.startswith(".tmp-")]
