"""REPA alignment loss: -(1/K) sum_k mean_{b,t} cos(pred_k[b,t], target_k[b,t]).

cos uses F.normalize semantics (x / max(||x||, eps), eps 1e-12) on the last dim, computed in fp32 (the reference
in float64 for float64 inputs: never below the input precision; the Triton kernel is fp32).
Shapes: pred_k, target_k (B, T, z_dim_k). Replaces the per-sample loop of the reference ``SILoss``
(loss.py:80-88), which it equals: ``-(normalize(z) * normalize(z_tilde)).sum(-1)`` averaged over tokens, samples
and then the K encoders (docs/objective.md §Alignment loss).

The fused op is the per-row cosine ``cosine_similarity_rows(p, z) -> (B, T)`` fp32: the forward reads each row of
p and z once and writes one float per row; the backward reads them once more and writes dp (and dz only when the
target needs a gradient). Norms and dot products are recomputed, nothing but the inputs is saved.

Not fused with the projector's last Linear: by the byte count in bench/results/analytic_bytes.md, never storing
the (B*T, z_dim) projector output saves well under 0.1% of a SiT-XL/2 training step's time at H100 bandwidth,
while a fused GEMM would have to re-run that Linear in the backward (or hold a (B*T, 2048) gradient, larger
than the output it avoids), and would replace cuBLAS for a 0.3%-of-FLOPs GEMM.
"""

from typing import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import cdiv, empty, interpreted, loss_dtype, next_power_of_2, tl, triton, use_triton

MAX_DIM = 16384  # one row is held in registers/one tile; DINOv2-g's 1536 and CLIP-L's 1024 are far below


# ----------------------------------------------------------------------------------------------------------------
# 1. References
# ----------------------------------------------------------------------------------------------------------------
def cosine_similarity_rows_ref(p: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(..., D), (..., D) -> (...): (normalize(p) * normalize(z)).sum(-1), normalised in fp32 (REPA #46) or in the
    inputs' wider dtype (float64 stays float64)."""
    acc = loss_dtype(p, z)
    return (F.normalize(p.to(acc), dim=-1, eps=eps) * F.normalize(z.to(acc), dim=-1, eps=eps)).sum(dim=-1)


def alignment_loss_ref(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], eps: float = 1e-12):
    _check(preds, targets)
    total = 0.0
    for p, z in zip(preds, targets):
        total = total + cosine_similarity_rows_ref(p, z, eps).mean()
    return -total / len(preds)


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernels: one row per tile row, fp32 right after each load.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _cos_rows_fwd_kernel(
    p_ptr,
    z_ptr,
    cos_ptr,
    n_rows,
    D,
    stride_p_row,
    stride_z_row,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # offsets may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    p = tl.load(p_ptr + rows[:, None] * stride_p_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    np_ = tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), eps)  # F.normalize: x / max(||x||, eps)
    nz = tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), eps)
    cos = tl.sum((p / np_[:, None]) * (z / nz[:, None]), axis=1)
    tl.store(cos_ptr + rows, cos, mask=rows < n_rows)


