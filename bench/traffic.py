"""Analytic memory traffic of an op, forward and backward, counted op by op on "meta" tensors.

``TrafficCounter`` is a TorchDispatchMode: every ATen op (and every ``repa_fast::`` custom op, which is one
kernel launch) is charged the bytes of each tensor it reads and each tensor it writes. That is the DRAM traffic
of an eager sequence in which no intermediate stays in cache between ops: every intermediate is written by one
op and read back by the next (the ``unfused PyTorch sequence``), the autograd backward included. Views,
allocations and metadata ops cost nothing; a broadcast (stride-0) operand costs its distinct elements only.

For a fused kernel, "inputs read once, outputs written once" is exactly what the custom op's signature says,
because each kernel loads every row of each input once (see the kernels' docstrings); the fp32 partial sums
of the backward reductions are separate outputs and their final ``sum`` is an ATen op, so they are counted too.
Shapes run on the meta device: SiT-XL/2 at batch 256 costs no memory or time.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from repa_fast.cost.hardware import GPUS
from repa_fast.kernels.adaln import _adaln_modulate_op, _gated_adaln_op, adaln_modulate_ref, gated_residual_adaln_ref
from repa_fast.kernels.align_loss import _cos_rows_op, alignment_loss_ref
from repa_fast.kernels.rope import _norm_rope_op, apply_rope_2d_ref, qk_norm_rope_ref

aten = torch.ops.aten

_FREE_NAMES = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "_unsafe_view",
    "alias",
    "detach",
    "_to_copy_meta",
}
_WRITE_ONLY_NAMES = {
    "zeros",
    "ones",
    "full",
    "zeros_like",
    "ones_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "fill_",
    "zero_",
    "scalar_tensor",
}


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (dimensions with stride 0 are broadcasts, read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


_METADATA_NAMESPACES = ("prim", "profiler")  # device queries and profiler markers: no kernel
# Fused Adam(W) declares its gradients mutable but stores them back only when it unscales them (grad_scale given):
# pytorch aten/src/ATen/native/cuda/fused_adam_utils.cuh ``if (i != kGradIdx || grad_scale_ptr)``.
_GRADS_WRITTEN_ONLY_WHEN_SCALED = {"_fused_adamw_", "_fused_adam_"}


def _written(func, args, kwargs, out) -> int:
    """Bytes an op writes: its arguments the schema marks as mutated (``Tensor(a!)``) and its fresh outputs (a
    returned alias of a mutated argument is not counted twice)."""
    schema = func._schema
    written = 0
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.name == "grads" and schema.name.split("::")[-1] in _GRADS_WRITTEN_ONLY_WHEN_SCALED:
            if kwargs.get("grad_scale") is None:
                continue
        written += sum(unique_bytes(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    outs = [out] if len(schema.returns) == 1 else list(out) if isinstance(out, (tuple, list)) else [out]
    for ret, value in zip(schema.returns, outs):
        if ret.alias_info is None:
            written += sum(unique_bytes(t) for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    return written


class TrafficCounter(TorchDispatchMode):
    """Counts bytes read and written by every dispatched op; ``ops`` keeps (op name, read, written).

    With ``record=True``, ``records`` also keeps, per op, what a classification needs without holding the tensors
    (holding them would change what autograd does, e.g. make AccumulateGrad copy instead of steal a gradient):
    the ids and bytes of the inputs, the shapes, dtypes and devices of inputs and outputs, and which inputs are 3-D
    and not contiguous."""

    def __init__(self, record: bool = False):
        super().__init__()
        self.read = self.written = 0
        self.ops: list = []
        self.record, self.records = record, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace, name = func._schema.name.split("::")
        if func.is_view or name in _FREE_NAMES or namespace in _METADATA_NAMESPACES:
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not tensors and not outs:
            return out  # e.g. promote_types: dispatched, but no kernel
        inputs = [] if name in _WRITE_ONLY_NAMES else tensors[1:] if name == "copy_" else tensors  # copy_ reads src
        inputs = list({id(t): t for t in inputs}.values())  # a tensor passed twice is read once
        read = sum(unique_bytes(t) for t in inputs)
        written = _written(func, args, kwargs, out)
        self.read += read
        self.written += written
        self.ops.append((str(func), read, written))
        if self.record:
            self.records.append(_record(namespace, name, read, written, tensors, outs))
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def _record(namespace, name, read, written, tensors, outs) -> dict:
    return dict(
        namespace=namespace,
        name=name,
        read=read,
        written=written,
        in_ids=[id(t) for t in tensors],
        in_bytes=[unique_bytes(t) for t in tensors],
        in_devices={t.device.type for t in tensors},
        strided_3d=[unique_bytes(t) for t in tensors if t.dim() == 3 and not t.is_contiguous()],
        out_shapes=[tuple(t.shape) for t in outs],
        out_dtypes=[t.dtype for t in outs],
    )


@dataclass
class Traffic:
    fwd: int
    bwd: int
    fwd_ops: list
    bwd_ops: list

    @property
    def full(self) -> int:
        return self.fwd + self.bwd


def measure(fn: Callable, inputs: list) -> Traffic:
    """Traffic of ``fn(*inputs)`` (forward) and of backpropagating a gradient into each of its outputs."""
    with TrafficCounter() as fwd:
        outs = fn(*inputs)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o.requires_grad]
    grads = [torch.empty_like(o) for o in outs]
    with TrafficCounter() as bwd:
        torch.autograd.backward(outs, grads)
    return Traffic(fwd.total, bwd.total, fwd.ops, bwd.ops)


# ----------------------------------------------------------------------------------------------------------------
# The ops of repa_fast.kernels: (reference, fused) callables and meta inputs at SiT shapes.
# ----------------------------------------------------------------------------------------------------------------
SIT_SHAPES = {  # name: (hidden, heads); 256 px, patch 2 -> 256 tokens
    "SiT-B/2": (768, 12),
    "SiT-L/2": (1024, 16),
    "SiT-XL/2": (1152, 16),
}
TOKENS = 256
Z_DIM = 768  # DINOv2-B target width
PROJECTOR_DIM = 2048


def _meta(shape, dtype, grad=True):
    return torch.randn(shape, dtype=dtype, device="meta").requires_grad_(grad)


def _adaln_case(batch, hidden, heads, dtype):
    inputs = [_meta((batch, TOKENS, hidden), dtype), _meta((batch, hidden), dtype), _meta((batch, hidden), dtype)]
    return adaln_modulate_ref, lambda x, sh, sc: _adaln_modulate_op(x, sh, sc, None, 1e-6, False, dtype), inputs


def _gated_case(batch, hidden, heads, dtype):
    inputs = [_meta((batch, TOKENS, hidden), dtype), _meta((batch, TOKENS, hidden), dtype)]
    inputs += [_meta((batch, hidden), dtype) for _ in range(3)]
    fused = lambda x, br, g, sh, sc: _gated_adaln_op(x, br, g, sh, sc, None, 1e-6, False, dtype, dtype)
    return gated_residual_adaln_ref, fused, inputs


def _align_case(batch, hidden, heads, dtype):
    inputs = [_meta((batch, TOKENS, Z_DIM), dtype), _meta((batch, TOKENS, Z_DIM), dtype, grad=False)]
    ref = lambda p, z: alignment_loss_ref([p], [z])
    fused = lambda p, z: -_cos_rows_op(p.reshape(-1, Z_DIM), z.reshape(-1, Z_DIM), 1e-12).mean()
    return ref, fused, inputs


def _rope_case(batch, hidden, heads, dtype):
    dh = hidden // heads
    inputs = [_meta((batch, TOKENS, heads, dh), dtype)]
    inputs += [_meta((TOKENS, dh), torch.float32, grad=False) for _ in range(2)]
    return apply_rope_2d_ref, lambda x, c, s: _norm_rope_op(x, None, None, c, s, 0.0, 0, dtype), inputs


def _qk_norm_rope_case(batch, hidden, heads, dtype):
    dh = hidden // heads
    inputs = [_meta((batch, TOKENS, heads, dh), dtype), _meta((dh,), dtype), _meta((dh,), dtype)]
    inputs += [_meta((TOKENS, dh), torch.float32, grad=False) for _ in range(2)]
    fused = lambda x, w, b, c, s: _norm_rope_op(x, w, b, c, s, 1e-5, 1, dtype)
    return qk_norm_rope_ref, fused, inputs


CASES = {
    "adaln_modulate": _adaln_case,
    "gated_residual_adaln": _gated_case,
    "alignment_loss": _align_case,
    "rope_2d": _rope_case,
    "qk_norm_rope": _qk_norm_rope_case,
}
# The acceptance bounds on fused / unfused bytes (forward + backward).
MAX_RATIO = {"adaln_modulate": 0.35, "gated_residual_adaln": 0.35, "alignment_loss": 0.3}


def op_traffic(op: str, model: str, batch: int, dtype: torch.dtype) -> dict:
    """{"ref": Traffic, "fused": Traffic} of ``op`` at ``model``'s width and ``batch`` images of 256 tokens."""
    hidden, heads = SIT_SHAPES[model]
    out = {}
    for provider in ("ref", "fused"):
        ref, fused, inputs = CASES[op](batch, hidden, heads, dtype)
        out[provider] = measure(ref if provider == "ref" else fused, inputs)
    return out


