"""2-D axial RoPE (EVA-02 layout, docs/objective.md §RoPE) on q or k of shape (B, N, H, Dh), optionally after a
per-head norm.

The first Dh/2 channels rotate with the token's row index, the last Dh/2 with its column index;
rotation pairs are adjacent channels (2i, 2i+1): out = x * cos + rotate_half(x) * sin with
rotate_half(x)[2i] = -x[2i+1], rotate_half(x)[2i+1] = x[2i].

``qk_norm_rope`` fuses the per-head qk-norm that precedes it (ERW/LightningDiT ``q = rope(q_norm(q))``):
LayerNorm(head_dim) with affine, eps 1e-5 (timm/nn.LayerNorm, the reference qk_norm), or RMSNorm with a weight.
It reads q straight out of the qkv GEMM output (a strided (B, N, H, Dh) view, no copy), writes one contiguous
(B, N, H, Dh) tensor, and its backward returns dx, dweight, dbias in one pass over the rows (fp32 statistics are
recomputed; dweight/dbias are per-program partial sums, then summed in fp32).
"""

import torch
import torch.nn.functional as F

from ._dispatch import cdiv, empty, interpreted, next_power_of_2, num_sms, out_dtype, tl, triton, use_triton
from .adaln import _row_norm

NORMS = (None, "layer", "rms")


