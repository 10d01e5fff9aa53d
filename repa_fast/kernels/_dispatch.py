"""Choosing between a Triton kernel and its PyTorch reference, logged once per op; Triton imported gracefully.

``impl`` is one of ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"triton"`` (force it:
on CPU this needs TRITON_INTERPRET=1, which is how the tests run the kernels) or ``"ref"``.

Without the triton package, ``triton`` and ``tl`` below are stand-ins: ``@triton.jit`` returns the function
unchanged and ``tl.constexpr`` only serves the kernels' annotations, so every op module (and its ``<op>_ref``)
imports; ``use_triton`` then never picks a kernel and ``impl="triton"`` raises a clear error.
"""

import logging
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; see has_triton_package()
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)

logger = logging.getLogger("repa_fast.kernels")

IMPLS = ("auto", "triton", "ref")

# An H100 SXM has 132 SMs; used to size grids when modelling launches on "meta" tensors (bench, byte counts).
MODEL_NUM_SMS = 132

_LOGGED: set = set()


def has_triton_package() -> bool:
    """True when ``import triton`` succeeded (plain function, not lru_cache: torch.compile traces it)."""
    return not isinstance(triton, SimpleNamespace)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(device: torch.device) -> bool:
    """Kernels on this device run in Triton's interpreter (CPU): its cost is per program, so grids stay small."""
    return device.type == "cpu" and triton_interpreter_enabled()


def can_run_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if not has_triton_package():
        return False
    return x.is_cuda or (x.device.type == "cpu" and triton_interpreter_enabled())


def log_once(key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` is seen; a no-op while torch.compile traces (no graph break)."""
    if torch.compiler.is_compiling() or key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.info("repa_fast.kernels: %s", message)


def use_triton(op: str, impl: str, x: torch.Tensor) -> bool:
    """Resolve ``impl`` for tensor ``x``; raise if Triton is forced where it cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        choice = False
    elif impl == "triton":
        if not can_run_triton(x):
            raise RuntimeError(
                f"{op}: impl='triton' (--kernels triton) needs the triton package (pip install 'repa_fast[dev]' or "
                f"triton) and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); got a {x.device.type} tensor. "
                "Use impl='auto' or 'ref'."
            )
        choice = True
    else:
        choice = x.is_cuda and has_triton_package()
    log_once(f"{op}:{choice}", f"{op} uses {'triton' if choice else 'the PyTorch reference'}")
    return choice


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the real count on CUDA, an H100's on meta, 1 on CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return MODEL_NUM_SMS if device.type == "meta" else 1


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs: the one allocation point of the launchers, which tests/kernels/conftest.py
    replaces with a NaN-filled one (an element a kernel forgets to write then fails the comparison)."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def out_dtype(*items, norm_autocast: bool = False) -> torch.dtype:
    """The dtype PyTorch's eager reference returns: type promotion of the given tensors or dtypes (None skipped).
    With ``norm_autocast``, CUDA autocast runs layer_norm in fp32 (its documented fp32 op list): fp32 or wider."""
    dtype, cuda = None, False
    for t in items:
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            cuda = cuda or t.is_cuda
            t = t.dtype
        dtype = t if dtype is None else torch.promote_types(dtype, t)
    if norm_autocast and cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype an autocast GEMM (nn.Linear) reads ``x`` in: autocast's dtype when autocast is on for x's device and
    x is one it casts (fp32/fp16/bf16; float64 stays float64), else None. A fused op whose output feeds such a GEMM
    writes this dtype directly (computed in fp32, rounded once on store, as the GEMM's own cast would round) instead
    of an fp32 tensor that the GEMM reads back to cast (docs/objective.md §Training defaults: reference precision)."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype losses are computed in: fp32 or the inputs' wider type (float64 stays float64, bf16 goes to fp32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
