"""One trainer per run directory (issue 20 item 3): a second trainer is refused naming the holder's PID and host and
changes nothing; a stale lock (dead holder) is taken over with a warning; readers never take the lock."""

import json
import os
import socket
import subprocess
import sys
import time

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.engine.checkpoint import load_run
from repa_fast.engine.run_lock import RunLock, lock_path

from ..engine.helpers import REPO, TRAIN, tiny_args
from .common import refused, trained


def test_a_second_trainer_is_refused_before_writing_anything(tmp_path, capsys):
    run = trained(tmp_path)
    with RunLock(run):  # another trainer (its own open file description, as another process has)
        holder = json.load(open(lock_path(run)))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        for extra in ((), ("--resume",)):
            refused(capsys, tmp_path, tiny_args(tmp_path, *extra, steps=6), errors.EXIT_USER,
                    "another trainer", f"PID {os.getpid()} on host {socket.gethostname()}")  # fmt: skip
        assert load_run(run).step == 4  # readers do not take the lock
    assert open(lock_path(run)).read() == ""  # released cleanly: no holder left to warn about


def test_a_running_trainer_in_another_process_holds_the_lock(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, TRAIN, *tiny_args(tmp_path, steps=100000, ckpt_every=100000)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        path = lock_path(os.path.join(str(tmp_path), "run"))
        deadline = time.time() + 120
        while not (os.path.exists(path) and os.path.getsize(path)) and time.time() < deadline:
            assert proc.poll() is None
            time.sleep(0.2)
        assert json.load(open(path))["pid"] == proc.pid
        os.makedirs(tmp_path / "unrelated", exist_ok=True)
        capsys.readouterr()
        assert main(tiny_args(tmp_path, steps=6)) == errors.EXIT_USER
        assert f"PID {proc.pid} on host {socket.gethostname()}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(tmp_path / "run")
    with open(lock_path(str(tmp_path / "run")), "w") as f:  # what a kill -9'd trainer leaves: its record, no flock
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}, f)
    capsys.readouterr()
    assert main(tiny_args(tmp_path, steps=2)) == 0
    err = capsys.readouterr().err
    assert f"taking over a stale lock of PID {dead.pid} on host {socket.gethostname()} (no longer running" in err
    assert open(lock_path(str(tmp_path / "run"))).read() == ""


def test_a_file_system_without_flock_trains_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    """NFS without lockd / Lustre mounted noflock answer flock with ENOLCK / EOPNOTSUPP: the run is not refused
    (nor told its directory is unwritable); it warns that the directory is unprotected and records its holder."""
    import errno
    import fcntl

    from repa_fast.engine import run_lock

    run = trained(tmp_path)

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run_lock.check_unlocked(run)  # the resume's early check: no traceback
    with RunLock(run) as lock:
        assert lock.fd is not None and json.load(open(lock_path(run)))["pid"] == os.getpid()
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "--resume", steps=5)) == 0  # the trainer itself, end to end
    err = capsys.readouterr().err
    assert "does not support flock" in err and "NOT protected" in err
