"""Choosing between a Triton kernel and its PyTorch reference, logged once per op.

``impl`` is one of ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"triton"`` (force it:
on CPU this needs TRITON_INTERPRET=1, which is how the tests run the kernels) or ``"ref"``.
"""

import functools
import logging
import os

import torch

logger = logging.getLogger("repa_fast.kernels")

IMPLS = ("auto", "triton", "ref")


@functools.lru_cache(maxsize=None)
def has_triton_package() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_run_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if not has_triton_package():
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreter_enabled())


@functools.lru_cache(maxsize=None)
def _log_once(op: str, choice: str) -> None:
    logger.info("repa_fast.kernels: %s uses %s", op, choice)


def use_triton(op: str, impl: str, x: torch.Tensor) -> bool:
    """Resolve ``impl`` for tensor ``x``; raise if Triton is forced where it cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"kernels/impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        choice = False
    elif impl == "triton":
        if not can_run_triton(x):
            raise RuntimeError(
                f"{op}: kernels='triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                f"got a {x.device.type} tensor. Use kernels='auto' or 'ref'."
            )
        choice = True
    else:
        choice = x.is_cuda and has_triton_package()
    _log_once(op, "triton" if choice else "reference")
    return choice
