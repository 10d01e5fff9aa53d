"""adaLN modulation, the fused gated residual + modulation, and the block's last gated residual: ref vs
compile(ref) vs triton at SiT shapes.

``python bench/bench_adaln.py [--models SiT-XL/2 --batches 256 --dtypes bf16]``: analytic bytes everywhere,
timings and GB/s on a CUDA GPU (bench/_common.py). The gated_residual case is registered into bench/traffic.py's
CASES for this process only (the committed analytic report covers the first two).
"""

import torch
from _common import Case, main
from traffic import CASES, SIT_SHAPES, TOKENS

from repa_fast.kernels.adaln import (
    _gated_residual_op,
    adaln_modulate,
    adaln_modulate_ref,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_ref,
    gated_residual_ref,
)


def _residual_traffic(batch, hidden, heads, dtype):
    meta = lambda *s: torch.randn(s, dtype=dtype, device="meta").requires_grad_()  # noqa: E731
    inputs = [meta(batch, TOKENS, hidden), meta(batch, TOKENS, hidden), meta(batch, hidden)]
    return gated_residual_ref, lambda x, br, g: _gated_residual_op(x, br, g, dtype), inputs


CASES.setdefault("gated_residual", _residual_traffic)


def _make(n_big: int, n_mod: int):
    def make(model, batch, dtype, device):
        D = SIT_SHAPES[model][0]
        big = [torch.randn(batch, TOKENS, D, dtype=dtype, device=device, requires_grad=True) for _ in range(n_big)]
        mod = [0.5 * torch.randn(batch, D, dtype=dtype, device=device) for _ in range(n_mod)]
        return big + [m.requires_grad_() for m in mod]

    return make


ADALN = Case(
    "adaln_modulate",
    "adaln_modulate",
    _make(1, 2),
    adaln_modulate_ref,
    lambda x, sh, sc: adaln_modulate(x, sh, sc, impl="triton"),
)
GATED = Case(
    "gated_residual_adaln",
    "gated_residual_adaln",
    _make(2, 3),
    gated_residual_adaln_ref,
    lambda x, br, g, sh, sc: gated_residual_adaln(x, br, g, sh, sc, impl="triton"),
)

RESIDUAL = Case(
    "gated_residual",
    "gated_residual",
    _make(2, 1),
    gated_residual_ref,
    lambda x, br, g: gated_residual(x, br, g, impl="triton"),
)

if __name__ == "__main__":
    main(ADALN, GATED, RESIDUAL)
