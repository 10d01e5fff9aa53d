"""Attention for SiT blocks and the DINOv2 encoder: softmax(q k^T * scale) v, scale = Dh^-0.5 by default.

Layout (B, N, H, Dh) in and out: flash-attn's and xformers' native layout (no copy); SDPA gets transposed views.
Backends:
- "auto": on CUDA with fp16/bf16 inputs, FlashAttention-3 (``flash_attn_interface``, Hopper only) when installed,
  else FlashAttention-2 (``flash_attn``, sm80+), else xformers' memory-efficient attention, else
  ``F.scaled_dot_product_attention`` (which itself picks cuDNN/flash/efficient kernels); SDPA everywhere else.
- "flash" (FA3 on Hopper if installed, else FA2; an error naming the pip extra if neither can run),
  "xformers", "sdpa", and "math": the explicit softmax of timm's Attention with ``fused_attn=False`` (the
  reference's ``--no-fused-attn``), also the test oracle.
Capability checks are functions (probed once, cached, treated as constants by torch.compile); the backend
chosen is logged once per (backend, reason).
"""

import importlib

import torch
import torch.nn.functional as F

from ._dispatch import log_once

BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256  # FA2 and FA3 both stop at 256 (FA3 rounds 72 up to its 96-wide kernel)
_PROBES: dict = {}


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
    attn = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    return (attn.softmax(dim=-1) @ v).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Capability checks (functions, never import-time constants; tests monkeypatch them or sys.modules)
# ----------------------------------------------------------------------------------------------------------------
_IMPORTS = {  # backend: (module, function)
    "flash2": ("flash_attn", "flash_attn_func"),
    "flash3": ("flash_attn_interface", "flash_attn_func"),
    "xformers": ("xformers.ops", "memory_efficient_attention"),
}


def _load(backend: str):
    """The backend's attention function, imported once (None if it cannot be imported)."""
    if backend not in _PROBES:
        module, name = _IMPORTS[backend]
        try:
            fn = getattr(importlib.import_module(module), name)
        except Exception:  # ImportError, or a broken build (e.g. flash_attn without its flash_attn_2_cuda extension)
            fn = None
        _PROBES[backend] = fn if callable(fn) else None
    return _PROBES[backend]


def clear_capability_cache() -> None:
    _PROBES.clear()


@torch.compiler.assume_constant_result
def has_flash_attn() -> bool:
    """FlashAttention-2: ``pip install 'repa_fast[flash]'`` (flash-attn)."""
    return _load("flash2") is not None


@torch.compiler.assume_constant_result
def has_flash_attn_3() -> bool:
    """FlashAttention-3 (Hopper), built from flash-attention's hopper/ directory: module ``flash_attn_interface``."""
    return _load("flash3") is not None


@torch.compiler.assume_constant_result
def has_xformers() -> bool:
    return _load("xformers") is not None


def cuda_capability(device: torch.device) -> tuple | None:
    """(major, minor) of a CUDA device, None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------
def _flash_variant(q: torch.Tensor) -> tuple:
    """("flash3" | "flash2" | None, reason)."""
    cap = cuda_capability(q.device)
    if cap is None:
        return None, f"flash-attn needs CUDA tensors, got {q.device.type}"
    if q.dtype not in _HALF:
        return None, f"flash-attn needs fp16/bf16 inputs, got {q.dtype}"
    if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        return None, f"flash-attn supports head_dim <= {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if (9, 0) <= cap < (10, 0) and has_flash_attn_3():
        return "flash3", "FlashAttention-3 on Hopper"
    if cap >= (8, 0) and has_flash_attn():
        return "flash2", "FlashAttention-2"
    return None, f"no usable flash-attn for sm{cap[0]}{cap[1]} (pip install 'repa_fast[flash]'; FA2 needs sm80+)"


def select_backend(q: torch.Tensor, attn_backend: str = "auto") -> str:
    """Resolve ``attn_backend`` for these inputs to one of flash3, flash2, xformers, sdpa, math; logged once."""
    if attn_backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {attn_backend!r}")
    if attn_backend in ("sdpa", "math"):
        return attn_backend
    if attn_backend == "xformers":
        if cuda_capability(q.device) is None or not has_xformers():
            raise RuntimeError(
                "attention backend 'xformers' needs CUDA tensors and `pip install xformers`; "
                "use attn_backend='auto' or 'sdpa'"
            )
        return "xformers"
    variant, reason = _flash_variant(q)
    if attn_backend == "flash":
        if variant is None:
            raise RuntimeError(f"attention backend 'flash': {reason}. Use attn_backend='auto' or 'sdpa'.")
        return variant
    if variant is None and cuda_capability(q.device) is not None and has_xformers():
        variant, reason = "xformers", f"xformers ({reason})"
    if variant is None:
        variant, reason = "sdpa", f"F.scaled_dot_product_attention ({reason})"
    log_once(f"attention:{variant}", f"attention uses {reason}")
    return variant


def attention(q, k, v, attn_backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v of shape (B, N, H, Dh) -> (B, N, H, Dh)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (B, N, H, Dh), got {q.shape}, {k.shape}, {v.shape}")
    choice = select_backend(q, attn_backend)
    if choice == "math":
        return attention_ref(q, k, v, scale)
    if choice in ("flash2", "flash3"):
        out = _PROBES[choice](q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out  # early FA3 releases return (out, softmax_lse)
    if choice == "xformers":
        return _PROBES[choice](q, k, v, scale=scale)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
