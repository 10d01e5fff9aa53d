"""ERW with two processes: `accelerate launch` equals torchrun, and DDP resumes across the phase boundary bitwise."""

import os
import shutil

import pytest
import torch

from repa_fast.engine import checkpoint as ckpt

from . import parallel_helpers as H
from .helpers import tiny_args

pytestmark = pytest.mark.multiproc

TRAIN = os.path.join(H.REPO, "train.py")  # the real entry point, as users launch it
FAULT_ENTRY = os.path.join(H.REPO, "tests", "engine", "faults.py")  # train.py with REPA_FAST_FAULT's kill installed
ERW = ["--warmup-steps", 2, "--l2r-depth", 2, "--encoder-depth", 3]


def _args(out, *extra):
    return tiny_args(out, *ERW, "--parallel", "ddp", "--mixed-precision", "no", *extra, steps=4, ckpt_every=1)


def _state(run, step):
    return H.load(run, step)


def _assert_bitwise(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["state"]["optimizer"]["state"], b["state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys() and oa
    for n in oa:
        for k in oa[n]:
            assert torch.equal(oa[n][k], ob[n][k]), (n, k)


def test_accelerate_launch_equals_torchrun_and_ddp_resumes_across_the_boundary(tmp_path):
    if shutil.which("accelerate", path=H.BIN) is None:
        pytest.skip("accelerate is not installed (pip install accelerate; it is in the [dev] extra)")
    H.check_ok(H.torchrun(_args(tmp_path / "tr"), script=TRAIN))
    acc = H._run(
        [os.path.join(H.BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "fp16", "--main_process_port", str(H.free_port()), TRAIN, *_args(tmp_path / "acc")]
    )  # fmt: skip
    H.check_ok(acc)
    assert "ACCELERATE_MIXED_PRECISION=fp16" in acc.stderr and "training uses --mixed-precision no" in acc.stderr
    tr, ac = H.losses(tmp_path / "tr" / "run"), H.losses(tmp_path / "acc" / "run")
    assert [tr[s]["loss"] for s in range(1, 5)] == [ac[s]["loss"] for s in range(1, 5)]
    assert tr[1]["denoising"] == 0.0 and tr[3]["denoising"] > 0  # warm-up, then full training
    final = _state(tmp_path / "tr" / "run", 4)
    assert final["state"]["world_size"] == 2 and final["state"]["phase"] == "full"
    _assert_bitwise(final, _state(tmp_path / "acc" / "run", 4))

    # Killed after step 2 (the boundary) before its save: the resumed DDP run rebuilds its wrapper live.
    killed = H.torchrun(_args(tmp_path / "k"), {"REPA_FAST_FAULT": "after_step:2"}, script=FAULT_ENTRY)
    assert killed.returncode != 0 and ckpt.list_checkpoints(str(tmp_path / "k" / "run")) == [1]
    H.check_ok(H.torchrun(_args(tmp_path / "k", "--resume"), script=TRAIN))
    _assert_bitwise(final, _state(tmp_path / "k" / "run", 4))


def test_zero2_resumes_across_the_erw_boundary_bitwise(tmp_path):
    pytest.importorskip("deepspeed")
    ds = ["--parallel", "deepspeed", "--config", H.ds_config(tmp_path / "z2.json", 2)]
    args = lambda out, *x: _args(out, *x, *ds)  # noqa: E731  (the later --parallel wins)
    H.check_ok(H.torchrun(args(tmp_path / "a"), script=TRAIN))
    straight = _state(tmp_path / "a" / "run", 4)
    assert straight["state"]["phase"] == "full" and len(straight["state"]["optimizer"]["state"]) > 20
    killed = H.torchrun(args(tmp_path / "b"), {"REPA_FAST_FAULT": "after_step:2"}, script=FAULT_ENTRY)
    assert killed.returncode != 0 and ckpt.list_checkpoints(str(tmp_path / "b" / "run")) == [1]
    H.check_ok(H.torchrun(args(tmp_path / "b", "--resume"), script=TRAIN))
    _assert_bitwise(straight, _state(tmp_path / "b" / "run", 4))


def test_single_process_accelerate_launch_runs_single_process(tmp_path):
    if shutil.which("accelerate", path=H.BIN) is None:
        pytest.skip("accelerate is not installed (pip install accelerate; it is in the [dev] extra)")
    out = H._run(
        [os.path.join(H.BIN, "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", TRAIN, *tiny_args(tmp_path, "--mixed-precision", "no", steps=1, ckpt_every=1)]
    )  # fmt: skip
    H.check_ok(out)
    assert "1 process(es) [none]" in out.stderr and "ACCELERATE_MIXED_PRECISION" not in out.stderr
