"""adaLN modulation: y = Norm(x) * (1 + scale) + shift, and the fused gated residual before it.

Shapes: x, branch (B, N, D); shift, scale, gate (B, D), broadcast over the N tokens; weight (D,) optional.
Norm is LayerNorm without affine (eps 1e-6, DiT/SiT), or RMSNorm with a learnable weight (LightningDiT-style:
``RMSNorm(x.float()).type_as(x) * weight``); LayerNorm also takes an optional weight (no bias).
Replaces ``modulate(self.norm1(x), shift, scale)`` of DiT/SiT and the pair
``x = x + gate * branch; y = modulate(self.norm2(x), shift, scale)`` (``gated_residual_adaln``: one pass,
both outputs), and the block's last ``x = x + gate * branch`` (``gated_residual``: the same kernels without the
norm). Statistics are fp32 and recomputed in the backward, which reads each row of x once and
returns dx, dshift, dscale (and dbranch, dgate, dweight) from that single pass; the per-sample reductions
over tokens are written as per-chunk partial sums, then summed in fp32 (deterministic, no atomics).
Dtypes: x_new keeps eager's promotion (the fp32 residual stream under autocast); y is written in ``y_dtype``
when given: SiT passes the dtype its next GEMM reads under autocast, so y is rounded once from fp32 on store
instead of being written in fp32 and cast by the GEMM (issue 18, docs/objective.md §Training defaults).
"""

import torch
import torch.nn.functional as F

from ._dispatch import cdiv, empty, interpreted, next_power_of_2, num_sms, out_dtype, tl, triton, use_triton

NORMS = ("layer", "rms")
MIN_CHUNK_TOKENS = 32


# ----------------------------------------------------------------------------------------------------------------
# 1. References (the spec, the CPU fallback, the test oracle, the benchmark baseline)
# ----------------------------------------------------------------------------------------------------------------
def _norm_ref(x: torch.Tensor, norm: str, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight=weight, eps=eps)
    # LightningDiT / Llama RMSNorm: normalise in fp32, cast back, then the learnable weight.
    x32 = x.float()
    out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out if weight is None else out * weight


def adaln_modulate_ref(x, shift, scale, eps: float = 1e-6, norm: str = "layer", weight=None) -> torch.Tensor:
    return _norm_ref(x, norm, weight, eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual_adaln_ref(x, branch, gate, shift, scale, eps: float = 1e-6, norm: str = "layer", weight=None):
    """Returns (x + gate * branch, Norm(x + gate * branch) * (1 + scale) + shift)."""
    x_new = x + gate.unsqueeze(1) * branch
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps, norm, weight)