def projector_fusion_saving(batch: int, dtype: torch.dtype) -> dict:
    """Bytes a fused (last projector Linear + cosine loss) kernel would avoid: the projector output p is never
    written and read back, nor is its gradient dp. Counted from the unfused sequence's own op list."""
    h = _meta((batch * TOKENS, PROJECTOR_DIM), dtype)
    w, b = _meta((Z_DIM, PROJECTOR_DIM), dtype), _meta((Z_DIM,), dtype)
    z = _meta((batch * TOKENS, Z_DIM), dtype, grad=False)
    fn = lambda h, w, b, z: -_cos_rows_op(torch.nn.functional.linear(h, w, b), z, 1e-12).mean()
    traffic = measure(fn, [h, w, b, z])
    p_bytes = batch * TOKENS * Z_DIM * torch.empty(0, dtype=dtype).element_size()
    # p: written by the GEMM, read by the loss forward and backward; dp: written by the loss backward, read by
    # the two backward GEMMs (dh = dp W, dW = dp^T h) and the bias-gradient reduction.
    saved = 3 * p_bytes + 4 * p_bytes
    return {"unfused_bytes": traffic.full, "saved_bytes": saved, "p_bytes": p_bytes}


# ----------------------------------------------------------------------------------------------------------------
# The report (bench/results/analytic_bytes.md is this function's output; tests check the bounds and that the
# committed file is current).
# ----------------------------------------------------------------------------------------------------------------
REPORT_SHAPES = [("SiT-XL/2", 256), ("SiT-B/2", 32)]
REPORT_DTYPES = [torch.bfloat16, torch.float32]
H100_HBM_BYTES_PER_S = GPUS["h100"].hbm_tb_s * 1e12  # NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3 (repa_fast.cost)
TARGET_IMG_PER_S = 600  # the project's SiT-XL/2 + REPA speed target per H100 (README §Performance)


