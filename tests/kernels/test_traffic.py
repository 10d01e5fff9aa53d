"""The analytic byte counter, the issue's bounds on fused / unfused traffic, and the committed report."""

import os

import pytest
import torch

from bench import traffic
from bench.traffic import TrafficCounter, measure, unique_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_counter_charges_reads_and_writes_of_each_op():
    a = torch.randn(64, 128, device="meta")
    b = torch.randn(128, device="meta")
    with TrafficCounter() as c:
        y = a + b  # reads a and the broadcast b once, writes y
        z = y.t().reshape(-1)  # a view, then a real copy (the transpose is not contiguous)
        torch.zeros_like(z)  # writes only
    assert c.ops[0][1:] == ((64 * 128 + 128) * 4, 64 * 128 * 4)
    assert c.ops[1][1:] == (64 * 128 * 4, 64 * 128 * 4)
    assert c.ops[2][1:] == (0, 64 * 128 * 4)
    assert len(c.ops) == 3
    assert unique_bytes(b.expand(64, 128)) == 128 * 4


def test_counter_sees_backward_ops():
    x = torch.randn(8, 16, device="meta", requires_grad=True)
    t = measure(lambda x: (x * 2).sum(), [x])
    assert t.fwd == (8 * 16 * 4) * 2 + 8 * 16 * 4 + 4  # mul: read x, write; sum: read, write a scalar
    assert t.bwd > 8 * 16 * 4  # the expanded gradient times 2 is materialised


@pytest.fixture(scope="module")
def rows():
    return traffic.report_rows()


def test_fused_traffic_bounds(rows):
    """Issue 4: fused adaLN <= 0.35x and fused alignment loss <= 0.3x of the unfused sequence (fwd + bwd),
    from the same rows that make bench/results/analytic_bytes.md."""
    bounded = [r for r in rows if r["bound"] is not None]
    assert {r["op"] for r in bounded} == {"adaln_modulate", "gated_residual_adaln", "alignment_loss"}
    for r in bounded:
        assert r["ratio"] <= r["bound"], r
    for r in rows:  # every fused op moves less than its reference, and more than nothing
        assert 0.03 < r["ratio"] < 0.5, r


def test_committed_report_is_current():
    with open(os.path.join(ROOT, "bench", "results", "analytic_bytes.md")) as f:
        committed = f.read()
    assert committed == traffic.markdown_report(), "stale: regenerate with `python bench/analytic_bytes.py`"