def gated_residual_ref(x, branch, gate):
    """x + gate * branch: the block's last residual, ``x = x + gate2 * mlp(h)`` (docs/objective.md §Model)."""
    return x + gate.unsqueeze(1) * branch


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernels. Rows are the B*N tokens; a row's sample is row // n_tok. Every load is upcast to fp32 at once
#    (bf16 arithmetic is wrong in the interpreter, and statistics must be fp32 anyway).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_norm(x, mask, D, eps, RMS: tl.constexpr):
    """(x_hat, rstd) of rows x: LayerNorm without affine, or RMSNorm; statistics in fp32."""
    if RMS:
        xc = x
    else:
        xc = tl.where(mask, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _adaln_fwd_kernel(
    x_ptr,
    branch_ptr,
    gate_ptr,
    shift_ptr,
    scale_ptr,
    w_ptr,
    xnew_ptr,
    y_ptr,
    n_rows,
    n_tok,
    D,
    stride_x_row,
    stride_branch_row,
    stride_gate_b,
    stride_shift_b,
    stride_scale_b,
    eps,
    GATED: tl.constexpr,
    NORM: tl.constexpr,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # NORM=False (with GATED): only x_new = x + gate * branch, the block's last residual (gated_residual).
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,); int64: offsets may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    b = rows // n_tok
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATED:
        br = tl.load(branch_ptr + rows[:, None] * stride_branch_row + cols[None, :], mask=mask, other=0.0)
        g = tl.load(gate_ptr + b[:, None] * stride_gate_b + cols[None, :], mask=mask, other=0.0)
        x = x + g.to(tl.float32) * br.to(tl.float32)
        xq = x.to(xnew_ptr.dtype.element_ty)  # the stored residual; the norm reads what was stored, as eager does
        tl.store(xnew_ptr + rows[:, None] * D + cols[None, :], xq, mask=mask)
        x = xq.to(tl.float32)
    if NORM:
        xhat, rstd = _row_norm(x, mask, D, eps, RMS)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
            xhat = xhat * w[None, :]
        sh = tl.load(shift_ptr + b[:, None] * stride_shift_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b[:, None] * stride_scale_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = xhat * (1.0 + sc) + sh  # fp32; rounded once to y's dtype (bf16 when it feeds an autocast GEMM)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    dy_ptr,
    dres_ptr,
    h_ptr,
    branch_ptr,
    gate_ptr,
    scale_ptr,
    w_ptr,
    dx_ptr,
    dbranch_ptr,
    part_ptr,
    n_tok,
    D,
    rows_per_chunk,
    n_chunks,
    n_batch,
    stride_dy_row,
    stride_dres_row,
    stride_h_row,
    stride_branch_row,
    stride_gate_b,
    stride_scale_b,
    eps,
    GATED: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_DRES: tl.constexpr,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (sample b, chunk c of its tokens). Partial sums go to part[k, b, c, :]:
    # k=0: sum dy (-> dshift), k=1: sum dy * xhat (-> dscale, dweight), k=2: sum dh * branch (-> dgate).
    # HAS_DY=False (gated_residual: no norm output, GATED and HAS_DRES): dh = dres; dx = dres is not written (the
    # caller passes dres on), only dbranch and k=0: sum dres * branch (-> dgate).
    b = tl.program_id(0).to(tl.int64)  # int64 offsets: B * N * D may pass 2^31
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_DY:
        mod = 1.0 + tl.load(scale_ptr + b * stride_scale_b + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            mod = mod * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(gate_ptr + b * stride_gate_b + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_dy = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_dg = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_start = c * rows_per_chunk  # rows_per_chunk is a multiple of BLOCK_M; the last chunk may overhang (masked)
    for n0 in range(n_start, n_start + rows_per_chunk, BLOCK_M):
        toks = n0 + tl.arange(0, BLOCK_M)
        rows = b * n_tok + toks
        mask = (toks < n_tok)[:, None] & cmask[None, :]
        if HAS_DY:
            h = tl.load(h_ptr + rows[:, None] * stride_h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            xhat, rstd = _row_norm(h, mask, D, eps, RMS)
            dxhat = dy * mod[None, :]
            c1 = tl.sum(dxhat * xhat, axis=1) / D
            if RMS:
                dh = (dxhat - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(dxhat, axis=1) / D
                dh = (dxhat - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            if HAS_DRES:
                dres = tl.load(dres_ptr + rows[:, None] * stride_dres_row + cols[None, :], mask=mask, other=0.0)
                dh = dh + dres.to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
            acc_dy += dy
            acc_dyx += dy * xhat
        else:
            dh = tl.load(dres_ptr + rows[:, None] * stride_dres_row + cols[None, :], mask=mask, other=0.0)
            dh = dh.to(tl.float32)
        if GATED:
            br = tl.load(branch_ptr + rows[:, None] * stride_branch_row + cols[None, :], mask=mask, other=0.0)
            dbr = dh * g[None, :]
            tl.store(dbranch_ptr + rows[:, None] * D + cols[None, :], dbr.to(dbranch_ptr.dtype.element_ty), mask=mask)
            acc_dg += tl.where(mask, dh * br.to(tl.float32), 0.0)
    part = part_ptr + (b * n_chunks + c) * D + cols
    plane = n_batch * n_chunks * D
    if HAS_DY:
        tl.store(part, tl.sum(acc_dy, axis=0), mask=cmask)
        tl.store(part + plane, tl.sum(acc_dyx, axis=0), mask=cmask)
        if GATED:
            tl.store(part + 2 * plane, tl.sum(acc_dg, axis=0), mask=cmask)
    else:
        tl.store(part, tl.sum(acc_dg, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers: checks, layout, grid. No autograd here.
# ----------------------------------------------------------------------------------------------------------------
def _launch_config(n_rows: int, n_tok: int, D: int, device: torch.device, backward: bool = False):
    """(BLOCK_M, BLOCK_D, rows_per_chunk, num_warps). Untuned heuristics (no GPU was available to tune them):
    tiles of about 4K (forward) or 2K (backward) fp32 values at 8 warps on a GPU; under the interpreter, whose cost
    is per program, large tiles. From the sm_90a resource report (tests/kernels/test_aot_sm90.py): the backward
    holds 3 accumulator tiles next to 3-4 input tiles, and with 4K-value tiles at 4 warps ptxas needs ~255
    registers and spills; at 2K values and 8 warps it needs <= 128 (16 resident warps per SM). The forward at 4
    warps spilled under triton 3.6 (RMSNorm + weight, D=384); at 8 warps it needs 40-56 registers."""
    block_d = next_power_of_2(D)
    if interpreted(device):
        block_m = max(1, min(next_power_of_2(n_tok), 131072 // block_d, 256))
        return block_m, block_d, cdiv(n_tok, block_m) * block_m, 4
    block_m = max(1, min(16, (2048 if backward else 4096) // block_d))
    n_batch = max(1, n_rows // max(n_tok, 1))
    # Enough (sample, chunk) programs to fill the GPU, but chunks of >= MIN_CHUNK_TOKENS tokens: each chunk writes
    # 2-3 fp32 partial rows, which must stay small next to the bf16 rows it reads (<= ~12% at 32 tokens).
    chunks = max(1, min(cdiv(n_tok, MIN_CHUNK_TOKENS), cdiv(4 * num_sms(device), n_batch)))
    rows_per_chunk = cdiv(cdiv(n_tok, chunks), block_m) * block_m
    return block_m, block_d, rows_per_chunk, 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> a (B*N, D) view with unit column stride (copies only if it must)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _cols(t: torch.Tensor | None) -> torch.Tensor | None:
    """(B, D) modulation vectors, e.g. chunks of the adaLN Linear output: keep the row stride, unit column stride."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def adaln_fwd(x, branch, gate, shift, scale, weight, eps: float, rms: bool, xnew_dtype, y_dtype):
    """Returns (x_new or None, y or None); x_new = x + gate * branch when ``branch`` is given, else x itself is
    normalised; ``y_dtype=None`` (with a branch) skips the norm: x_new only (shift, scale unused)."""
    B, N, D = x.shape
    x2, br2 = _rows(x), _rows(branch) if branch is not None else None
    gate, shift, scale = _cols(gate), _cols(shift), _cols(scale)
    gated, norm = branch is not None, y_dtype is not None
    assert gated or norm, "adaln_fwd: nothing to compute"
    x_new = empty((B, N, D), xnew_dtype, x.device) if gated else None
    y = empty((B, N, D), y_dtype, x.device) if norm else None
    block_m, block_d, _, warps = _launch_config(B * N, N, D, x.device)
    dummy = x2
    _adaln_fwd_kernel[(cdiv(B * N, block_m),)](
        x2,
        br2 if gated else dummy,
        gate if gated else dummy,
        shift if norm else dummy,
        scale if norm else dummy,
        weight if weight is not None else dummy,
        x_new if gated else dummy,
        y if norm else dummy,
        B * N,
        N,
        D,
        x2.stride(0),
        br2.stride(0) if gated else 0,
        gate.stride(0) if gated else 0,
        shift.stride(0) if norm else 0,
        scale.stride(0) if norm else 0,
        eps,
        GATED=gated,
        NORM=norm,
        RMS=rms,
        HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return x_new, y


def _num_chunks(N: int, D: int, device: torch.device, n_rows: int) -> int:
    _, _, rows_per_chunk, _ = _launch_config(n_rows, N, D, device, backward=True)
    return cdiv(N, rows_per_chunk)


def _num_planes(gated: bool, has_dy: bool) -> int:
    return (2 + gated) if has_dy else 1


def adaln_bwd(dy, dres, h, branch, gate, scale, weight, eps: float, rms: bool, dx_dtype):
    """Returns (dx, dbranch or None, partials (planes, B, chunks, D) fp32); see _adaln_bwd_kernel. ``dy=None``
    (gated_residual's backward, with dres and a branch): dx is dres itself, returned as None (nothing written)."""
    B, N, D = (h if h is not None else dres).shape
    has_dy, gated = dy is not None, branch is not None
    assert has_dy or (gated and dres is not None), "adaln_bwd: without dy it is gated_residual's backward"
    dy2, h2 = (_rows(dy), _rows(h)) if has_dy else (None, None)
    dres2 = _rows(dres) if dres is not None else None
    br2 = _rows(branch) if gated else None
    gate, scale = _cols(gate), _cols(scale)
    device = (h if h is not None else dres).device
    block_m, block_d, rows_per_chunk, warps = _launch_config(B * N, N, D, device, backward=True)
    chunks = cdiv(N, rows_per_chunk)
    dx = empty((B, N, D), dx_dtype, device) if has_dy else None
    dbranch = empty(branch.shape, branch.dtype, branch.device) if gated else None
    part = empty((_num_planes(gated, has_dy), B, chunks, D), torch.float32, device)
    dummy = h2 if has_dy else dres2
    _adaln_bwd_kernel[(B, chunks)](
        dy2 if has_dy else dummy,
        dres2 if dres is not None else dummy,
        h2 if has_dy else dummy,
        br2 if gated else dummy,
        gate if gated else dummy,
        scale if has_dy else dummy,
        weight if weight is not None else dummy,
        dx if has_dy else dummy,
        dbranch if gated else dummy,
        part,
        N,
        D,
        rows_per_chunk,
        chunks,
        B,
        dy2.stride(0) if has_dy else 0,
        dres2.stride(0) if dres is not None else 0,
        h2.stride(0) if has_dy else 0,
        br2.stride(0) if gated else 0,
        gate.stride(0) if gated else 0,
        scale.stride(0) if has_dy else 0,
        eps,
        GATED=gated,
        HAS_DY=has_dy,
        HAS_DRES=dres is not None,
        RMS=rms,
        HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return dx, dbranch, part


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (custom_op + register_fake + register_autograd: the project's one mechanism),
#    so torch.compile(fullgraph=True) sees opaque ops instead of tracing into Triton's launcher.
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repa_fast::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
    y_dtype: torch.dtype,
) -> torch.Tensor:
    return adaln_fwd(x, None, None, shift, scale, weight, eps, rms, None, y_dtype)[1]


@_adaln_modulate_op.register_fake
def _(x, shift, scale, weight, eps, rms, y_dtype):
    return x.new_empty(x.shape, dtype=y_dtype)


@torch.library.custom_op("repa_fast::gated_residual_adaln", mutates_args=())
def _gated_adaln_op(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
    xnew_dtype: torch.dtype,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return adaln_fwd(x, branch, gate, shift, scale, weight, eps, rms, xnew_dtype, y_dtype)


@_gated_adaln_op.register_fake
def _(x, branch, gate, shift, scale, weight, eps, rms, xnew_dtype, y_dtype):
    return x.new_empty(x.shape, dtype=xnew_dtype), x.new_empty(x.shape, dtype=y_dtype)


@torch.library.custom_op("repa_fast::adaln_modulate_bwd", mutates_args=())
def _adaln_bwd_op(
    dy: torch.Tensor,
    dres: torch.Tensor | None,
    h: torch.Tensor,
    branch: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
    dx_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dbranch, part = adaln_bwd(dy, dres, h, branch, gate, scale, weight, eps, rms, dx_dtype)
    return dx, dbranch if dbranch is not None else h.new_empty(0), part


@_adaln_bwd_op.register_fake
def _(dy, dres, h, branch, gate, scale, weight, eps, rms, dx_dtype):
    B, N, D = h.shape
    chunks = _num_chunks(N, D, h.device, B * N)
    dbranch = branch.new_empty(branch.shape) if branch is not None else h.new_empty(0)
    part = h.new_empty((_num_planes(branch is not None, True), B, chunks, D), dtype=torch.float32)
    return h.new_empty(h.shape, dtype=dx_dtype), dbranch, part


def _param_grads(part, scale, weight, shift_dtype, scale_dtype):
    """(dshift, dscale, dweight) from the partial sums: dscale = w * sum(dy xhat), dw = sum_b (1 + scale_b) * ..."""
    sums = part.sum(dim=2)  # (K, B, D) fp32
    dyx = sums[1]
    dscale = dyx if weight is None else dyx * weight.float()
    dweight = None if weight is None else ((1 + scale.float()) * dyx).sum(0).to(weight.dtype)
    return sums, sums[0].to(shift_dtype), dscale.to(scale_dtype), dweight


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, weight, eps, rms, _ = inputs
    ctx.save_for_backward(x, scale, weight)
    ctx.eps, ctx.rms, ctx.shift_dtype = eps, rms, shift.dtype


def _adaln_backward(ctx, dy):
    x, scale, weight = ctx.saved_tensors
    dx, _, part = _adaln_bwd_op(dy, None, x, None, None, scale, weight, ctx.eps, ctx.rms, x.dtype)
    _, dshift, dscale, dweight = _param_grads(part, scale, weight, ctx.shift_dtype, scale.dtype)
    return dx, dshift, dscale, dweight, None, None, None


def _gated_setup(ctx, inputs, output):
    x, branch, gate, shift, scale, weight, eps, rms, _, _ = inputs
    ctx.save_for_backward(output[0], branch, gate, scale, weight)  # x_new: the residual stream keeps it anyway
    ctx.eps, ctx.rms, ctx.x_dtype, ctx.shift_dtype = eps, rms, x.dtype, shift.dtype


def _gated_backward(ctx, dxnew, dy):
    x_new, branch, gate, scale, weight = ctx.saved_tensors
    dx, dbranch, part = _adaln_bwd_op(dy, dxnew, x_new, branch, gate, scale, weight, ctx.eps, ctx.rms, ctx.x_dtype)
    sums, dshift, dscale, dweight = _param_grads(part, scale, weight, ctx.shift_dtype, scale.dtype)
    return dx, dbranch, sums[2].to(gate.dtype), dshift, dscale, dweight, None, None, None, None


@torch.library.custom_op("repa_fast::gated_residual", mutates_args=())
def _gated_residual_op(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, xnew_dtype: torch.dtype
) -> torch.Tensor:
    return adaln_fwd(x, branch, gate, None, None, None, 0.0, False, xnew_dtype, None)[0]


@_gated_residual_op.register_fake
def _(x, branch, gate, xnew_dtype):
    return x.new_empty(x.shape, dtype=xnew_dtype)


@torch.library.custom_op("repa_fast::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    dxnew: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _, dbranch, part = adaln_bwd(None, dxnew, None, branch, gate, None, None, 0.0, False, None)
    return dbranch, part


@_gated_residual_bwd_op.register_fake
def _(dxnew, branch, gate):
    B, N, D = branch.shape
    part = branch.new_empty((1, B, _num_chunks(N, D, branch.device, B * N), D), dtype=torch.float32)
    return branch.new_empty(branch.shape), part


def _residual_setup(ctx, inputs, output):
    x, branch, gate, _ = inputs
    ctx.save_for_backward(branch, gate)
    ctx.x_dtype = x.dtype


def _residual_backward(ctx, dxnew):
    branch, gate = ctx.saved_tensors
    dbranch, part = _gated_residual_bwd_op(dxnew, branch, gate)
    return dxnew.to(ctx.x_dtype), dbranch, part[0].sum(1).to(gate.dtype), None  # dx = dx_new: no pass


_adaln_modulate_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)
_gated_adaln_op.register_autograd(_gated_backward, setup_context=_gated_setup)
_gated_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup)


# ----------------------------------------------------------------------------------------------------------------
# 5. Public ops: Triton when eligible (see _dispatch.use_triton), the reference otherwise.
# ----------------------------------------------------------------------------------------------------------------
def _check(x, norm, weight, **mods):
    if norm not in NORMS:
        raise ValueError(f"adaLN norm must be one of {NORMS}, got {norm!r}")
    if x.dim() != 3:
        raise ValueError(f"adaLN input x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    for name, t in mods.items():
        want = (B, N, D) if name == "branch" else (B, D)
        if tuple(t.shape) != want:
            raise ValueError(f"adaLN {name} must have shape {want} to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    if weight is not None and tuple(weight.shape) != (D,):
        raise ValueError(f"adaLN norm weight must have shape ({D},), got {tuple(weight.shape)}")


def adaln_modulate(
    x, shift, scale, eps: float = 1e-6, impl: str = "auto", *, norm: str = "layer", weight=None, y_dtype=None
):
    """Norm(x) * (1 + scale) + shift; x (B, N, D), shift/scale (B, D); norm "layer" (DiT) or "rms" (+ weight).

    ``y_dtype``: the dtype y is written in; None is eager PyTorch's (type promotion; fp32 under CUDA autocast). SiT
    passes ``autocast_dtype(x)`` because y only feeds a GEMM, which reads it in that dtype: the kernel rounds its fp32
    result once on store, the reference casts its fp32 result, the same rounding the GEMM's autocast cast did."""
    _check(x, norm, weight, shift=shift, scale=scale)
    if not use_triton("adaln_modulate", impl, x):
        y = adaln_modulate_ref(x, shift, scale, eps, norm, weight)
        return y if y_dtype is None else y.to(y_dtype)
    y_dtype = y_dtype or out_dtype(x, shift, scale, weight, norm_autocast=norm == "layer")
    return _adaln_modulate_op(x, shift, scale, weight, float(eps), norm == "rms", y_dtype)


def gated_residual_adaln(
    x, branch, gate, shift, scale, eps: float = 1e-6, impl: str = "auto", *, norm="layer", weight=None, y_dtype=None
):
    """(x_new, y) with x_new = x + gate * branch and y = Norm(x_new) * (1 + scale) + shift, in one pass.

    x_new, the residual stream, keeps eager's promoted dtype (fp32 under autocast, as the reference accumulates it);
    ``y_dtype`` is y's, as in ``adaln_modulate``."""
    _check(x, norm, weight, branch=branch, gate=gate, shift=shift, scale=scale)
    if not use_triton("gated_residual_adaln", impl, x):
        x_new, y = gated_residual_adaln_ref(x, branch, gate, shift, scale, eps, norm, weight)
        return x_new, (y if y_dtype is None else y.to(y_dtype))
    xnew_dtype = out_dtype(x, branch, gate)
    y_dtype = y_dtype or out_dtype(x, xnew_dtype, shift, scale, weight, norm_autocast=norm == "layer")
    return _gated_adaln_op(x, branch, gate, shift, scale, weight, float(eps), norm == "rms", xnew_dtype, y_dtype)


def gated_residual(x, branch, gate, impl: str = "auto"):
    """x + gate * branch for x, branch (B, N, D) and gate (B, D): the block's last residual in one pass (eager writes
    gate * branch, then reads it back for the add) with fp32 arithmetic (eager rounds gate * branch to the branch's
    dtype first), and a backward that reads the residual gradient once for both dbranch and dgate; dx is that
    gradient itself. The sum keeps eager's promoted dtype: fp32 under autocast, the reference's residual stream."""
    _check(x, "layer", None, branch=branch, gate=gate)
    if not use_triton("gated_residual", impl, x):
        return gated_residual_ref(x, branch, gate)
    return _gated_residual_op(x, branch, gate, out_dtype(x, branch, gate))
