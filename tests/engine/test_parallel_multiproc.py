"""Scale-out on CPU: gloo, 2 processes, tiny SiT+REPA (SiT-T/4 on 16 px digits, random DINOv2-T target), fp32.

Each run below is launched once per module and checked by several tests. Every run uses parallel_entry.py, whose
random draws (t, noise) are keyed by the sample's position in the GLOBAL batch, so the 1-process run is an exact
oracle for 2-process runs; every run also gets a NaN loss at step 5 on the rank holding global sample 0, which every
backend must skip (so the compared trajectory is steps 1-4 and 6, and the optimizer ends at step count 5).

    run         launched by                                   backend, gradient accumulation
    reference   1 process                                     none, 1 micro-batch of 8
    ddp         torchrun --standalone                         DDP, 2 x 2 micro-batches of 2
    fsdp        torchrun --nnodes 2 --rdzv-backend c10d       FSDP2, 2 x 2, two "nodes" (agents) meeting on localhost
    zero1       deepspeed --hostfile (localhost slots=2)      ZeRO-1, 2 x 1 micro-batch of 4
    zero2       two ranks started by hand (RANK/WORLD_SIZE)    ZeRO-2, 2 x 2
    zero3       deepspeed --no_ssh --node_rank 0|1            ZeRO-3, 2 x 2, a 2-host hostfile, one launcher per "node"

Resumes on another backend or process count use accumulation 1 (another split of the same global batch of 8).

Bitwise claims, precisely: (a) a 2-process run killed after step 4 and resumed on 2 processes with the same backend
ends bit-identical (weights, EMA, AdamW moments and step) to the uninterrupted 2-process run; (b) whatever the saving
and the resuming backend or process count, the state a resumed run holds right after loading (gathered back from its
shards by its own backend) equals the checkpoint bit for bit. With another process count or backend the gradient
reduction order differs, so the continued trajectory is compared within fp32 tolerance (loss 1e-5 relative; states
atol 1e-5, rtol 1e-4), not bitwise.
"""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from repa_fast.engine import checkpoint as ckpt

from . import parallel_helpers as H
from .helpers import REPO, TINY_DEMO

pytestmark = pytest.mark.multiproc

