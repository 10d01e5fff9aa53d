"""The training step dispatches no device-to-host synchronisation (checked on CPU by counting the sync ops)."""

import pytest
import torch

from repa_fast.engine.profiling import count_ops, host_syncs, saved_bytes

from .helpers import StepRig, tiny_cfg


def test_counter_sees_item_and_branching_on_tensors():
    x = torch.randn(4)
    counts = count_ops(lambda: (x.sum().item(), bool(x[0] > 0), float(x.max())))
    assert host_syncs(counts) == 3
    step = torch.tensor(1.0)
    assert host_syncs(count_ops(lambda: step.item(), host_tensors=[step])) == 0  # host-resident: not a sync


@pytest.mark.parametrize("precision", ["bf16", "no", "fp16"])
def test_training_step_has_no_host_sync(tmp_path, precision):
    rig = StepRig(tiny_cfg(tmp_path, "--mixed-precision", precision))
    rig.step()  # first step: lazy optimizer state
    counts = count_ops(rig.step)
    assert host_syncs(counts) == 0, {k: v for k, v in counts.items() if "scalar" in k or "nonzero" in k}
    assert sum(counts.values()) > 100  # the counter really saw the step
    assert rig.meter.read(rig.backend)["loss"] > 0  # reading the meter is the (one, per interval) sync


def test_saved_bytes_excludes_weights_and_counts_activations():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    got = saved_bytes(lambda: torch.relu(lin(x)).sum(), exclude=list(lin.parameters()))
    # Linear saves its input x (32x64 fp32); relu saves its output (32x64 fp32); the weight is excluded.
    assert got == 2 * 32 * 64 * 4


def test_ema_update_is_sync_free_chunked_and_exact():
    from repa_fast.engine.ema import _CHUNK, ema_update_

    n = 2 * _CHUNK + 3  # several chunks, a ragged last one
    ema = [torch.randn(5, 7) for _ in range(n)]
    params = [torch.randn(5, 7) for _ in range(n)]
    expected = [e + 0.25 * (p - e) for e, p in zip(ema, params)]
    before = [e.clone() for e in ema]
    counts = count_ops(lambda: ema_update_(ema, params, 0.75, skip=torch.tensor(True)))
    assert host_syncs(counts) == 0 and all(torch.equal(a, b) for a, b in zip(ema, before))
    counts = count_ops(lambda: ema_update_(ema, params, 0.75, skip=torch.tensor(False)))
    assert host_syncs(counts) == 0
    for a, b in zip(ema, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
