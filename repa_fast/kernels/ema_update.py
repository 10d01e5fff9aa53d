"""EMA of a list of fp32 tensors in one pass: ema_i <- ema_i + w (param_i - ema_i), w = 1 - decay, or ema_i unchanged
where the device flag ``skip`` is set (a step the optimizer skipped); no host synchronisation.

Replaces the per-parameter loop of the reference ``update_ema`` (sihyun-yu/REPA train.py:81-91,
``ema.mul_(decay).add_(param, alpha=1 - decay)``) and our previous three multi-tensor passes (``_foreach_sub``,
``_foreach_mul_`` by a 0-dim device weight, ``_foreach_add_``), which move 5 reads + 3 writes per element (the
``param - ema`` temporary is written and read back). The kernel moves 2 reads + 1 write per element, in one launch
for all tensors, and reads ``skip`` on the device: a skipped step masks every load and store (no traffic, and an
exact no-op even where param - ema is not finite).

Why a kernel: torch 2.14 has no foreach op that takes a device-side scalar weight in one pass. ``_foreach_lerp_``
takes a host Scalar (reading a device flag into it is a sync), a Scalar list (host values too), or a list of weight
TENSORS, which stays on the fused multi-tensor path only when every weight has its tensor's full shape
(``can_use_fast_route`` in aten/src/ATen/native/cuda/ForeachTernaryOp.cu: one more full read); 0-dim weights fall to
one ``lerp_`` launch per tensor. ``_foreach_addcmul_.Tensor`` needs its scalars on the CPU
(``convert_tensor_to_scalar_list``, ForeachUtils.h). ``torch.compile`` of the three passes could fuse them, at the
price of a graph over every parameter (297 tensors in SiT-XL/2), recompiled whenever the list changes (a phase).

Rounding: the kernel computes d = p - e, t = d * w, e + t, each rounded to fp32 (Triton's FMA contraction is off for
this launch, ``enable_fp_fusion=False``): bit for bit the three passes it replaces, and within 0.5 ulp + 2 u w |p - e|
(u = 2^-24) of the exact (1 - w) e + w p: with w = 1e-4 and p near e, 0.5 ulp plus ~1e-4 ulp. The reference's
fl(fl(d e) + fl(w p)) is within 1 ulp of its own exact d e + w p, where d = fl32(decay) is not 1 - w (decay 0.9999:
d + w = 1 - 1.7e-8); the two forms differ in ~30% of the elements, by at most 2 ulps (tests/kernels/test_ema_update.py).

Multi-tensor launch: program k handles one block of one tensor, described by row k of an int64 table
(ema element offset, param element offset, elements): offsets are counted from one base tensor of each list, so the
kernel takes two base pointers and reaches every tensor of the list by 64-bit pointer arithmetic (all tensors live in
one address space). Blocks whose addresses and counts are 16-byte multiples (all of SiT's) go in one launch with
vector loads; the others (ragged tails, odd views), if any, in a second. The tables are built once per list of
storages and cached.
"""

import torch

from ._dispatch import log_once, tl, triton, use_triton

# Tensors per multi-tensor launch of the reference when the skip flag is a device tensor: bounds the temporary.
_CHUNK = 64
BLOCK = 4096  # elements per program on a GPU: 8 warps x 32 threads x 16 floats (four 16-byte loads per thread)
BLOCK_INTERPRETED = 256  # the interpreter's cost is per element and per program: small tensors still span blocks
NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------------------------
# 1. Reference
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update_ref(
    ema: list[torch.Tensor], params: list[torch.Tensor], decay: float, skip: torch.Tensor | None = None
) -> None:
    """ema <- ema + w (param - ema) with w = 1 - decay, w = 0 where ``skip`` (a 0-dim device bool) is set.

    Three multi-tensor passes (sub, mul by a 0-dim weight, add): sync-free, bounded temporaries (``_CHUNK`` tensors
    at a time). The spec of the kernel, the CPU fallback and the benchmark baseline.
    """
    if not ema:
        return
    weight = 1.0 - decay
    if skip is not None:
        weight = torch.where(skip.to(ema[0].device), 0.0, weight).to(torch.float32)  # 0-dim, on device
    for i in range(0, len(ema), _CHUNK):
        e, p = ema[i : i + _CHUNK], params[i : i + _CHUNK]
        delta = torch._foreach_sub(p, e)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(e, delta)


