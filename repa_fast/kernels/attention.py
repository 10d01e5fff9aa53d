"""Attention for SiT blocks and the target encoders: softmax(q k^T * scale) v, scale = Dh^-0.5 by default.

Layout (B, N, H, Dh) in and out: flash-attn's and xformers' native layout (no copy); SDPA gets transposed views
(for q, k, v sliced from one qkv GEMM output that is cuDNN's "packed QKV" layout, again no copy).

Backends (``attn_backend``):
- "flash": FlashAttention-3 (``flash_attn_interface``, built from flash-attention's hopper/) on Hopper when
  installed, else FlashAttention-2 (``flash_attn``, sm80+); an error naming the pip extra if neither can run.
- "cudnn_attention": ``F.scaled_dot_product_attention`` pinned to PyTorch's cuDNN backend
  (``SDPBackend.CUDNN_ATTENTION``); an error with the reason where PyTorch would refuse it.
- "xformers", "sdpa" (PyTorch's own choice among its backends), and "math": the explicit softmax of timm's
  Attention with ``fused_attn=False`` (the reference's ``--no-fused-attn``), also the test oracle.
- "auto": on CUDA with fp16/bf16 inputs, by compute capability (``auto_order``):
  sm90 (Hopper): flash3 > cudnn_attention > flash2 > xformers > sdpa;
  sm100/sm103 (Blackwell datacenter): cudnn_attention > flash2 > xformers > sdpa;
  sm80/86/89/120 (Ampere, Ada, consumer Blackwell): flash2 > xformers > sdpa (cuDNN only when asked for);
  the first whose gate passes; SDPA everywhere else (CPU, fp32).
Capability checks are functions (imports probed once and cached, treated as constants by torch.compile); the
backend chosen is logged once per (backend, reason).

What each backend does at SiT-XL's head dim 72 (B=32, T=256, H=16), from the sources (no GPU measurement yet):
- FlashAttention-2 (flash_attn) and PyTorch's flash SDPA (the same FA2 kernels, vendored in
  aten/src/ATen/native/transformers/cuda/flash_attn/): ``HEADDIM_SWITCH`` (csrc/flash_attn/src/static_switch.h) runs
  d <= 96 in the hdim-96 kernel, so QK^T and PV do 96/72 = 1.33x the useful MMA work; 72 % 8 == 0 needs no input
  padding copy. Tiles 128 x 64 forward, 64 x 128 backward (flash_fwd/bwd_launch_template.h, run_mha_*_hdim96):
  T=256 divides them, no sequence-tile waste. Ampere-style mma.sync code also on Hopper (the FA3 paper reports
  FA2 at ~35% of H100 peak). sm80+, fp16/bf16, d <= 256.
- FlashAttention-3 (hopper/flash_api.cpp ``round_up_headdim``): 72 -> 96 as well (1.33x). Forward tile for hdim 96
  on sm90 is 192 x 144 (hopper/tile_size.h ``tile_size_fwd_sm90``): at T=256 the query axis runs 2 x 192 = 384 rows
  (1.5x) and the key axis 2 x 144 = 288 (1.125x): ~2.25x the useful forward MMA work. Backward 64 x 128
  (hopper/flash_bwd_launch_template.h ``run_mha_bwd_hdim96``): 1.33x only.
- cuDNN (PyTorch sdp_utils.cpp ``check_cudnn_tensor_shapes``, ``check_cudnn_hardware_support``): d % 8 == 0 and
  d <= 128 forward and backward (256 forward on sm90/sm10x with cuDNN > 9.22), sm80..sm121, fp16/bf16, batch and
  heads <= 65535, not under deterministic algorithms. 72 is supported; how cuDNN's runtime-compiled kernels tile a
  72-wide head is not public (the cudnn-frontend's open sm90 prefill engine ships d = 64 and 128 kernels only), so
  its cost at 72 must be measured. PyTorch itself prefers cuDNN on sm90/sm10x when the runtime cuDNN is > 9.15
  (``check_prefer_cudnn_attention``; torch 2.14 + cu130 ships 9.24): there "sdpa" already means cuDNN. Measured
  elsewhere (huggingface/transformers PR 48163): cuDNN 1.7-2.3x faster than SDPA's flash (FA2) for training
  shapes on Hopper, slower on A100 (0.82x), A10G (0.93x), RTX PRO 6000 (0.88x), even on L40S; at d=128 on H100
  cuDNN and FA3 tie (~631 TFLOP/s, meta-pytorch/tritonbench issue 41). Hence the orders above; on Hopper FA3 stays
  first when installed (an explicit install; its forward tile waste at T=256 vs cuDNN's unknown padding is for
  bench/gpu_check.py to settle).
"""

import importlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._dispatch import log_once

BACKENDS = ("auto", "flash", "xformers", "sdpa", "cudnn_attention", "math")
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256  # FA2 and FA3 both stop at 256 (both run 72 in their 96-wide kernels)
_CUDNN_MAX_HEAD_DIM = 128  # forward and backward on every architecture (sdp_utils.cpp check_cudnn_tensor_shapes)
_CUDNN_MAX_BATCH_HEADS = 65535
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


@torch.compiler.assume_constant_result
def has_cudnn_attention() -> bool:
    """PyTorch built with cuDNN >= 9.0 and its cuDNN SDPA backend not switched off
    (``torch.backends.cuda.enable_cudnn_sdp(False)``)."""
    if "cudnn" not in _PROBES:
        ok = torch.backends.cudnn.is_available()
        _PROBES["cudnn"] = (torch.backends.cudnn.version() or 0) if ok else 0
    return _PROBES["cudnn"] >= 90000 and torch.backends.cuda.cudnn_sdp_enabled()


def cuda_capability(device: torch.device) -> tuple | None:
    """(major, minor) of a CUDA device, None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


# ----------------------------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------------------------
def _flash_gate(q: torch.Tensor, version: int) -> tuple:
    """(ok, reason) of FlashAttention-3 (``version=3``, Hopper only) or FlashAttention-2 (sm80+) for these inputs."""
    cap = cuda_capability(q.device)
    if cap is None:
        return False, f"flash-attn needs CUDA tensors, got {q.device.type}"
    if q.dtype not in _HALF:
        return False, f"flash-attn needs fp16/bf16 inputs, got {q.dtype}"
    if q.shape[-1] > _FLASH_MAX_HEAD_DIM:
        return False, f"flash-attn supports head_dim <= {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if version == 3:
        if not (9, 0) <= cap < (10, 0):
            return False, f"FlashAttention-3 is Hopper-only, got sm{cap[0]}{cap[1]}"
        if not has_flash_attn_3():
            return False, "FlashAttention-3 is not installed (flash_attn_interface, from flash-attention's hopper/)"
        return True, "FlashAttention-3 on Hopper"
    if cap < (8, 0):
        return False, f"no usable flash-attn for sm{cap[0]}{cap[1]} (FA2 needs sm80+)"
    if not has_flash_attn():
        return False, f"no usable flash-attn for sm{cap[0]}{cap[1]} (pip install 'repa_fast[flash]')"
    return True, "FlashAttention-2"


def _flash_variant(q: torch.Tensor) -> tuple:
    """("flash3" | "flash2" | None, reason) for attn_backend="flash": FA3 on Hopper when installed, else FA2."""
    ok, reason = _flash_gate(q, 3)
    if ok:
        return "flash3", reason
    ok, reason = _flash_gate(q, 2)
    return ("flash2" if ok else None), reason


def _cudnn_gate(q: torch.Tensor) -> tuple:
    """(True, reason) when PyTorch's cuDNN SDPA can run these inputs, else (False, why not)."""
    cap = cuda_capability(q.device)
    if cap is None:
        return False, f"cuDNN attention needs CUDA tensors, got {q.device.type}"
    if not (8, 0) <= cap <= (12, 1):
        return False, f"cuDNN attention needs sm80..sm121, got sm{cap[0]}{cap[1]}"
    if q.dtype not in _HALF:
        return False, f"cuDNN attention needs fp16/bf16 inputs, got {q.dtype}"
    B, N, H, Dh = q.shape
    if Dh % 8 or Dh > _CUDNN_MAX_HEAD_DIM:
        return False, f"cuDNN attention needs head_dim a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, got {Dh}"
    if max(B, H) > _CUDNN_MAX_BATCH_HEADS or N < 2:
        return False, f"cuDNN attention needs batch and heads <= {_CUDNN_MAX_BATCH_HEADS} and 2+ tokens"
    if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
        return False, "cuDNN attention is not deterministic (torch.use_deterministic_algorithms is on)"
    if not has_cudnn_attention():
        return False, "this PyTorch has no cuDNN >= 9.0 attention (or it was disabled with enable_cudnn_sdp(False))"
    return True, f"cuDNN attention (SDPA's CUDNN_ATTENTION) on sm{cap[0]}{cap[1]}"


