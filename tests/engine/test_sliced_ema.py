"""The EMA of DDP and ZeRO-1/2 sliced over the ranks (issue 18, cut 2f; engine/parallel/slices.py): each rank updates
1/world of every parameter, the gathered EMA equals a full replica bit for bit, and a resume from it stays bitwise.

The layout is checked in one process; the collectives (gather at save and preview, slicing on load) on 2 gloo ranks
under torchrun (tests/engine/sharded_ema_entry.py). The training-loop resume (a killed DDP run resumed bit for bit,
checkpoint EMA included) is tests/engine/test_parallel_multiproc.py's.
"""

import json
import os

import pytest
import torch

from repa_fast.engine.parallel import slices

from . import parallel_helpers as H


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("numel", [1, 3, 37, 1152, 4 * 1152 + 2])
def test_slices_cover_every_element_once_on_16_byte_boundaries(numel, world):
    bounds = [slices.slice_bounds(numel, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap, no gap
    k = slices.slice_size(numel, world)
    assert k % slices.ALIGN == 0 and all(stop - start <= k for start, stop in bounds)
    assert all(start % slices.ALIGN == 0 for start, stop in bounds if stop > start)  # empty ones sit at the end


def test_one_process_keeps_the_full_ema():
    from repa_fast.engine.ema import EMA

    model = torch.nn.Linear(4, 3)
    assert isinstance(slices.replicated_ema(model, 0, 1), EMA)


@pytest.mark.multiproc
def test_sliced_ema_of_two_ranks_equals_the_full_replica_and_resumes_bitwise(tmp_path):
    out = tmp_path / "report.json"
    r = H.torchrun([str(out)], script=os.path.join(H.REPO, "tests", "engine", "sharded_ema_entry.py"))
    H.check_ok(r)
    reports = json.loads(out.read_text())
    assert len(reports) == 2 and all(rep["sliced"] for rep in reports)
    total = reports[0]["total"]
    assert sum(rep["local"] for rep in reports) == total  # 1/world each, every element once
    assert all(rep["local"] <= total / 2 + 4 * rep["tensors"] for rep in reports)  # half, up to 4-float rounding
    for rep in reports:
        assert rep["saved_equal"] and rep["resumed_equal"] and rep["moved"], rep
    assert reports[0]["module_equal"] and reports[1]["module_none"]
