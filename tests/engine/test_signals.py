"""SIGTERM / SIGINT / SIGUSR1 mid-run: the step finishes, a checkpoint is written, the resume command is printed, and
--resume then ends bit for bit where an uninterrupted run ends."""

import os
import signal

import pytest

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine import stop as stop_mod
from repa_fast.engine import trainer

from .helpers import tiny_args
from .test_resume_and_crash import _assert_bitwise_equal, _final_state

STEPS, EVERY = 5, 4  # the signal arrives during step 2: not a checkpoint step


def _signal_during_step(monkeypatch, signum: int, at_step: int):
    real = trainer.optimizer_step

    def step_then_signal(cfg, state, backend, meter):
        if state.step + 1 == at_step:
            os.kill(os.getpid(), signum)  # delivered to the handler before the step below runs
        real(cfg, state, backend, meter)

    monkeypatch.setattr(trainer, "optimizer_step", step_then_signal)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert main(tiny_args(out, steps=STEPS, ckpt_every=EVERY)) == 0
    return _final_state(str(out / "run"), STEPS)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_the_step_reached_and_resume_is_bitwise(tmp_path, capsys, monkeypatch, straight, signum):
    _signal_during_step(monkeypatch, signum, at_step=2)
    before = signal.getsignal(signum)
    assert main(tiny_args(tmp_path, steps=STEPS, ckpt_every=EVERY)) == errors.EXIT_SIGNAL
    assert signal.getsignal(signum) is before  # handlers restored
    err = capsys.readouterr().err
    run = str(tmp_path / "run")
    name = signal.Signals(signum).name
    assert f"{name} received: finishing the current step" in err
    assert f"stopped by {name} at step 2; checkpoint {ckpt.step_dir(run, 2)}. Continue with: python train.py" in err
    assert err.rstrip().endswith("--resume") and "Traceback" not in err
    assert ckpt.list_checkpoints(run) == [2]
    with open(os.path.join(run, "train.log")) as f:
        assert f"stopped by {name} at step 2" in f.read()
    monkeypatch.undo()
    assert main(tiny_args(tmp_path, "--resume", steps=STEPS, ckpt_every=EVERY)) == 0
    _assert_bitwise_equal(straight, _final_state(run, STEPS))


def test_signal_on_a_checkpoint_step_writes_it_once(tmp_path, capsys, monkeypatch):
    _signal_during_step(monkeypatch, signal.SIGTERM, at_step=2)
    writes = []
    real = ckpt.write_checkpoint
    monkeypatch.setattr(
        ckpt, "write_checkpoint", lambda run_dir, step, **kw: writes.append(step) or real(run_dir, step, **kw)
    )
    assert main(tiny_args(tmp_path, steps=STEPS, ckpt_every=2)) == errors.EXIT_SIGNAL
    assert writes == [2] and "stopped by SIGTERM at step 2" in capsys.readouterr().err


def test_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(stop_mod.os, "_exit", exits.append)
    with stop_mod.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM" and exits == []
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]
    assert "SIGINT again: exiting at once" in capsys.readouterr().err


def test_dataloader_workers_ignore_the_stop_signals():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_worker_probe, args=(q,))
    p.start()
    p.join(30)
    assert q.get(timeout=5) == [signal.SIG_IGN] * len(stop_mod.SIGNALS)


def _worker_probe(q):
    stop_mod.ignore_in_worker(0)
    q.put([signal.getsignal(s) for s in stop_mod.SIGNALS])


@pytest.mark.multiproc
def test_two_processes_agree_on_the_stop_step_and_resume_bitwise(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step (the next --log-every read), one checkpoint."""
    import time

    from . import parallel_helpers as H

    steps, args = 30, ["--parallel", "ddp", "--log-every", "3", "--checkpointing-steps", "1000"]
    for name in ("straight", "stopped"):
        (tmp_path / f"{name}-logs").mkdir()
    straight = H.spawn(H.run_args(tmp_path, "straight", *args, "--max-train-steps", steps), tmp_path / "straight-logs")
    procs = H.spawn(H.run_args(tmp_path, "stopped", *args, "--max-train-steps", steps), tmp_path / "stopped-logs")
    log = tmp_path / "stopped" / "log.jsonl"
    deadline = time.perf_counter() + 240
    while not (log.exists() and log.read_text().count("\n") >= 1) and time.perf_counter() < deadline:
        time.sleep(0.02)
    os.kill(procs[1].pid, signal.SIGTERM)
    rank0, rank1 = H.finish(procs)
    H.check_ok(*H.finish(straight))
    assert (rank0.returncode, rank1.returncode) == (errors.EXIT_SIGNAL, errors.EXIT_SIGNAL), rank0.stderr[-3000:]
    run = str(tmp_path / "stopped")
    (stop_step,) = ckpt.list_checkpoints(run)
    assert stop_step % 3 == 0 and stop_step < steps
    assert f"stopped by a signal to another process at step {stop_step}" in rank0.stderr
    assert f"stopped by SIGTERM at step {stop_step}" in rank1.stderr and "--resume" in rank1.stderr
    (tmp_path / "resume-logs").mkdir()
    resumed = H.spawn(
        H.run_args(tmp_path, "stopped", *args, "--max-train-steps", steps, "--resume"), tmp_path / "resume-logs"
    )
    H.check_ok(*H.finish(resumed))
    H.assert_bitwise(H.load(run, steps), H.load(tmp_path / "straight", steps), "stopped + resumed vs uninterrupted")