def report_rows() -> list:
    """One dict per (op, model, batch, dtype): unfused and fused bytes (fwd, bwd) and the full-step ratio."""
    rows = []
    for op in CASES:
        for model, batch in REPORT_SHAPES:
            for dtype in REPORT_DTYPES:
                t = op_traffic(op, model, batch, dtype)
                rows.append(
                    dict(
                        op=op,
                        model=model,
                        batch=batch,
                        dtype=str(dtype).removeprefix("torch."),
                        ref_fwd=t["ref"].fwd,
                        ref_bwd=t["ref"].bwd,
                        fused_fwd=t["fused"].fwd,
                        fused_bwd=t["fused"].bwd,
                        ratio=t["fused"].full / t["ref"].full,
                        bound=MAX_RATIO.get(op),
                    )
                )
    return rows


def markdown_report() -> str:
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    lines = [
        "# Analytic memory traffic: fused Triton kernels vs the unfused PyTorch sequence",
        "",
        "Generated by `python bench/analytic_bytes.py` from `bench/traffic.py`; do not edit by hand",
        "(tests/kernels/test_traffic.py checks the bounds and that this file is current). GB = 1e9 bytes.",
        "",
        "Method: every op runs on `meta` tensors under a TorchDispatchMode that charges each dispatched op the",
        "bytes of the tensors it reads and writes, forward and autograd backward (a gradient of the output's",
        "shape is fed in). For the unfused PyTorch reference that is every intermediate written and read back;",
        "a fused op is one `repa_fast::` custom op whose kernel reads each input row once and writes each output",
        "once, plus the fp32 partial sums of its backward reductions and their final `sum`. 256 tokens per image.",
        "Bounds (issue 4): fused adaLN <= 0.35x and fused alignment loss <= 0.3x of the unfused sequence.",
        "",
        "| op | model | batch | dtype | unfused fwd GB | unfused bwd GB | fused fwd GB | fused bwd GB "
        "| fused / unfused (fwd+bwd) | bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report_rows():
        lines.append(
            f"| {r['op']} | {r['model']} | {r['batch']} | {r['dtype']} | {gb(r['ref_fwd'])} "
            f"| {gb(r['ref_bwd'])} | {gb(r['fused_fwd'])} | {gb(r['fused_bwd'])} | {r['ratio']:.3f} "
            f"| {r['bound'] if r['bound'] else '-'} |"
        )
    lines += ["", *_projector_section()]
    return "\n".join(lines) + "\n"


def _projector_section() -> list:
    batch = 256
    s = projector_fusion_saving(batch, torch.bfloat16)
    per_img = s["saved_bytes"] / batch
    us_per_img = per_img / H100_HBM_BYTES_PER_S * 1e6
    budget_us = 1e6 / TARGET_IMG_PER_S
    return [
        "## Fusing the projector's last Linear into the loss: not done",
        "",
        f"At SiT-XL/2, batch {batch}, bf16, z_dim {Z_DIM}: the unfused tail (Linear({PROJECTOR_DIM}, {Z_DIM}) +",
        f"fused cosine loss, fwd+bwd) moves {gb_str(s['unfused_bytes'])} GB. A kernel that never stores the",
        "projector output p would avoid writing p and reading it twice, and writing dp and reading it three times:",
        f"{gb_str(s['saved_bytes'])} GB per step, {per_img / 1e6:.2f} MB per image, i.e. {us_per_img:.2f} us per image",
        f"at the H100's {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s, against a budget of {budget_us:.0f} us per image at",
        f"the {TARGET_IMG_PER_S} img/s target ({100 * us_per_img / budget_us:.3f}% of the step). It would also",
        "have to recompute p = h W^T in the backward (an extra GEMM) or keep a (B*T, 2048) gradient, larger than p,",
        "and replace a cuBLAS GEMM. The saving does not pay for that, so the loss kernel starts from p.",
    ]


def gb_str(b: int) -> str:
    return f"{b / 1e9:.3f}"
