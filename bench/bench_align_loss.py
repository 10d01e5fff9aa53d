"""REPA alignment loss (per-row cosine, F.normalize semantics): ref vs compile(ref) vs triton.

Projector outputs and DINOv2-B targets of shape (batch, 256, 768). ``python bench/bench_align_loss.py``:
analytic bytes everywhere, timings and GB/s on a CUDA GPU (bench/_common.py).
"""

import torch
from _common import Case, main
from traffic import TOKENS, Z_DIM

from repa_fast.kernels.align_loss import alignment_loss, alignment_loss_ref


def make(model, batch, dtype, device):
    p = torch.randn(batch, TOKENS, Z_DIM, dtype=dtype, device=device, requires_grad=True)
    return [p, torch.randn(batch, TOKENS, Z_DIM, dtype=dtype, device=device)]


ALIGN = Case(
    "alignment_loss",
    "alignment_loss",
    make,
    lambda p, z: alignment_loss_ref([p], [z]),
    lambda p, z: alignment_loss([p], [z], impl="triton"),
)

if __name__ == "__main__":
    main(ALIGN)
