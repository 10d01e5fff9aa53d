"""Atomic writes: every file (or directory) the project writes appears complete or not at all.

``with atomic_path(path) as tmp:`` yields a temporary name next to ``path`` (``.tmp-<name>-<pid>``, same file
system); whatever the body writes there is fsynced and renamed over ``path`` when it ends. Any failure (a full disk,
a quota, an I/O error, or a library's own error type for them) removes the temporary and raises ``WriteError``
naming the file, the space needed when known, and what is still intact; a crash leaves only a ``.tmp-`` name, which
readers ignore and the next run may delete. ``publish`` is the same last step for a resumable job's work area, which
survives a failure so that a rerun continues.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator

from repa_fast.errors import WriteError, is_read_only_failure, is_write_failure

TMP_PREFIX = ".tmp-"


def tmp_name(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or is_write_failure(e) or type(e).__name__ == "SafetensorError"


def write_error(
    path: str, e: BaseException, size_hint: int | None = None, intact: str = "", removed: bool = True
) -> WriteError:
    """The WriteError for a failed write of ``path``: the reason, the space needed and free, what is intact."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    space = ""
    if is_write_failure(e):
        parent = os.path.dirname(os.path.abspath(path))
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(parent).free
            need = f"needs about {_gb(size_hint)}, " if size_hint else ""
            space = f" ({need}{_gb(free)} free on that file system)"
    tail = f" {intact}" if intact else ""
    advice = "Free disk space (or write somewhere else) and rerun."
    if is_read_only_failure(e):
        space, advice = "", "The file system is read-only: write somewhere else and rerun."
    return WriteError(
        f"could not write {path}: {reason}{space}{'; the partial file was removed' if removed else ''}.{tail} {advice}"
    )


@contextlib.contextmanager
def atomic_path(
    path: str, *, directory: bool = False, size_hint: int | None = None, intact: str | Callable[[], str] = ""
) -> Iterator[str]:
    """Yield a temporary path to write ``path`` (a file, or a directory when ``directory``) into, then publish it.

    ``size_hint`` (bytes) and ``intact`` (text, or a function giving it at failure time) complete the error message.
    An existing directory at ``path`` is moved aside, replaced, then deleted.
    """
    tmp = tmp_name(path)
    try:
        _remove(tmp)  # a same-pid leftover
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if directory:
            os.makedirs(tmp)
        yield tmp
        fsync_tree(tmp)
        if directory and os.path.isdir(path):
            old = f"{os.path.abspath(path)}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(os.path.dirname(tmp))
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, Exception) and not isinstance(e, WriteError) and _is_write_error(e):
            raise write_error(path, e, size_hint, intact() if callable(intact) else intact) from e
        raise


@contextlib.contextmanager
def resumable_work(path: str, note: str) -> Iterator[None]:
    """For resumable jobs (pack, preprocess): a write failure inside (a WriteError from ``atomic_path``, or an OSError
    such as ENOSPC from a plain or memory-mapped write) ends as one WriteError naming the file, plus ``note`` (what
    is kept and how to continue)."""
    try:
        yield
    except WriteError as e:
        raise WriteError(f"{e} {note}") from e
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise write_error(e.filename or path, e, intact=note, removed=False) from e


def publish(work: str, path: str) -> str:
    """Move a finished work area ``work`` (a directory or file built in place by a resumable job: pack, preprocess,
    the target cache) to ``path``: its contents are fsynced, then it is renamed, so ``path`` appears complete or not
    at all. Unlike ``atomic_path`` the work area is not removed on failure: a rerun continues from it. Returns
    ``path``."""
    fsync_tree(work)
    os.replace(work, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def write_text(path: str, text: str, **kw) -> str:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path, **kw) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def write_json(path: str, obj, indent: int | None = None, **kw) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; returns the path."""
    return write_text(path, json.dumps(obj, indent=indent), **kw)


# -- Checks before writing: a path the user named, or a cache folder under HOME ---------------------------------------


def _existing_ancestor(path: str) -> str:
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    return probe


def is_read_only(path: str) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing ancestor) is mounted read-only."""
    try:
        return bool(os.statvfs(_existing_ancestor(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_path(path: str, flag: str, *, directory: bool = False) -> None:
    """Refuse, before any work, an output ``path`` (given as ``flag``) that cannot be written: a file in the way of
    its folders, an existing directory where a file goes (or a file where a directory goes), a folder this user may
    not write (UserError, exit 2), a read-only file system (WriteError, exit 5). Nothing is created."""
    from repa_fast.errors import UserError

    probe = _existing_ancestor(path)
    full = os.path.abspath(path)
    if probe == full:
        if directory and not os.path.isdir(full):
            raise UserError(f"{flag} {path}: a file of that name is in the way (a directory goes there); move it")
        if not directory and os.path.isdir(full):
            raise UserError(f"{flag} {path} is an existing directory; give a file name (e.g. {path}/ema.pt)")
        probe = full if directory else os.path.dirname(full)
    elif not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a directory, so nothing can be created under it")
    if is_read_only(probe):
        raise WriteError(f"{flag} {path}: {probe} is on a read-only file system; write somewhere else")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable by this user; choose another place or fix its rights")


def ensure_cache_dir(path: str, flag: str, default: str | None = None) -> str:
    """``os.makedirs(path)`` for a cache; a failure names the folder and the fix (``flag``, or HOME when ``path`` is
    the default under it): UserError (exit 2) for a path problem, WriteError (exit 5) for a full or read-only disk."""
    from repa_fast.errors import UserError

    try:
        os.makedirs(path, exist_ok=True)
        return path
    except OSError as e:
        where = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        fix = f"pass {flag} DIR with a writable DIR"
        if default is not None and os.path.abspath(path) == os.path.abspath(default):
            home = os.environ.get("HOME", "")
            fix = f"it is the default under HOME={home!r}: set HOME to a writable directory, or {fix}"
        msg = f"cannot create the cache folder {path} ({where}); {fix}"
        raise (WriteError if is_write_failure(e) else UserError)(msg) from e