def auto_order(cap: tuple) -> tuple:
    """The backends "auto" tries on a CUDA device of capability ``cap``, best first (see the module docstring)."""
    if cap[0] == 9:
        return ("flash3", "cudnn_attention", "flash2", "xformers")
    if cap[0] == 10:
        return ("cudnn_attention", "flash2", "xformers")
    return ("flash2", "xformers")


def _gate(backend: str, q: torch.Tensor) -> tuple:
    """(ok, reason) of one concrete backend for these inputs."""
    if backend == "cudnn_attention":
        return _cudnn_gate(q)
    if backend == "xformers":
        ok = cuda_capability(q.device) is not None and has_xformers()
        return ok, "xformers" if ok else "xformers needs CUDA tensors and `pip install xformers`"
    return _flash_gate(q, 3 if backend == "flash3" else 2)


def _auto(q: torch.Tensor) -> tuple:
    cap = cuda_capability(q.device)
    if cap is None:
        return "sdpa", f"F.scaled_dot_product_attention (no CUDA device: {q.device.type})"
    reasons = []
    for backend in auto_order(cap):
        ok, reason = _gate(backend, q)
        if ok:
            return backend, reason if not reasons else f"{reason} ({'; '.join(reasons)})"
        reasons.append(reason)
    return "sdpa", f"F.scaled_dot_product_attention ({'; '.join(reasons)})"


def select_backend(q: torch.Tensor, attn_backend: str = "auto") -> str:
    """Resolve ``attn_backend`` for these inputs to one of flash3, flash2, cudnn_attention, xformers, sdpa, math;
    logged once."""
    if attn_backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {attn_backend!r}")
    if attn_backend in ("sdpa", "math"):
        return attn_backend
    if attn_backend == "xformers":
        if not _gate("xformers", q)[0]:
            raise RuntimeError(
                "attention backend 'xformers' needs CUDA tensors and `pip install xformers`; "
                "use attn_backend='auto' or 'sdpa'"
            )
        return "xformers"
    if attn_backend == "cudnn_attention":
        ok, reason = _cudnn_gate(q)
        if not ok:
            raise RuntimeError(f"attention backend 'cudnn_attention': {reason}. Use attn_backend='auto' or 'sdpa'.")
        log_once("attention:cudnn_attention", f"attention uses {reason}")
        return "cudnn_attention"
    if attn_backend == "flash":
        variant, reason = _flash_variant(q)
        if variant is None:
            raise RuntimeError(f"attention backend 'flash': {reason}. Use attn_backend='auto' or 'sdpa'.")
        return variant
    variant, reason = _auto(q)
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
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh) views
    if choice == "cudnn_attention":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2)
