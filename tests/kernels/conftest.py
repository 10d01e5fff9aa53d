"""Kernel-test fixtures: every buffer a launcher allocates starts as NaN (unwritten elements fail)."""

import pytest

from repa_fast.kernels import _dispatch


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(_dispatch, "POISON_OUTPUTS", True)
    yield