@triton.jit
def _cos_rows_bwd_kernel(
    dcos_ptr,
    p_ptr,
    z_ptr,
    dp_ptr,
    dz_ptr,
    n_rows,
    D,
    stride_p_row,
    stride_z_row,
    stride_dcos,
    eps,
    NEED_DP: tl.constexpr,
    NEED_DZ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # d cos / d p = (zn - [|p| >= eps] cos * pn) / max(|p|, eps), with pn, zn the normalised rows (clamp_min's
    # gradient flows where |p| >= eps, as in autograd); symmetric in z.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < D)[None, :]
    p = tl.load(p_ptr + rows[:, None] * stride_p_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * stride_z_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dcos_ptr + rows * stride_dcos, mask=rmask, other=0.0).to(tl.float32)
    norm_p = tl.sqrt(tl.sum(p * p, axis=1))
    norm_z = tl.sqrt(tl.sum(z * z, axis=1))
    np_ = tl.maximum(norm_p, eps)
    nz = tl.maximum(norm_z, eps)
    pn = p / np_[:, None]
    zn = z / nz[:, None]
    cos = tl.sum(pn * zn, axis=1)
    if NEED_DP:
        cp = tl.where(norm_p >= eps, cos, 0.0)
        dp = (g / np_)[:, None] * (zn - cp[:, None] * pn)
        tl.store(dp_ptr + rows[:, None] * D + cols[None, :], dp.to(dp_ptr.dtype.element_ty), mask=mask)
    if NEED_DZ:
        cz = tl.where(norm_z >= eps, cos, 0.0)
        dz = (g / nz)[:, None] * (pn - cz[:, None] * zn)
        tl.store(dz_ptr + rows[:, None] * D + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_config(n_rows: int, D: int, device: torch.device):
    """(BLOCK_M, BLOCK_D, num_warps): ~4K-value tiles on a GPU (untuned), large tiles under the interpreter."""
    block_d = next_power_of_2(D)
    cap = 131072 if interpreted(device) else 4096
    block_m = max(1, min(next_power_of_2(n_rows), cap // block_d, 256 if interpreted(device) else 64))
    return block_m, block_d, 8 if block_m * block_d >= 8192 else 4


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def cos_rows_fwd(p: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """(M, D), (M, D) -> (M,) fp32."""
    p2, z2 = _rows2d(p), _rows2d(z)
    M, D = p2.shape
    cos = empty(M, torch.float32, p.device)
    block_m, block_d, warps = _launch_config(M, D, p.device)
    _cos_rows_fwd_kernel[(cdiv(M, block_m),)](
        p2, z2, cos, M, D, p2.stride(0), z2.stride(0), eps, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps
    )
    return cos


def cos_rows_bwd(dcos, p, z, eps: float, need_dp: bool, need_dz: bool):
    """(M,) upstream gradient -> (dp or None, dz or None), each (M, D) in its input's dtype."""
    p2, z2 = _rows2d(p), _rows2d(z)
    M, D = p2.shape
    dp = empty((M, D), p.dtype, p.device) if need_dp else None
    dz = empty((M, D), z.dtype, z.device) if need_dz else None
    block_m, block_d, warps = _launch_config(M, D, p.device)
    _cos_rows_bwd_kernel[(cdiv(M, block_m),)](
        dcos,
        p2,
        z2,
        dp if need_dp else p2,
        dz if need_dz else z2,
        M,
        D,
        p2.stride(0),
        z2.stride(0),
        dcos.stride(0),
        eps,
        NEED_DP=need_dp,
        NEED_DZ=need_dz,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return dp, dz


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (custom_op + register_fake + register_autograd, as every op here)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repa_fast::cosine_rows", mutates_args=())
def _cos_rows_op(p: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    return cos_rows_fwd(p, z, eps)


@_cos_rows_op.register_fake
def _(p, z, eps):
    return p.new_empty(p.shape[0], dtype=torch.float32)


@torch.library.custom_op("repa_fast::cosine_rows_bwd", mutates_args=())
def _cos_rows_bwd_op(
    dcos: torch.Tensor, p: torch.Tensor, z: torch.Tensor, eps: float, need_dp: bool, need_dz: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dp, dz = cos_rows_bwd(dcos, p, z, eps, need_dp, need_dz)
    return dp if need_dp else p.new_empty(0), dz if need_dz else z.new_empty(0)


@_cos_rows_bwd_op.register_fake
def _(dcos, p, z, eps, need_dp, need_dz):
    return p.new_empty(p.shape if need_dp else 0), z.new_empty(z.shape if need_dz else 0)


def _cos_rows_setup(ctx, inputs, output):
    p, z, eps = inputs
    ctx.save_for_backward(p, z)
    ctx.eps = eps


def _cos_rows_backward(ctx, dcos):
    p, z = ctx.saved_tensors
    need_dp, need_dz = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dp, dz = _cos_rows_bwd_op(dcos, p, z, ctx.eps, need_dp, need_dz)
    return (dp if need_dp else None), (dz if need_dz else None), None


_cos_rows_op.register_autograd(_cos_rows_backward, setup_context=_cos_rows_setup)


# ----------------------------------------------------------------------------------------------------------------
# 5. Public ops
# ----------------------------------------------------------------------------------------------------------------
def _check(preds, targets):
    if len(preds) != len(targets) or not preds:
        raise ValueError(f"alignment loss needs one prediction per target, got {len(preds)} and {len(targets)}")
    for k, (p, z) in enumerate(zip(preds, targets)):
        if p.shape != z.shape:
            raise ValueError(
                f"alignment loss: projector output {k} has shape {tuple(p.shape)} but target {k} has {tuple(z.shape)};"
                " check the projector z_dim against the encoder's embedding width"
            )


def cosine_similarity_rows(p: torch.Tensor, z: torch.Tensor, eps: float = 1e-12, impl: str = "auto") -> torch.Tensor:
    """Per-row cosine with F.normalize semantics: (..., D), (..., D) -> (...) fp32; differentiable in p and z."""
    if p.shape != z.shape:
        raise ValueError(f"cosine_similarity_rows: shapes {tuple(p.shape)} and {tuple(z.shape)} differ")
    if not use_triton("alignment_loss", impl, p) or p.numel() == 0 or (impl == "auto" and p.shape[-1] > MAX_DIM):
        return cosine_similarity_rows_ref(p, z, eps)
    if p.shape[-1] > MAX_DIM:
        raise ValueError(
            f"cosine_similarity_rows: the Triton kernel holds a row in one tile, D <= {MAX_DIM}; "
            f"got {p.shape[-1]}. Use impl='ref' or 'auto'."
        )
    lead = p.shape[:-1]
    return _cos_rows_op(p.reshape(-1, p.shape[-1]), z.reshape(-1, z.shape[-1]), float(eps)).reshape(lead)


def alignment_loss(preds, targets, eps: float = 1e-12, impl: str = "auto"):
    """-(1/K) sum_k mean over (b, t) of cos(preds[k], targets[k]): a scalar fp32 (negative, tends to -1)."""
    _check(preds, targets)
    if not use_triton("alignment_loss", impl, preds[0]):
        return alignment_loss_ref(preds, targets, eps)
    total = 0.0
    for p, z in zip(preds, targets):
        total = total + cosine_similarity_rows(p, z, eps, impl=impl).mean()
    return -total / len(preds)