# ----------------------------------------------------------------------------------------------------------------
# 2. Kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _ema_update_kernel(
    ema_ptr,
    param_ptr,
    skip_ptr,
    table_ptr,
    weight,
    BLOCK: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    e_off = tl.load(row)
    p_off = tl.load(row + 1)
    n = tl.load(row + 2)
    if ALIGNED:  # offsets and counts are multiples of 4 floats: 16-byte loads and stores (masks constant per 4)
        e_off = tl.multiple_of(e_off, 4)
        p_off = tl.multiple_of(p_off, 4)
        n = tl.multiple_of(n, 4)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_SKIP:
        mask = mask & (tl.load(skip_ptr) == 0)
    e = tl.load(ema_ptr + e_off + offs, mask=mask)
    p = tl.load(param_ptr + p_off + offs, mask=mask)
    e = e + (p - e) * weight
    tl.store(ema_ptr + e_off + offs, e, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# 3. Launcher and its block table
# ----------------------------------------------------------------------------------------------------------------
_TABLES: dict = {}  # storage layout -> launch plan; a handful of entries (one per EMA and phase)
_MAX_TABLES = 8


def _base(tensors: list[torch.Tensor]) -> int:
    """Index of the first 16-byte aligned tensor (the base the kernel's offsets count from), 0 if none is."""
    return next((i for i, t in enumerate(tensors) if t.data_ptr() % 16 == 0), 0)


def launch_plan(ema: list[torch.Tensor], params: list[torch.Tensor], block: int) -> tuple[int, int, list]:
    """(ema base index, param base index, [(int64 (blocks, 3) table on the device, aligned)]) for the pairs: one
    table of the blocks whose addresses and counts are multiples of 16 bytes (vector loads), one of the rest (a
    tensor's ragged tail, odd views). Cached by the tensors' addresses and sizes, so a list whose storages moved
    gets a new plan."""
    key = (block, ema[0].device, *(t.data_ptr() for t in ema), *(t.data_ptr() for t in params))
    key += tuple(t.numel() for t in ema)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    eb, pb = _base(ema), _base(params)
    e0, p0, size = ema[eb].data_ptr(), params[pb].data_ptr(), ema[0].element_size()
    bases_aligned = e0 % 16 == 0 and p0 % 16 == 0
    rows = {True: [], False: []}
    for e, p in zip(ema, params):
        e_off, p_off, n = (e.data_ptr() - e0) // size, (p.data_ptr() - p0) // size, e.numel()
        for s in range(0, n, block):
            row = (e_off + s, p_off + s, min(block, n - s))
            rows[bases_aligned and all(v % 4 == 0 for v in row)].append(row)
    tables = []
    for aligned, r in rows.items():
        if r:
            table = torch.tensor(r, dtype=torch.int64)
            if ema[0].is_cuda:  # pinned + non_blocking: no host wait behind queued work (the cache keeps it alive)
                table = table.pin_memory().to(ema[0].device, non_blocking=True)
            tables.append((table, aligned))
    if len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (eb, pb, tables)
    return _TABLES[key]


def ema_update_fwd(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float, skip: torch.Tensor | None):
    """In place, over every (ema, param) pair: one launch (two when some blocks are not 16-byte aligned).
    Pairs: fp32, contiguous, same size and device (``kernel_eligible``)."""
    pairs = [(e, p) for e, p in zip(ema, params) if e.numel()]
    if not pairs:
        return
    ema, params = [e for e, _ in pairs], [p for _, p in pairs]
    block = BLOCK_INTERPRETED if ema[0].device.type == "cpu" else BLOCK
    eb, pb, tables = launch_plan(ema, params, block)
    flag = skip.to(ema[0].device).reshape(1).view(torch.uint8) if skip is not None else None
    for table, aligned in tables:
        _ema_update_kernel[(table.shape[0],)](
            ema[eb],
            params[pb],
            flag if flag is not None else table,  # a dummy pointer: never read without HAS_SKIP
            table,
            weight,
            BLOCK=block,
            HAS_SKIP=flag is not None,
            ALIGNED=aligned,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # d = p - e; e + d * w rounded op by op, as the reference passes (docstring)
        )


# ----------------------------------------------------------------------------------------------------------------
# 4. torch.library registration: one op that reads ema and params and writes ema
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repa_fast::ema_update_", mutates_args=("ema",))
def _ema_update_op(
    ema: list[torch.Tensor], params: list[torch.Tensor], weight: float, skip: torch.Tensor | None
) -> None:
    ema_update_fwd(ema, params, weight, skip)


@_ema_update_op.register_fake
def _(ema, params, weight, skip):
    return None


# ----------------------------------------------------------------------------------------------------------------
# 5. Public op
# ----------------------------------------------------------------------------------------------------------------
def kernel_eligible(ema: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    """fp32 contiguous pairs of equal size, all on the first tensor's device (what the kernel's table describes)."""
    if len(ema) != len(params):
        raise ValueError(f"EMA update: {len(ema)} EMA tensors but {len(params)} parameters")
    device = ema[0].device
    return all(
        e.dtype == p.dtype == torch.float32
        and e.numel() == p.numel()
        and e.device == p.device == device
        and e.is_contiguous()
        and p.is_contiguous()
        for e, p in zip(ema, params)
    )


@torch.no_grad()
def ema_update_(
    ema: list[torch.Tensor],
    params: list[torch.Tensor],
    decay: float,
    skip: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """In place: ema <- ema + (1 - decay) (param - ema), unchanged where ``skip`` (a device bool) is set; no host
    sync. Triton on CUDA (one pass), ``ema_update_ref`` elsewhere or for tensors the kernel does not take."""
    if not ema:
        return
    if not use_triton("ema_update", impl, ema[0]):
        return ema_update_ref(ema, params, decay, skip)
    if not kernel_eligible(ema, params):
        log_once("ema_update:layout", "ema_update: non-fp32 or non-contiguous tensors, using the reference")
        return ema_update_ref(ema, params, decay, skip)
    _ema_update_op(list(ema), list(params), 1.0 - decay, skip)
