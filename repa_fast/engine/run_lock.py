"""One trainer per run directory: an advisory lock held for the run's life (docs/run_directories.md §Lock).

``<run_dir>/.lock`` holds ``{"pid", "host", "started"}`` of the trainer that holds ``fcntl.flock`` on it. The kernel
releases a flock when its holder dies (kill -9 included), so a lock file whose flock is free is stale: it is taken
over with a warning naming the dead holder. A second trainer finds the flock taken and refuses (``RunLocked``)
before it writes anything: opening an existing lock file to test it changes nothing. Only rank 0 of a multi-process
run locks; readers (generate, evaluate, export) never lock and only read complete (manifested) checkpoints.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time

from repa_fast.errors import UserError

logger = logging.getLogger("repa_fast")

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another trainer holds the run directory's lock; the message names its PID and host."""


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_NAME)


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refusal(path: str, holder: dict) -> RunLocked:
    who = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return RunLocked(
        f"{path}: another trainer ({who}{since}) is training in this run directory; two trainers would overwrite "
        "each other's checkpoints and logs. Wait for it to finish (or stop it), or choose another --exp-name / "
        "--output-dir"
    )


# flock is not supported on this file system (NFS without lockd, Lustre mounted noflock): the run goes on unlocked.
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _unsupported(path: str, e: OSError) -> None:
    logger.warning(
        "%s: this file system does not support flock (%s); the run directory is NOT protected against a second "
        "trainer: make sure only one trainer uses it",
        path,
        e.strerror or e,
    )


def check_unlocked(run_dir: str) -> None:
    """Refuse early, without writing anything, when a live trainer holds ``run_dir``'s lock."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable: ``RunLock.acquire`` reports it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refusal(path, _holder(fd)) from e
            if e.errno not in _UNSUPPORTED:
                raise
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (``enabled=False``: a no-op, for ranks > 0)."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.path, self.enabled, self.fd = lock_path(run_dir), enabled, None

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            if e.errno in _UNSUPPORTED:  # no lock to hold; the holder record is still written
                _unsupported(self.path, e)
            else:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _refusal(self.path, holder) from e
                raise
        old, host = _holder(fd), socket.gethostname()
        if old.get("pid"):
            state = "no longer running" if old.get("host") == host and not _alive(int(old["pid"])) else "not holding it"
            logger.warning(
                "%s: taking over a stale lock of PID %s on host %s (%s; it ended without releasing it)",
                self.path,
                old.get("pid"),
                old.get("host"),
                state,
            )
        me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # a clean end: the next trainer finds no holder to warn about
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
