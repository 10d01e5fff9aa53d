"""Deterministic fault injection for the crash tests, installed from outside the package (monkeypatching the loop).

``REPA_FAST_FAULT="<point>:<step>"`` makes a training process SIGKILL itself at that point of that step: a real,
abrupt death (no exception handlers, no atexit, no flushing), at a reproducible place. Points: ``after_step`` (right
after optimizer step <step>), ``mid_save`` (checkpoint <step> half written: its model file is in the temporary
directory, the rest is not). The runtime carries no hook for this: ``install()`` wraps ``trainer.optimizer_step`` and
the ``save_file`` that ``checkpoint.write_checkpoint`` calls. parallel_entry.py installs it too.

    python tests/engine/faults.py <train.py flags>      (train.py with the faults of REPA_FAST_FAULT)
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from repa_fast.engine import checkpoint, trainer  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    spec = os.environ.get("REPA_FAST_FAULT")
    if not spec:
        return
    point, step = spec.split(":")
    step = int(step)
    if point == "after_step":
        real_step = trainer.optimizer_step

        def optimizer_step(cfg, state, backend, meter):
            real_step(cfg, state, backend, meter)
            if state.step == step:
                _die()

        trainer.optimizer_step = optimizer_step
    elif point == "mid_save":
        real_save = checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            in_tmp = os.path.basename(os.path.dirname(filename)).startswith(f".tmp-{step:07d}-")
            if in_tmp and os.path.basename(filename) == "model.safetensors":
                _die()

        checkpoint.save_file = save_file
    else:
        raise ValueError(f"REPA_FAST_FAULT={spec!r}: the point must be after_step or mid_save")


if __name__ == "__main__":
    from repa_fast.cli import main

    install()
    sys.exit(main())
