"""Deterministic fault injection for the crash tests.

``REPA_FAST_FAULT="<point>:<step>"`` makes the process SIGKILL itself at that point of that step: a real, abrupt
death (no exception handlers, no atexit, no flushing), at a reproducible place. Points: ``after_step`` (right after
optimizer step <step>), ``mid_save`` (while checkpoint <step> is half written). Unset in normal runs.
"""

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("REPA_FAST_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
