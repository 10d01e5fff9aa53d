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

from repa_fast.errors import WriteError, is_write_failure

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
    return WriteError(
        f"could not write {path}: {reason}{space}{'; the partial file was removed' if removed else ''}.{tail} "
        "Free disk space (or write somewhere else) and rerun."
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
