"""bias + GELU(tanh) after fc1: ref vs compile(ref) vs triton at SiT's MLP widths (4D), two cases:

- ``bias_gelu``: the kernel alone on fc1's output u, against eager ``gelu(u + b)`` (two passes);
- ``linear_gelu``: fc1 included, against the reference's ``gelu(fc1(x))`` with the bias in the GEMM (cuBLASLt's
  epilogue): the model-level comparison; the fused op saves the bias-gradient pass of the backward only.

``python bench/bench_bias_gelu.py [--models SiT-XL/2 --batches 32 --dtypes bf16]``: analytic bytes everywhere (the
cases are registered into bench/traffic.py's CASES for this process only), timings and GB/s on a CUDA GPU.
"""

import torch
import torch.nn.functional as F
from _common import Case, main
from traffic import CASES, SIT_SHAPES, TOKENS

from repa_fast.kernels.bias_gelu import _bias_gelu_op, bias_gelu, bias_gelu_ref, linear_gelu, linear_gelu_ref


def _meta(shape, dtype, grad=True):
    return torch.randn(shape, dtype=dtype, device="meta").requires_grad_(grad)


def _bias_gelu_traffic(batch, hidden, heads, dtype):
    inputs = [_meta((batch * TOKENS, 4 * hidden), dtype), _meta((4 * hidden,), dtype)]
    return bias_gelu_ref, _bias_gelu_op, inputs


def _linear_gelu_traffic(batch, hidden, heads, dtype):
    inputs = [_meta((batch * TOKENS, hidden), dtype), _meta((4 * hidden, hidden), dtype), _meta((4 * hidden,), dtype)]
    return linear_gelu_ref, lambda x, w, b: _bias_gelu_op(F.linear(x, w), b), inputs


CASES.setdefault("bias_gelu", _bias_gelu_traffic)
CASES.setdefault("linear_gelu", _linear_gelu_traffic)


def _make_u(model, batch, dtype, device):
    D = SIT_SHAPES[model][0]
    u = torch.randn(batch * TOKENS, 4 * D, dtype=dtype, device=device, requires_grad=True)
    return [u, (0.5 * torch.randn(4 * D, dtype=dtype, device=device)).requires_grad_()]


def _make_x(model, batch, dtype, device):
    D = SIT_SHAPES[model][0]
    x = torch.randn(batch * TOKENS, D, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(4 * D, D, dtype=dtype, device=device) / D**0.5).requires_grad_()
    return [x, w, (0.5 * torch.randn(4 * D, dtype=dtype, device=device)).requires_grad_()]


BIAS_GELU = Case("bias_gelu", "bias_gelu", _make_u, bias_gelu_ref, lambda u, b: bias_gelu(u, b, impl="triton"))
LINEAR_GELU = Case(
    "linear_gelu", "linear_gelu", _make_x, linear_gelu_ref, lambda x, w, b: linear_gelu(x, w, b, impl="triton")
)

if __name__ == "__main__":
    main(BIAS_GELU, LINEAR_GELU)