COMPARED = [1, 2, 3, 4, 6]  # step 5 is the skipped NaN step
ACCUM = ["--gradient-accumulation-steps", "2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


def _ds(work, stage):
    return H.ds_config(work / f"zero{stage}.json", stage)


@pytest.fixture(scope="module")
def reference(work):
    H.check_ok(H.one_process(H.run_args(work, "one")))
    return work / "one"


@pytest.fixture(scope="module")
def ddp(work):
    H.check_ok(H.torchrun(H.run_args(work, "ddp", "--parallel", "ddp", *ACCUM)))
    return work / "ddp"


@pytest.fixture(scope="module")
def fsdp(work):
    agents = H.torchrun_two_nodes(H.run_args(work, "fsdp", "--parallel", "fsdp", *ACCUM))
    H.check_ok(*agents)
    return work / "fsdp"


@pytest.fixture(scope="module")
def zero1(work):
    r = H.deepspeed_hostfile(work, H.run_args(work, "zero1", "--parallel", "deepspeed", "--config", _ds(work, 1)))
    H.check_ok(r)
    assert "dist_world_size=2" in r.stdout + r.stderr
    return work / "zero1"


@pytest.fixture(scope="module")
def zero2(work):
    logs = work / "zero2-logs"
    logs.mkdir()
    H.check_ok(
        *H.finish(H.spawn(H.run_args(work, "zero2", "--parallel", "deepspeed", "--config", _ds(work, 2), *ACCUM), logs))
    )
    return work / "zero2"


@pytest.fixture(scope="module")
def zero3(work):
    launchers = H.deepspeed_two_nodes(
        work, H.run_args(work, "zero3", "--parallel", "deepspeed", "--config", _ds(work, 3), *ACCUM)
    )
    H.check_ok(*launchers)
    for k, r in enumerate(launchers):
        text = r.stdout + r.stderr
        assert "nnodes=2" in text and f"node_rank={k}" in text and "dist_world_size=2" in text
    return work / "zero3"


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_two_processes_follow_the_one_process_trajectory(backend, request, reference):
    run = request.getfixturevalue(backend)
    H.assert_same_trajectory(run, reference, COMPARED, rel=1e-5)
    log, ref = H.losses(run), H.losses(reference)
    assert [log[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 0]
    assert ref[5]["skipped_steps"] == 1 and log[5]["nonfinite_losses"] >= 1
    assert ckpt.list_checkpoints(str(run)) == [3, 6]
    final, want = H.load(run, 6), H.load(reference, 6)
    assert final["state"]["world_size"] == 2 and final["state"]["sampler"] == want["state"]["sampler"]
    # Full weights, full EMA and AdamW moments, gathered from shards under FSDP2 / ZeRO-3, equal the 1-process ones.
    H.assert_close_states(final, want, backend)
    opt = final["state"]["optimizer"]["state"]
    assert {float(s["step"]) for s in opt.values()} == {5.0}  # 6 steps, the NaN one skipped on every rank
    # Only the SiT's trainable weights are optimised: no frozen pos_embed, no encoder (never wrapped or sharded).
    assert set(opt) == set(want["state"]["optimizer"]["state"]) and "pos_embed" not in opt
    assert set(final["model"]) == set(want["model"]) and not any(k.startswith("encoder") for k in final["model"])
    moved = [k for k in final["model"] if not torch.equal(final["model"][k], H.load(run, 3)["model"][k])]
    assert len(moved) > 10  # it trained after the checkpoint


def test_killed_rank_stops_the_other_within_60s_and_the_run_resumes_bitwise(work, ddp):
    logs = work / "killed-logs"
    logs.mkdir()
    procs = H.spawn(
        H.run_args(work, "killed", "--parallel", "ddp", *ACCUM), logs, rank_env={1: {"REPA_FAST_FAULT": "after_step:4"}}
    )
    procs[1].wait(timeout=300)
    died = time.perf_counter()
    survivor, victim = H.finish(procs, timeout=120)
    waited = H.elapsed(died)
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 4 and waited < 60, (survivor.returncode, waited, survivor.stderr[-3000:])
    run = work / "killed"
    assert "another process died or stopped answering" in survivor.stderr
    assert ckpt.step_dir(str(run), 3) in survivor.stderr and "--resume" in survivor.stderr
    assert ckpt.list_checkpoints(str(run)) == [3]
    H.assert_bitwise(H.load(run, 3), H.load(ddp, 3), "checkpoint 3 of the killed run")

    dump = work / "killed-loaded.pt"
    r = H.torchrun(
        H.run_args(work, "killed", "--parallel", "ddp", *ACCUM, "--resume"), {"REPA_FAST_TEST_DUMP_LOADED": str(dump)}
    )
    H.check_ok(r)
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    H.assert_bitwise(torch.load(dump, weights_only=True), H.load(run, 3), "state loaded on resume")
    H.assert_bitwise(H.load(run, 6), H.load(ddp, 6), "killed + resumed vs uninterrupted, step 6")
    assert H.load(run, 6)["state"]["sampler"] == H.load(ddp, 6)["state"]["sampler"]


def test_save_with_two_processes_resume_with_one(work, zero3, reference):
    run = work / "zero3-to-one"
    H.copy_until(zero3, run, 3)
    dump = work / "zero3-to-one-loaded.pt"
    r = H.one_process(
        H.run_args(work, "zero3-to-one", "--parallel", "none", "--resume"), {"REPA_FAST_TEST_DUMP_LOADED": str(dump)}
    )
    H.check_ok(r)
    assert "resumed with 1 processes from a 2-process checkpoint" in r.stderr
    H.assert_bitwise(torch.load(dump, weights_only=True), H.load(run, 3), "ZeRO-3 checkpoint loaded by 1 process")
    H.assert_same_trajectory(run, reference, [4, 6])  # same samples, same draws: only reduction order differs
    final = H.load(run, 6)
    assert final["state"]["world_size"] == 1 and final["state"]["sampler"] == H.load(zero3, 6)["state"]["sampler"]
    H.assert_close_states(final, H.load(zero3, 6), "2 -> 1 processes")


@pytest.mark.parametrize("src,dst", [("zero3", "fsdp"), ("fsdp", "zero2"), ("zero1", "ddp")])
def test_resume_on_another_backend(src, dst, work, request, reference):
    source = request.getfixturevalue(src)
    name = f"{src}-to-{dst}"
    H.copy_until(source, work / name, 3)
    parallel = (
        ["--parallel", dst]
        if dst in ("ddp", "fsdp")
        else ["--parallel", "deepspeed", "--config", _ds(work, int(dst[-1]))]
    )
    dump = work / f"{name}-loaded.pt"
    r = H.torchrun(H.run_args(work, name, *parallel, "--resume"), {"REPA_FAST_TEST_DUMP_LOADED": str(dump)})
    H.check_ok(r)
    H.assert_bitwise(torch.load(dump, weights_only=True), H.load(work / name, 3), f"{src} checkpoint loaded by {dst}")
    H.assert_same_trajectory(work / name, reference, [4, 6])
    H.assert_close_states(H.load(work / name, 6), H.load(source, 6), name)


def test_hung_rank_is_bounded_by_the_process_group_timeout(work):
    """A peer that stops answering without dying (SIGSTOP: its sockets stay open) is caught by the timeout."""
    logs = work / "hung-logs"
    logs.mkdir()
    args = H.run_args(work, "hung", "--parallel", "deepspeed", "--config", _ds(work, 2), "--max-train-steps", "500")
    procs = H.spawn(args, logs, extra_env={"REPA_FAST_DIST_TIMEOUT": "10"})
    try:
        first = ckpt.step_dir(str(work / "hung"), 3)
        deadline = time.perf_counter() + 240
        while not os.path.isdir(first) and time.perf_counter() < deadline and procs[0].poll() is None:
            time.sleep(0.05)
        assert os.path.isdir(first), "the run never reached its first checkpoint"
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.perf_counter()
        procs[0].wait(timeout=120)
        waited = H.elapsed(stopped)
    finally:
        procs[1].kill()
    survivor = H.finish(procs)[0]
    assert survivor.returncode == 4, survivor.stderr[-3000:]
    assert "stopped answering" in survivor.stderr and "REPA_FAST_DIST_TIMEOUT=10" in survivor.stderr
    assert waited < 10 + 20, waited  # the timeout, plus what the step in flight needed


def _json_docs(text):
    dec, docs, i = json.JSONDecoder(), [], 0
    while (i := text.find("\n{", i)) >= 0:
        doc, end = dec.raw_decode(text[i + 1 :])
        docs.append(doc)
        i += end
    return docs


def test_deepspeed_dry_run_prints_the_resolved_xl_recipe():
    r = subprocess.run(
        [
            os.path.join(H.BIN, "deepspeed"),
            "--master_port",
            str(H.free_port()),
            "train.py",
            "--config",
            "configs/ds_sit_xl.json",
            "--dry-run",
        ],
        cwd=REPO,
        env=H.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    H.check_ok(r)
    docs = _json_docs("\n" + r.stdout)
    assert len(docs) == 1, r.stdout[-3000:]  # printed by rank 0 only, whatever the launcher started
    world = int(r.stdout.split("dist_world_size=")[1].split()[0])
    t, ds = docs[0]["trainer"], docs[0]["deepspeed"]
    recipe = {
        "model": "SiT-XL/2",
        "enc_type": "dinov2-vit-b",
        "encoder_depth": 8,
        "proj_coeff": 0.5,
        "path_type": "linear",
        "prediction": "v",
        "weighting": "uniform",
        "batch_size": 256,
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "adam_weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "ema_decay": 0.9999,
        "mixed_precision": "bf16",
        "parallel": "deepspeed",
        "resolution": 256,
    }
    assert {k: t[k] for k in recipe} == recipe
    assert ds["train_batch_size"] == 256 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] * world == 256 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"]["enabled"] and ds["torch_autocast"]["dtype"] == "bfloat16"
    assert ds["zero_optimization"]["stage"] == 2 and ds["managed_gradient_accumulation"] is False


def test_deepspeed_launch_of_the_demo_preset(work):
    """`deepspeed --num_gpus 2 train.py` on the demo preset (shrunk), ZeRO-3 in bf16 with a preview grid from the
    gathered EMA shards: the product path end to end, outputs included."""
    cfg = H.ds_config(work / "demo-zero3.json", 3)
    args = [
        *TINY_DEMO,
        "--parallel",
        "deepspeed",
        "--config",
        cfg,
        "--device",
        "cpu",
        "--max-train-steps",
        "4",
        "--checkpointing-steps",
        "2",
        "--sampling-steps",
        "4",
        "--preview-num-steps",
        "2",
        "--output-dir",
        str(work),
        "--exp-name",
        "demo",
    ]
    r = subprocess.run(
        [os.path.join(H.BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(H.free_port()), "train.py", *args],
        cwd=REPO,
        env=H.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    H.check_ok(r)
    run = work / "demo"
    assert "dist_world_size=2" in r.stdout + r.stderr
    log = H.losses(run)
    assert sorted(log) == [1, 2, 3, 4] and all(0 < log[s]["loss"] < 10 for s in log)
    assert os.path.getsize(run / "samples" / "0000004.png") > 0 and os.path.getsize(run / "loss_curve.png") > 0
    assert ckpt.list_checkpoints(str(run)) == [2, 4]
    final = H.load(run, 4)
    assert all(torch.isfinite(v).all() for v in final["ema"].values())
    assert any(not torch.equal(final["ema"][k], final["model"][k]) for k in final["model"])
    with open(run / "config.json") as f:
        resolved = json.load(f)["deepspeed"]
    # The written config keeps the micro batch derived ("auto": valid at any world size); the run used 8 / 2 = 4.
    assert resolved["train_micro_batch_size_per_gpu"] == "auto" and resolved["torch_autocast"]["dtype"] == "bfloat16"
    assert "global batch 8 = 2 x 1 x 4" in r.stdout + r.stderr
