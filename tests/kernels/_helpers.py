"""Shared helpers of the kernel tests: float64 oracles and the gradient of every input."""

import torch

from tests.conftest import assert_close


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf copy of ``t`` (optionally cast) that requires grad if ``t`` does."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(t.requires_grad)


def upstream_grads(outs, seed: int = 1):
    """Fixed random upstream gradients in each output's dtype (the float64 reference gets the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]


def forward_backward(fn, inputs, grads=None):
    """(outputs, upstream grads, grads of every input that requires grad) of fn(*inputs)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = upstream_grads(outs) if grads is None else grads
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, grads, torch.autograd.grad(outs, wrt, grads)


def check_against_fp64(fn_kernel, fn_ref, inputs, kinds, grad_kinds):
    """Run the kernel on ``inputs`` and the reference on float64 copies; compare outputs and every input gradient.

    kinds / grad_kinds: the tolerance-table row ("elementwise" or "reduction") of each output / input gradient.
    """
    k_in = [leaf(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    r_in = [leaf(t, torch.float64) if isinstance(t, torch.Tensor) else t for t in inputs]
    k_out, grads, k_grads = forward_backward(fn_kernel, k_in)
    r_out, _, r_grads = forward_backward(fn_ref, r_in, [g.double() for g in grads])
    assert len(k_out) == len(kinds) and len(k_grads) == len(grad_kinds)
    for a, e, kind in zip(k_out, r_out, kinds):
        assert_close(a, e, kind)
    needing = [t for t in k_in if isinstance(t, torch.Tensor) and t.requires_grad]
    for inp, a, e, kind in zip(needing, k_grads, r_grads, grad_kinds):
        assert a.dtype == inp.dtype, (a.dtype, inp.dtype)
        assert_close(a, e, kind, dtype=inp.dtype)
    return k_out, k_grads
