"""Launchers for the multi-process tests: torchrun (standalone and 2-"node" rendezvous), the deepspeed launcher
(hostfile, and 2 "nodes" with --no_ssh), and manual per-rank processes; all on localhost, gloo, CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

from repa_fast.engine import checkpoint as ckpt

from .helpers import REPO, TINY_DEMO

ENTRY = os.path.join(REPO, "tests", "engine", "parallel_entry.py")
BIN = os.path.dirname(sys.executable)
# One JIT cache for DeepSpeed's C++ ops (~30-70 s to build) shared by every test and run of the suite.
EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
    tempfile.gettempdir(), "repa_fast-torch-extensions"
)
STEPS, CKPT_EVERY, NAN_STEP = 6, 3, 5

# fp32, label dropout off (drawn inside the model), process-count-invariant t/noise (parallel_entry), log every step.
TRAJECTORY = [
    *TINY_DEMO,
    "--cfg-prob",
    "0",
    "--mixed-precision",
    "no",
    "--device",
    "cpu",
    "--max-train-steps",
    str(STEPS),
    "--checkpointing-steps",
    str(CKPT_EVERY),
]


def env(extra=None) -> dict:
    e = {
        **os.environ,
        "PYTHONPATH": REPO,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": EXTENSIONS_DIR,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "REPA_FAST_TEST_NAN_STEP": str(NAN_STEP),
    }
    e.pop("TRITON_INTERPRET", None)  # set by conftest for in-process kernel tests; the runs use the torch paths
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra or {})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(path, stage: int) -> str:
    with open(path, "w") as f:
        json.dump({"deepspeed": {"zero_optimization": {"stage": stage}}}, f)
    return str(path)


def run_args(out, name, *extra):
    return [*TRAJECTORY, "--output-dir", str(out), "--exp-name", name, *map(str, extra)]


def _run(cmd, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env(extra_env), capture_output=True, text=True, timeout=timeout)


def one_process(args, extra_env=None):
    return _run([sys.executable, ENTRY, *args], {"OMP_NUM_THREADS": "2", **(extra_env or {})})


def torchrun(args, extra_env=None, script=ENTRY):
    """torchrun --standalone, 2 workers on one node."""
    return _run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", script, *args], extra_env)


def _pair(cmds, extra_env=None, timeout=300):
    procs = [
        subprocess.Popen(c, cwd=REPO, env=env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def torchrun_two_nodes(args, extra_env=None):
    """Two torchrun agents, one worker each, meeting through the c10d rendezvous: what two nodes run."""
    port = free_port()
    cmd = [
        os.path.join(BIN, "torchrun"),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"repa-fast-{port}",
        ENTRY,
        *args,
    ]
    return _pair([cmd, cmd], extra_env)


def deepspeed_hostfile(tmp, args, extra_env=None, script=ENTRY):
    """The deepspeed launcher with a hostfile (``localhost slots=2``): the multi-node command on one node."""
    hostfile = os.path.join(tmp, "hostfile")
    with open(hostfile, "w") as f:
        f.write("localhost slots=2\n")
    return _run(
        [
            os.path.join(BIN, "deepspeed"),
            "--hostfile",
            hostfile,
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            script,
            *args,
        ],
        extra_env,
    )


def deepspeed_two_nodes(tmp, args, extra_env=None):
    """Two deepspeed launchers, one per "node" of a 2-host hostfile, started with --no_ssh --node_rank k (how a
    cluster scheduler starts DeepSpeed on each node without pdsh)."""
    hostfile = os.path.join(tmp, "hostfile2")
    with open(hostfile, "w") as f:
        f.write("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    cmds = [
        [
            os.path.join(BIN, "deepspeed"),
            "--hostfile",
            hostfile,
            "--no_ssh",
            "--node_rank",
            str(k),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            ENTRY,
            *args,
        ]
        for k in (0, 1)
    ]
    return _pair(cmds, extra_env)


def spawn(args, log_dir, rank_env=None, extra_env=None):
    """Two ranks started by hand (no launcher, so nothing but our own code stops a survivor). Output goes to
    ``log_dir/rank<r>.{out,err}`` (files, not pipes: a full pipe would block a rank)."""
    port = free_port()
    procs = []
    for r in range(2):
        e = env(
            {
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                **(extra_env or {}),
                **((rank_env or {}).get(r, {})),
            }
        )
        with (
            open(os.path.join(log_dir, f"rank{r}.out"), "w") as out,
            open(os.path.join(log_dir, f"rank{r}.err"), "w") as err,
        ):
            p = subprocess.Popen([sys.executable, ENTRY, *args], cwd=REPO, env=e, stdout=out, stderr=err, text=True)
        p.log_dir, p.rank = log_dir, r
        procs.append(p)
    return procs


def finish(procs, timeout=300):
    """Wait for hand-started ranks; CompletedProcess objects with their output."""
    out = []
    for p in procs:
        p.wait(timeout=timeout)
        with (
            open(os.path.join(p.log_dir, f"rank{p.rank}.out")) as f,
            open(os.path.join(p.log_dir, f"rank{p.rank}.err")) as g,
        ):
            out.append(subprocess.CompletedProcess(p.args, p.returncode, f.read(), g.read()))
    return out


def check_ok(*results):
    for r in results:
        assert r.returncode == 0, f"{r.args[:6]} exited {r.returncode}:\n{r.stderr[-4000:]}\n{r.stdout[-2000:]}"


# -- reading runs --------------------------------------------------------------------------------------------------


def losses(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r for r in records}  # a resumed run appends: the latest record of a step wins


def load(run_dir, step):
    return ckpt.read_checkpoint(ckpt.step_dir(str(run_dir), step))


def copy_until(src_run, dst_run, step):
    """A copy of a run directory that ends at checkpoint ``step`` (later checkpoints removed)."""
    shutil.copytree(src_run, dst_run)
    for s in ckpt.list_checkpoints(str(dst_run)):
        if s > step:
            shutil.rmtree(ckpt.step_dir(str(dst_run), s))


def tensors(c):
    """Every tensor of a checkpoint (model, EMA, optimizer state) under one flat name."""
    out = {f"model.{k}": v for k, v in c["model"].items()}
    out.update({f"ema.{k}": v for k, v in c["ema"].items()})
    opt = c["optimizer"] if "optimizer" in c else c["state"]["optimizer"]
    for name, s in opt["state"].items():
        out.update({f"opt.{name}.{k}": v for k, v in s.items()})
    return out


def assert_bitwise(a, b, what):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{what}: different entries {sorted(set(ta) ^ set(tb))[:5]}"
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def assert_close_states(a, b, what, atol=1e-5, rtol=1e-4):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{what}: different entries {sorted(set(ta) ^ set(tb))[:5]}"
    for k in ta:
        torch.testing.assert_close(
            ta[k].double(), tb[k].double(), atol=atol, rtol=rtol, msg=lambda m, k=k: f"{what} {k}: {m}"
        )


def assert_same_trajectory(run, reference, steps, rel=1e-5):
    got, want = losses(run), losses(reference)
    for s in steps:
        g, w = got[s]["loss"], want[s]["loss"]
        assert abs(g - w) <= rel * abs(w), f"{run} step {s}: loss {g!r} vs one process {w!r} (rel {abs(g - w) / w:.2e})"


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
