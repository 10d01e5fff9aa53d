"""Bias + GELU(tanh): y = GELU_tanh(u + bias), the activation of the SiT MLP after fc1 (timm's Mlp in the reference,
``act_layer=lambda: nn.GELU(approximate="tanh")``, docs/objective.md §Model).

Shapes: u (..., F), the fc1 GEMM output without its bias; bias (F,). y has u's dtype: the bias is added in fp32
registers and never promotes, as in a GEMM epilogue (under autocast F.linear casts its bias to the GEMM dtype too).
GELU_tanh(z) = 0.5 z (1 + tanh(k (z + 0.044715 z^3))), k = sqrt(2 / pi), computed as z * sigmoid(2 k (z + 0.044715
z^3)) (the same function: 0.5 (1 + tanh(a)) = sigmoid(2 a)) in fp32, rounded once on store.

Why a kernel and not fc1's bias in the cuBLAS epilogue followed by F.gelu: in the forward both cost one pass over u
(cuBLASLt adds the bias for free, GELU reads u and writes y); the backward is where they differ. Eager runs
gelu_backward (reads dy and u, writes du) and then, for fc1's bias gradient, a separate reduction that reads du
again. Here the backward kernel writes du and reduces the bias gradient from the same registers: per-chunk fp32
partial sums over rows, summed afterwards (deterministic, no atomics). torch.compile could fuse the same (inductor
unfuses a GEMM's bias into a following pointwise op), but the model runs eagerly by default and compile fusion
cannot be checked on a CPU; custom ops stay opaque to inductor either way.
Replaces ``self.act(self.fc1(x))`` of the reference's Mlp: ``linear_gelu(x, fc1.weight, fc1.bias)``.
"""

import math

import torch
import torch.nn.functional as F

from ._dispatch import cdiv, empty, interpreted, next_power_of_2, tl, triton, use_triton

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715
# Rows each backward program reduces. SiT-XL/2 at batch 32 (8192 rows, F = 4608, 256-wide column blocks): 64 x 18
# = 1152 programs, over one wave of 132 SMs x 7 resident programs (72 registers at 4 warps, test_aot_sm90.py); the
# fp32 partial rows are 4 / (128 x 2) = 1.6% of du's bf16 bytes.
ROWS_PER_CHUNK = 128


# ----------------------------------------------------------------------------------------------------------------
# 1. References (the spec, the CPU fallback, the test oracle, the benchmark baseline)
# ----------------------------------------------------------------------------------------------------------------
def bias_gelu_ref(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(u + bias.to(u.dtype), approximate="tanh")


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference's two ops: fc1 with its bias (in the GEMM), then GELU(tanh)."""
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernels. Rows are the flattened leading dims of u; a program owns a (BLOCK_M, BLOCK_F) tile (forward) or a
#    chunk of rows x BLOCK_F columns (backward). Every load is upcast to fp32 at once.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_parts(z):
    """(sigmoid(2a), 2a) for a = k (z + c z^3): GELU_tanh(z) = z * s. 2a is clamped to [-80, 80] so that exp stays
    finite (s differs from the unclamped value by less than exp(-80) ~ 2e-35)."""
    a2 = 2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)  # 2 * sqrt(2 / pi) * (...)
    a2 = tl.minimum(tl.maximum(a2, -80.0), 80.0)
    return 1.0 / (1.0 + tl.exp(-a2)), a2