# ----------------------------------------------------------------------------------------------------------------
# 1. References
# ----------------------------------------------------------------------------------------------------------------
def rope_2d_cos_sin(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0, device=None):
    """cos, sin tables of shape (grid_h * grid_w, head_dim), fp32, tokens in row-major order."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2  # channels per axis
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64, device=device)[: half // 2] / half)
    freqs = freqs.repeat_interleave(2)  # (half,), pairs share a frequency
    rows = torch.arange(grid_h, dtype=torch.float64, device=device)[:, None] * freqs  # (H, half)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device)[:, None] * freqs  # (W, half)
    ang = torch.cat(
        [rows[:, None, :].expand(grid_h, grid_w, half), cols[None, :, :].expand(grid_h, grid_w, half)], dim=-1
    ).reshape(grid_h * grid_w, head_dim)
    return ang.cos().float(), ang.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope_2d_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, Dh), broadcast over heads
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


def qk_norm_rope_ref(x, weight=None, bias=None, cos=None, sin=None, eps: float = 1e-5, norm: str | None = "layer"):
    """rope(norm(x)): norm "layer" = F.layer_norm(head_dim, weight, bias) (nn.LayerNorm), "rms" = RMSNorm * weight."""
    if norm == "layer":
        x = F.layer_norm(x, (x.shape[-1],), weight=weight, bias=bias, eps=eps)
    elif norm == "rms":
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
        x = x if weight is None else x * weight
        x = x if bias is None else x + bias
    return x if cos is None else apply_rope_2d_ref(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernels. A row is one (b, n, h) head vector, loaded whole (HEAD_DIM contiguous channels: 16-byte loads) and
#    rotated by pairing channels in registers (reshape + split/join). NORM: 0 none, 1 LayerNorm, 2 RMSNorm.
#    fp32 right after every load. HEAD_DIM is a constexpr so that row offsets are provably 16-byte aligned for the
#    non-power-of-2 head dim 72 (SiT-XL) as well; PACKED_HEADS: the head stride is HEAD_DIM (the qkv GEMM's view).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_half_tile(x, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """rotate_half of rows x (BLOCK_R, BLOCK_D): out[2i] = -x[2i+1], out[2i+1] = x[2i]."""
    xe, xo = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(-xo, xe), (BLOCK_R, BLOCK_D))


@triton.jit
def _row_offsets(rows, N, H, stride_xb, stride_xn, stride_xh, HEAD_DIM: tl.constexpr, PACKED_HEADS: tl.constexpr):
    """(token index n, element offset of each row) of rows of a strided (B, N, H, HEAD_DIM) tensor."""
    n = (rows // H) % N
    head = rows % H
    head_off = head * HEAD_DIM if PACKED_HEADS else head * stride_xh
    return n, (rows // (H * N)) * stride_xb + n * stride_xn + head_off


@triton.jit
def _norm_rope_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    n_rows,
    N,
    H,
    stride_xb,
    stride_xn,
    stride_xh,
    eps,
    HEAD_DIM: tl.constexpr,
    PACKED_HEADS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # offsets may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HEAD_DIM
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    n, base = _row_offsets(rows, N, H, stride_xb, stride_xn, stride_xh, HEAD_DIM, PACKED_HEADS)
    x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        x, rstd = _row_norm(x, mask, HEAD_DIM, eps, NORM == 2)
        if HAS_WEIGHT:
            x = x * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            x = x + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        tab = n[:, None] * HEAD_DIM + cols[None, :]  # the tables are contiguous (N, HEAD_DIM)
        c = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        x = x * c + _rotate_half_tile(x, BLOCK_R, BLOCK_D) * s
    tl.store(y_ptr + rows[:, None] * HEAD_DIM + cols[None, :], x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    dx_ptr,
    part_ptr,
    n_rows,
    N,
    H,
    rows_per_prog,
    stride_xb,
    stride_xn,
    stride_xh,
    eps,
    HEAD_DIM: tl.constexpr,
    PACKED_HEADS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dz = R^T dy = dy * cos - rotate_half(dy * sin) (the transposed rotation); then the norm's backward.
    # part[0, pid] = sum dz * xhat (dweight), part[1, pid] = sum dz (dbias), over this program's rows_per_prog rows.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < HEAD_DIM
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        n, base = _row_offsets(rows, N, H, stride_xb, stride_xn, stride_xh, HEAD_DIM, PACKED_HEADS)
        dz = tl.load(dy_ptr + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:
            tab = n[:, None] * HEAD_DIM + cols[None, :]
            c = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
            dz = dz * c - _rotate_half_tile(dz * s, BLOCK_R, BLOCK_D)
        if NORM != 0:
            x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xhat, rstd = _row_norm(x, mask, HEAD_DIM, eps, NORM == 2)
            acc_w += dz * xhat
            acc_b += dz
            if HAS_WEIGHT:
                dz = dz * w[None, :]
            c1 = tl.sum(dz * xhat, axis=1) / HEAD_DIM
            if NORM == 1:
                dz = dz - (tl.sum(dz, axis=1) / HEAD_DIM)[:, None]
            dz = (dz - xhat * c1[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * HEAD_DIM + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=mask)
    if NORM != 0:
        part = part_ptr + pid * HEAD_DIM + cols
        plane = tl.num_programs(0) * HEAD_DIM
        tl.store(part, tl.sum(acc_w, axis=0), mask=cmask)
        tl.store(part + plane, tl.sum(acc_b, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_config(n_rows: int, Dh: int, device: torch.device):
    """(BLOCK_R, BLOCK_D, rows_per_prog of the backward, num_warps). On a GPU: tiles of 2048 values (16 fp32 per
    thread and tensor at 4 warps: no spills and >= 16 resident warps per SM on sm_90, tests/kernels/test_aot_sm90.py);
    under the interpreter, whose cost is per program, large tiles."""
    block_d = next_power_of_2(Dh)
    if interpreted(device):
        block_r = max(1, min(next_power_of_2(n_rows), 131072 // block_d, 4096))
        return block_r, block_d, cdiv(n_rows, block_r) * block_r, 4
    block_r = max(1, min(64, 2048 // block_d))
    progs = max(1, min(cdiv(n_rows, block_r), 4 * num_sms(device)))
    return block_r, block_d, cdiv(cdiv(n_rows, progs), block_r) * block_r, 4


def _tables(cos, sin):
    if cos is None:
        return None, None
    return cos.contiguous(), sin.contiguous()


def norm_rope_fwd(x, weight, bias, cos, sin, eps: float, norm: int, y_dtype):
    """x (B, N, H, Dh), any strides with a unit channel stride -> contiguous (B, N, H, Dh) of ``y_dtype``."""
    B, N, H, Dh = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = _tables(cos, sin)
    y = empty((B, N, H, Dh), y_dtype, x.device)
    n_rows = B * N * H
    block_r, block_d, _, warps = _launch_config(n_rows, Dh, x.device)
    dummy = x
    _norm_rope_fwd_kernel[(cdiv(n_rows, block_r),)](
        x,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        cos if cos is not None else dummy,
        sin if sin is not None else dummy,
        y,
        n_rows,
        N,
        H,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        eps,
        HEAD_DIM=Dh,
        PACKED_HEADS=x.stride(2) == Dh,
        NORM=norm,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_ROPE=cos is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return y


def _num_progs(n_rows: int, Dh: int, device: torch.device) -> int:
    _, _, rows_per_prog, _ = _launch_config(n_rows, Dh, device)
    return cdiv(n_rows, rows_per_prog)


def norm_rope_bwd(dy, x, weight, cos, sin, eps: float, norm: int, dx_dtype):
    """Returns (dx (B, N, H, Dh), partials (2, programs, Dh) fp32: [sum dz * xhat, sum dz], empty if no norm)."""
    B, N, H, Dh = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    dy = dy.contiguous()
    cos, sin = _tables(cos, sin)
    n_rows = B * N * H
    block_r, block_d, rows_per_prog, warps = _launch_config(n_rows, Dh, x.device)
    progs = cdiv(n_rows, rows_per_prog)
    dx = empty((B, N, H, Dh), dx_dtype, x.device)
    part = empty((2, progs, Dh) if norm else (0,), torch.float32, x.device)
    dummy = x
    _norm_rope_bwd_kernel[(progs,)](
        dy,
        x,
        weight if weight is not None else dummy,
        cos if cos is not None else dummy,
        sin if sin is not None else dummy,
        dx,
        part if norm else dummy,
        n_rows,
        N,
        H,
        rows_per_prog,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        eps,
        HEAD_DIM=Dh,
        PACKED_HEADS=x.stride(2) == Dh,
        NORM=norm,
        HAS_WEIGHT=weight is not None,
        HAS_ROPE=cos is not None,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return dx, part


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library registration (custom_op + register_fake + register_autograd)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repa_fast::norm_rope", mutates_args=())
def _norm_rope_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    norm: int,
    y_dtype: torch.dtype,
) -> torch.Tensor:
    return norm_rope_fwd(x, weight, bias, cos, sin, eps, norm, y_dtype)


@_norm_rope_op.register_fake
def _(x, weight, bias, cos, sin, eps, norm, y_dtype):
    return x.new_empty(x.shape, dtype=y_dtype)


@torch.library.custom_op("repa_fast::norm_rope_bwd", mutates_args=())
def _norm_rope_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    eps: float,
    norm: int,
    dx_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_rope_bwd(dy, x, weight, cos, sin, eps, norm, dx_dtype)


@_norm_rope_bwd_op.register_fake
def _(dy, x, weight, cos, sin, eps, norm, dx_dtype):
    B, N, H, Dh = x.shape
    progs = _num_progs(B * N * H, Dh, x.device)
    return x.new_empty(x.shape, dtype=dx_dtype), x.new_empty((2, progs, Dh) if norm else (0,), dtype=torch.float32)


def _norm_rope_setup(ctx, inputs, output):
    x, weight, bias, cos, sin, eps, norm, _ = inputs
    ctx.save_for_backward(x if norm else None, weight, cos, sin)
    ctx.eps, ctx.norm, ctx.x_dtype = eps, norm, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _norm_rope_backward(ctx, dy):
    x, weight, cos, sin = ctx.saved_tensors
    if x is None:  # plain RoPE: the kernel never reads x, it only needs a (B, N, H, Dh) tensor for the shape
        x = dy.contiguous()
    dx, part = _norm_rope_bwd_op(dy, x, weight, cos, sin, ctx.eps, ctx.norm, ctx.x_dtype)
    dweight = dbias = None
    if ctx.norm:
        sums = part.sum(dim=1)  # (2, Dh) fp32
        dweight = sums[0].to(weight.dtype) if weight is not None else None
        dbias = sums[1].to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    return dx, dweight, dbias, None, None, None, None, None


_norm_rope_op.register_autograd(_norm_rope_backward, setup_context=_norm_rope_setup)


# ----------------------------------------------------------------------------------------------------------------
# 5. Public ops
# ----------------------------------------------------------------------------------------------------------------
def _check(x, weight, bias, cos, sin, norm):
    if norm not in NORMS:
        raise ValueError(f"qk norm must be one of {NORMS}, got {norm!r}")
    if norm is None and (weight is not None or bias is not None):
        raise ValueError("qk_norm_rope: weight/bias given with norm=None; pass norm='layer' or 'rms'")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"RoPE/qk-norm input must be (B, N, H, Dh) with an even Dh, got {tuple(x.shape)}")
    B, N, H, Dh = x.shape
    if (cos is None) != (sin is None):
        raise ValueError("RoPE needs both the cos and the sin table (or neither)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and tuple(t.shape) != (N, Dh):
            raise ValueError(
                f"RoPE {name} table must be (N, Dh) = {(N, Dh)} for x {tuple(x.shape)}, got "
                f"{tuple(t.shape)}; build it with rope_2d_cos_sin(head_dim, grid_h, grid_w)"
            )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (Dh,):
            raise ValueError(f"qk-norm {name} must have shape ({Dh},), got {tuple(t.shape)}")


def qk_norm_rope(
    x, weight=None, bias=None, cos=None, sin=None, eps: float = 1e-5, norm: str | None = "layer", impl: str = "auto"
):
    """rope(norm(x)) per head: x (B, N, H, Dh); weight/bias (Dh,); cos/sin (N, Dh) or None (norm only)."""
    _check(x, weight, bias, cos, sin, norm)
    if not use_triton("qk_norm_rope", impl, x) or x.numel() == 0:
        return qk_norm_rope_ref(x, weight, bias, cos, sin, eps, norm)
    code = NORMS.index(norm)
    y_dtype = x.dtype if code == 0 else out_dtype(x, weight, bias, norm_autocast=norm == "layer")
    return _norm_rope_op(x, weight, bias, cos, sin, float(eps), code, y_dtype)


def apply_rope_2d(x, cos, sin, impl: str = "auto"):
    """2-D RoPE of x (B, N, H, Dh) with tables (N, Dh) from rope_2d_cos_sin; returns x's dtype."""
    _check(x, None, None, cos, sin, None)
    if not use_triton("rope_2d", impl, x) or x.numel() == 0:
        return apply_rope_2d_ref(x, cos, sin)
    return _norm_rope_op(x, None, None, cos, sin, 0.0, 0, x.dtype)
