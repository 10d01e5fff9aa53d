"""Shared test setup: Triton's interpreter on CPU, seeding, and the one tolerance table.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before any
``repa_fast.kernels`` module is imported; pytest imports this file first.
"""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never stall on hub retries (no network in CI)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One tolerance table for the whole suite (STYLE.md "Tests").
# fp32: elementwise ops and reductions against a float64 reference.
# bf16: one bf16 ulp (2^-8 relative, rounding of the stored output) plus a small absolute floor.
# float64: ops that compute in their input precision (the losses; docs/objective.md §Losses) against float64 code.
TOLERANCES = {
    ("float64", "elementwise"): dict(atol=1e-12, rtol=1e-12),
    ("float64", "reduction"): dict(atol=1e-12, rtol=1e-12),
    ("float32", "elementwise"): dict(atol=1e-5, rtol=1e-5),
    ("float32", "reduction"): dict(atol=1e-4, rtol=1e-4),
    ("bfloat16", "elementwise"): dict(atol=1e-2, rtol=2**-7),
    ("bfloat16", "reduction"): dict(atol=2e-2, rtol=2**-7),
    ("float16", "elementwise"): dict(atol=1e-3, rtol=2**-10),
    ("float16", "reduction"): dict(atol=2e-3, rtol=2**-10),
}


def tol(dtype: torch.dtype, kind: str = "elementwise") -> dict:
    return TOLERANCES[(str(dtype).removeprefix("torch."), kind)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "elementwise", dtype=None):
    """Compare ``actual`` with a (usually float64) ``expected`` at the table's tolerance for ``dtype``."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, poisoned output?)"
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype, kind))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so that any element a kernel forgets to write fails the test."""
    return t.fill_(float("nan"))


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption(
        "--full-matrix",
        action="store_true",
        help="run every method x backend cell of tests/engine/test_method_matrix.py (without it: the CI subset)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "full_matrix: a method x backend cell run only with --full-matrix")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--full-matrix"):
        skip_cell = pytest.mark.skip(reason="a cell of the full method x backend matrix: pass --full-matrix")
        for item in items:
            if item.get_closest_marker("full_matrix") is not None:
                item.add_marker(skip_cell)
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: it holds folder names too
            item.add_marker(skip_gpu)


# Low precision (STYLE.md "Tests"): a kernel's error against the float64 reference may be at most LOWP_ERROR_RATIO
# times that of plain PyTorch computing in the same dtype, plus the table's atol for that dtype.
LOWP_ERROR_RATIO = 2.0


def assert_lowp_error(actual: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, kind: str = "elementwise"):
    """``actual`` (a kernel's low-precision output) vs ``exact`` (float64): max error <= 2 x that of ``plain`` (the
    same computation in plain PyTorch at actual's dtype) + atol."""
    assert actual.shape == plain.shape == exact.shape, (actual.shape, plain.shape, exact.shape)
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, poisoned output?)"
    err = (actual.double() - exact.double()).abs().max().item()
    base = (plain.double() - exact.double()).abs().max().item()
    atol = tol(actual.dtype, kind)["atol"]
    assert err <= LOWP_ERROR_RATIO * base + atol, f"error {err:.3g} > {LOWP_ERROR_RATIO} x plain {base:.3g} + {atol}"
