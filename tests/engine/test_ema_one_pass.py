"""The EMA in one pass over its tensors (issue 18, cut 2b), counted on CPU: ``EMA.update`` touches the EMA with one
op that reads EMA + parameters once and writes the EMA once (2 reads + 1 write per element; the three passes it
replaced moved 5 + 3), with the skip flag read on the device (no host sync).
"""

import torch
import torch.nn as nn

from repa_fast.engine.ema import EMA
from repa_fast.engine.profiling import count_ops, host_syncs
from repa_fast.kernels import ema_update as K

from .access import AccessCounter, nbytes


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 33), nn.GELU(), nn.Linear(33, 130), nn.Tanh(), nn.Linear(130, 5))


def test_ema_update_is_one_pass_two_reads_one_write(monkeypatch):
    """The trainer's EMA.update with the kernel path chosen (as on CUDA): one op touches the EMA, reading EMA and
    parameters once and writing the EMA once, with the skip flag read on device (no host sync)."""
    monkeypatch.setattr(K, "use_triton", lambda op, impl, x: True)  # the gate's CUDA choice, through the interpreter
    model = _mlp()
    ema = EMA(model)
    shadow = [p for p in ema.module.parameters()]
    params = [p for p in model.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    want = [e + (p - e) * torch.tensor(0.25) for e, p in zip(shadow, params)]
    for skip in (True, False):
        flag = torch.tensor(skip)
        counter = AccessCounter()
        with counter:
            ema.update(model, 0.75, skip=flag)
        assert host_syncs(count_ops(lambda: ema.update(model, 0.75, skip=torch.tensor(True)))) == 0
        touching = counter.touching(shadow)
        assert [op.name for op in touching] == ["repa_fast.ema_update_"], [op.name for op in touching]
        (op,) = touching
        assert nbytes(op.reads) == nbytes(shadow) + nbytes(params) + flag.numel()  # 2 reads per element (+ flag)
        assert nbytes(op.writes) == nbytes(shadow)  # 1 write per element
        assert sum(nbytes(o.reads) + nbytes(o.writes) for o in counter.ops) == 3 * nbytes(shadow) + 1
    for a, b in zip(shadow, want):
        assert torch.equal(a, b)


def test_ema_copy_and_counter_see_the_old_three_passes():
    """The counter can fail: the three-pass reference reads 5 and writes 3 floats per element."""
    ema = [torch.randn(50) for _ in range(3)]
    params = [torch.randn(50) for _ in range(3)]
    counter = AccessCounter()
    with counter:
        K.ema_update_ref(ema, params, 0.9, torch.tensor(False))
    passes = counter.touching(ema)
    assert len(passes) == 2 and len(counter.touching([*ema, *params])) == 2
    moved = sum(nbytes(o.reads) + nbytes(o.writes) for o in counter.ops if o.name.startswith("aten._foreach"))
    assert moved == 8 * nbytes(ema) + 4  # 5 reads + 3 writes per element, and the 0-dim weight read once
