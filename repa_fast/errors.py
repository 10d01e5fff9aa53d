"""The project's error types, their exit codes, and the one wrapper every command-line entry point uses.

A user mistake (a bad option, a missing file, unreadable data, a missing optional package) ends with a one-paragraph
message and a documented exit code, never a traceback; ``--debug`` (or ``REPA_FAST_DEBUG=1``) shows the traceback
too. Anything else is a bug and keeps Python's traceback (exit code 1).

Exit codes (README "Exit codes and errors"):
    0  success
    1  unexpected internal error (a bug: the traceback is printed)
    2  user mistake: option, config file, data, checkpoint, missing optional package (also the flag parser's own)
    3  training stopped on purpose (--on-nan stop); the message names the last good checkpoint
    4  another process of a multi-process run died or stopped answering
    5  a write failed (disk full, quota, read-only or failing disk); partial files are removed
    6  stopped by SIGTERM / SIGINT / SIGUSR1 after writing a checkpoint; continue with --resume
    7  training diverged: --max-skipped-steps consecutive non-finite steps, or non-finite weights at a save; the
       message names the step where it started and the newest intact checkpoint (docs/run_directories.md)
    128 + N  a second signal N arrived while stopping: exited at once (130 for SIGINT, 143 for SIGTERM)
"""

import errno
import functools
import importlib
import os
import re
import sys
import traceback

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_STOPPED = 3
EXIT_PEER = 4
EXIT_WRITE = 5
EXIT_SIGNAL = 6
EXIT_DIVERGED = 7

DEBUG_ENV = "REPA_FAST_DEBUG"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


class RepaFastError(Exception):
    """Base of the project's errors: the message says what happened and what to do; ``exit_code`` is documented."""

    exit_code = EXIT_BUG


class UserError(RepaFastError):
    """A mistake the user can fix (the message names the option or file and the fix)."""

    exit_code = EXIT_USER


class ConfigError(UserError, ValueError):
    """A configuration mistake; the message says what to change."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be read or does not fit this run; the message names the file and what to do."""


class MissingDependency(UserError, ImportError):
    """An optional package is not installed; the message names the pip extra that brings it."""


class WriteError(RepaFastError, OSError):
    """Writing a file failed (disk full, quota, I/O error); the message names the file and what is still intact."""

    exit_code = EXIT_WRITE


class TrainingStopped(RepaFastError, RuntimeError):
    """The run stopped on purpose (--on-nan stop); the message says why and which checkpoint is good."""

    exit_code = EXIT_STOPPED


class TrainingDiverged(RepaFastError, RuntimeError):
    """Training diverged (too many consecutive skipped steps, or non-finite weights at a save); nothing was saved
    after the divergence and the message names the newest intact checkpoint."""

    exit_code = EXIT_DIVERGED


class PeerError(RepaFastError):
    """Another process of the run died or stopped answering; the message says how to resume."""

    exit_code = EXIT_PEER


def require(module: str, extra: str, feature: str, package: str | None = None):
    """``import module``, or a MissingDependency naming the pip extra: ``require("diffusers", "vae", "--vae")``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{feature} needs {package or module.split('.')[0]}: pip install 'repa_fast[{extra}]' (it is not installed)"
        ) from e


def is_write_failure(exc: BaseException) -> bool:
    """Out of space / quota / read-only / I/O error, also when a library re-raised it as its own type."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return True
    text = str(exc)
    return any(sign in text for sign in _WRITE_SIGNS)


# The same failures as a library words them when it re-raises them as its own type (torch's file writer raises a
# RuntimeError "open file failed with strerror: Read-only file system"; the Rust safetensors writer "os error 28").
_WRITE_SIGNS = ("No space left", "Disk quota exceeded", "os error 28", "Read-only file system", "os error 30")


def is_read_only_failure(exc: BaseException) -> bool:
    """A write refused because the file system is mounted read-only (freeing space would not help)."""
    return (isinstance(exc, OSError) and exc.errno == errno.EROFS) or "Read-only file system" in str(exc)


def worker_message(text: str) -> str:
    """The original message of an error re-raised by a DataLoader worker, without the worker's traceback.

    torch re-raises a worker's exception as ``type("Caught T in DataLoader worker process N.\\nOriginal
    Traceback ...\\nmodule.T: message")`` (torch/_utils.py ExceptionWrapper.reraise); keep only "message".
    """
    m = re.match(r"Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback[^\n]*\n(.*)", text, re.S)
    if not m:
        return text
    name, where, tb = m.groups()
    starts = [s.end() for s in re.finditer(rf"^[\w.]*\b{name}: ", tb, re.M)]
    return f"{tb[starts[-1] :].strip()} ({where})" if starts else text


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser) -> None:
    """List --debug in a parser's --help (the entry-point wrapper reads and removes it before parsing)."""
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or {DEBUG_ENV}=1)")


def entry_point(prog: str):
    """Decorate ``main(argv=None) -> int`` of a command: project errors become a message and their exit code.

    Under several processes each rank prints its own message, prefixed with its rank.
    """

    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = _debug(argv)
            argv = [a for a in argv if a != "--debug"]
            try:
                return main(argv)
            except RepaFastError as e:
                return _report(prog, e, str(e), e.exit_code, debug)
            except OSError as e:
                if not is_write_failure(e):
                    raise
                where = f"{e.filename}: " if e.filename else ""
                msg = f"{where}{e.strerror or e}; free disk space (or choose another output directory) and rerun"
                if is_read_only_failure(e):
                    msg = f"{where}{e.strerror or e}: the file system is read-only; write somewhere else and rerun"
                return _report(prog, e, msg, EXIT_WRITE, debug)
            except KeyboardInterrupt as e:
                return _report(prog, e, "interrupted", 128 + 2, debug)

        return run

    return wrap


def _launcher_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher set them, read without process_group.launch_env: that module raises this
    module's errors (an incomplete launcher environment), and the error path must work whatever the values are."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _report(prog: str, exc: BaseException, message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    rank, world = _launcher_rank()
    who = f" (rank {rank})" if world > 1 else ""
    hint = "" if debug else " (--debug shows the traceback)"
    print(f"{prog}{who}: error: {worker_message(message)}{hint}", file=sys.stderr)
    return code
