"""What one SiT block makes the memory system do under bf16 autocast (issue 18, cut 2d), counted op by op on CPU by
a TorchDispatchMode: every dispatched op that reads or writes an activation (a (B, T, ...) or (B*T, ...) tensor) is
at least one pass over memory on a GPU. GEMMs and attention are the compute; everything else is elementwise traffic.

The design this pins down (impl="triton"): no dtype casts of activations at all (the fused ops write bf16 where a
GEMM reads it, the residual stream fp32), no eager elementwise op in the forward (LN + modulate, gated residual +
LN + modulate, bias + GELU, gated residual: one custom op each), and in the backward only the q/k/v stack of the
attention and autograd's sum of the two gradients of the block input.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from repa_fast.models.sit import SiTBlock

B, T, D, HEADS = 2, 16, 64, 2  # B*T = 32 rows; no weight shape (D, 3D, 4D, 6D by D) starts with 2 or 32
BTD = B * T * D
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm"}
FREE = {"aten::_unsafe_view", "aten::detach", "aten::empty_like", "aten::empty", "aten::new_empty"}


def _is_activation(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and (tuple(t.shape[:2]) == (B, T) or t.shape[0] == B * T)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Passes(TorchDispatchMode):
    """ops: (name, [(dtype, shape) of activation outputs], activation bytes written, activation bytes read)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if func.is_view or name in FREE:
            return out
        outs = [t for t in tree_leaves(out) if _is_activation(t)]
        ins = list({id(t): t for t in tree_leaves((args, kwargs)) if _is_activation(t)}.values())
        if outs or ins:
            written = sum(_nbytes(t) for t in outs)
            self.ops.append((name, [(t.dtype, tuple(t.shape)) for t in outs], written, sum(_nbytes(t) for t in ins)))
        return out

    def elementwise(self):
        """The ops that are neither GEMMs nor attention."""
        return [op for op in self.ops if op[0] not in GEMMS and "scaled_dot_product" not in op[0]]


def _count(impl: str):
    torch.manual_seed(0)
    block = SiTBlock(D, HEADS, impl=impl)
    x = torch.randn(B, T, D, requires_grad=True)
    c = torch.randn(B, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _Passes() as fwd:
            out = block(x, c)
    grad = torch.randn_like(out)
    with _Passes() as bwd:
        out.backward(grad)
    assert out.dtype == torch.float32 and x.grad is not None
    return fwd, bwd


def test_no_activation_casts_and_fused_forward():
    fwd, bwd = _count("triton")
    casts = [op for op in fwd.ops + bwd.ops if op[0] == "aten::_to_copy"]
    assert casts == [], casts
    assert [op[0] for op in fwd.elementwise()] == [
        "repa_fast::adaln_modulate",
        "repa_fast::gated_residual_adaln",
        "repa_fast::bias_gelu",
        "repa_fast::gated_residual",
    ]
    dtypes = [d for op in fwd.elementwise() for d, _ in op[1]]
    assert dtypes == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    backward_aten = {op[0] for op in bwd.elementwise() if op[0].startswith("aten::") and op[1]}  # writing activations
    assert backward_aten == {"aten::add", "aten::stack"}, backward_aten


def test_elementwise_bytes_per_block():
    """Bytes the non-GEMM, non-attention ops write to / read from activations, per B*T*D element (fc1's 4D-wide
    tensors count 4). Forward: writes y 2 | x_new 4 + y2 2 | GELU 8 | x_out 4 = 20, reads x 4 | x 4 + attn 2 | u 8 |
    x_new 4 + fc2 2 = 24. Backward: writes dbranch 2 | du 8 | dx 4 + dbranch 2 | qkv stack 6 | dx 4 | sum of the two
    dx 4 = 30, reads 64 (the kernels' inputs plus the bias-gradient sums of fc2, proj and qkv). Before the cut:
    forward 30 / 34 (fp32 y's and their casts, gate * branch then the add), backward 42 / 86 (casts back to fp32,
    the two products of the gated residual and its dgate sum, gelu_backward then fc1's bias sum): 54 B less per
    element, 13 dispatched passes instead of 22 (forward 4 instead of 7)."""
    fwd, bwd = _count("triton")
    written = lambda ops: sum(op[2] for op in ops) / BTD  # noqa: E731
    read = lambda ops: sum(op[3] for op in ops) / BTD  # noqa: E731
    assert (written(fwd.elementwise()), read(fwd.elementwise())) == (20, 24)
    assert (written(bwd.elementwise()), read(bwd.elementwise())) == (30, 64)
    assert (len(fwd.elementwise()), len(bwd.elementwise())) == (4, 9)


@pytest.mark.parametrize("impl", ["ref"])
def test_reference_path_keeps_the_reference_structure(impl):
    """impl="ref" stays the reference's op sequence (the baseline of bench/ and the step model): eager GELU, the
    gate * branch product and the add; only the casts moved from the GEMMs into the modulation (same count)."""
    fwd, _ = _count(impl)
    names = [op[0] for op in fwd.elementwise()]
    assert "aten::gelu" in names and "aten::mul" in names and not any(n.startswith("repa_fast::") for n in names)
    assert names.count("aten::_to_copy") == 2  # the two modulated LN outputs, cast once each for their GEMMs