@triton.jit
def _bias_gelu_fwd_kernel(
    u_ptr,
    b_ptr,
    y_ptr,
    n_rows,
    F_,
    stride_u_row,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * F may pass 2^31
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F_
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    u = tl.load(u_ptr + rows[:, None] * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    z = u + bias[None, :]
    s, _ = _gelu_parts(z)
    tl.store(y_ptr + rows[:, None] * F_ + cols[None, :], (z * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,
    u_ptr,
    b_ptr,
    du_ptr,
    part_ptr,
    n_rows,
    F_,
    rows_per_chunk,
    stride_dy_row,
    stride_u_row,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # du = dy * GELU'(z), z = u + b; GELU'(z) = s + z s (1 - s) * 2k (1 + 3c z^2), s = sigmoid(2a) (d/dz of z * s).
    # part[chunk, :] = sum over the chunk's rows of du (-> dbias).
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F_
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    start = chunk * rows_per_chunk  # rows_per_chunk is a multiple of BLOCK_M; the last chunk may overhang (masked)
    for r0 in range(start, start + rows_per_chunk, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        u = tl.load(u_ptr + rows[:, None] * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = u + bias[None, :]
        s, _ = _gelu_parts(z)
        da2 = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        du = dy * (s + z * s * (1.0 - s) * da2)
        tl.store(du_ptr + rows[:, None] * F_ + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, du, 0.0)
    tl.store(part_ptr + chunk * F_ + cols, tl.sum(acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers: checks, layout, grid. No autograd here.
# ----------------------------------------------------------------------------------------------------------------
def _launch_config(n_rows: int, F_: int, device: torch.device, backward: bool = False):
    """(BLOCK_M, BLOCK_F, rows_per_chunk, num_warps). Untuned (no GPU was available): 4K-value tiles at 4 warps in
    the forward (32 values per thread, 16-byte bf16 loads), 2K-value tiles in the backward, which holds an fp32
    accumulator tile next to two input tiles (sm_90a resource report: tests/kernels/test_aot_sm90.py). Under the
    interpreter, whose cost is per program, large tiles."""
    block_f = min(next_power_of_2(F_), 512 if not backward else 256)
    if interpreted(device):
        block_f = next_power_of_2(F_)
        block_m = max(1, min(next_power_of_2(n_rows), 131072 // block_f))
        return block_m, block_f, cdiv(n_rows, block_m) * block_m, 4
    block_m = max(1, (4096 if not backward else 2048) // block_f)
    return block_m, block_f, cdiv(ROWS_PER_CHUNK, block_m) * block_m, 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> a (rows, F) view with unit column stride (copies only if it must)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_chunks(n_rows: int, F_: int, device: torch.device) -> int:
    return cdiv(n_rows, _launch_config(n_rows, F_, device, backward=True)[2])


def bias_gelu_fwd(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    F_ = u.shape[-1]
    u2 = _rows(u)
    y = empty(u.shape, u.dtype, u.device)
    block_m, block_f, _, warps = _launch_config(u2.shape[0], F_, u.device)
    grid = (cdiv(u2.shape[0], block_m), cdiv(F_, block_f))
    _bias_gelu_fwd_kernel[grid](
        u2, bias, y, u2.shape[0], F_, u2.stride(0), BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps
    )
    return y


def bias_gelu_bwd(dy: torch.Tensor, u: torch.Tensor, bias: torch.Tensor):
    """Returns (du, partials (chunks, F) fp32 whose sum over chunks is dbias)."""
    F_ = u.shape[-1]
    dy2, u2 = _rows(dy), _rows(u)
    n_rows = u2.shape[0]
    block_m, block_f, rows_per_chunk, warps = _launch_config(n_rows, F_, u.device, backward=True)
    chunks = cdiv(n_rows, rows_per_chunk)
    du = empty(u.shape, u.dtype, u.device)
    part = empty((chunks, F_), torch.float32, u.device)
    _bias_gelu_bwd_kernel[(chunks, cdiv(F_, block_f))](
        dy2,
        u2,
        bias,
        du,
        part,
        n_rows,
        F_,
        rows_per_chunk,
        dy2.stride(0),
        u2.stride(0),
        BLOCK_M=block_m,
        BLOCK_F=block_f,
        num_warps=warps,
    )
    return du, part


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (custom_op + register_fake + register_autograd, as every op of the package)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repa_fast::bias_gelu", mutates_args=())
def _bias_gelu_op(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_fwd(u, bias)


@_bias_gelu_op.register_fake
def _(u, bias):
    return u.new_empty(u.shape)


@torch.library.custom_op("repa_fast::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: torch.Tensor, u: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_bwd(dy, u, bias)


@_bias_gelu_bwd_op.register_fake
def _(dy, u, bias):
    n_rows = u.numel() // u.shape[-1]
    return u.new_empty(u.shape), u.new_empty(
        (_num_chunks(n_rows, u.shape[-1], u.device), u.shape[-1]), dtype=torch.float32
    )


def _setup(ctx, inputs, output):
    u, bias = inputs
    ctx.save_for_backward(u, bias)  # u: fc1's output, which eager's GELU saves too; y is saved by fc2


def _backward(ctx, dy):
    u, bias = ctx.saved_tensors
    du, part = _bias_gelu_bwd_op(dy, u, bias)
    return du, part.sum(0).to(bias.dtype)


_bias_gelu_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------------
# 5. Public ops: Triton when eligible (see _dispatch.use_triton), the reference otherwise.
# ----------------------------------------------------------------------------------------------------------------
def _check(u, bias):
    if bias.dim() != 1 or bias.shape[0] != u.shape[-1]:
        raise ValueError(
            f"bias_gelu: bias must have shape ({u.shape[-1]},) to match u {tuple(u.shape)}, got {tuple(bias.shape)}"
        )


def bias_gelu(u: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """GELU_tanh(u + bias) in u's dtype; u (..., F), bias (F,)."""
    _check(u, bias)
    if not use_triton("bias_gelu", impl, u):
        return bias_gelu_ref(u, bias)
    return _bias_gelu_op(u, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """GELU_tanh(x W^T + b): fc1 + activation of the SiT MLP. With Triton the bias leaves the GEMM for the
    activation kernel (whose backward also reduces the bias gradient); the reference path is the reference's
    ``F.gelu(F.linear(x, W, b))``, unchanged."""
    if not use_triton("bias_gelu", impl, x):
        return linear_gelu_ref(x, weight, bias)
    u = F.linear(x, weight)  # under autocast: the autocast dtype, and so is the activation
    _check(u, bias)
    return _bias_gelu_op(u, bias)
