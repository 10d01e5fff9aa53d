"""Graceful stop on SIGTERM, SIGINT and SIGUSR1: finish the step, checkpoint, say how to resume, exit.

Schedulers warn before they kill: SLURM's ``--signal=USR1@180`` sends SIGUSR1 180 s ahead of the time limit, and
SIGTERM about 30 s before SIGKILL on preemption. The first signal only sets a flag; the training loop reads it
between optimizer steps (a Python bool: no host sync). One process stops after the current step. Several
processes must stop at the same step (a checkpoint gathers from all ranks), so the flag travels with the loss
accumulators at the next ``--log-every`` boundary, whose all-reduce already exists (engine/metrics.py); the
processes agree there without any new collective or sync in the step. A second signal exits at once with code
128 + signal number. DataLoader workers ignore these signals: the main process stops them itself.
"""

import logging
import os
import signal
import sys

logger = logging.getLogger("repa_fast")

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """Installed for the duration of a training run (a context manager); ``signum`` is the first signal seen."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting at once, without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.signum = signum
        logger.warning(
            "%s received: finishing the current step, then writing a checkpoint and exiting "
            "(send it again to exit at once)",
            self.name,
        )

    def __enter__(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group; workers leave it to
    the main process (which stops them when the loop ends) instead of dying mid-batch."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
