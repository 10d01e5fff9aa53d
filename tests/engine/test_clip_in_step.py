"""Gradient clipping folded into the fused AdamW step (issue 18, cut 2c), counted on CPU, and the same update as the
clip-then-step it replaced.

The gradients are touched by exactly two ops: the one norm reduction and the fused step (no unscale pass, no clip
multiply), which receives the clip and the fp16 loss scale as its ``grad_scale``; fp32 without clipping passes none.
The updates equal the old clip-then-step (``_clip_then_step`` below, the code this replaced) bit for bit where the
clip is inactive, to 1-2 ulps of the gradient where it clips, and a non-finite gradient is skipped exactly as before.
"""

import pytest
import torch
import torch.nn as nn

from repa_fast.engine.parallel import Backend
from repa_fast.engine.profiling import count_ops, host_syncs

from .access import AccessCounter, nbytes

INF = float("inf")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 33), nn.GELU(), nn.Linear(33, 130), nn.Tanh(), nn.Linear(130, 5))


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=True)


def _backward(model, scaler, seed: int, nan: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 7, generator=gen), torch.randn(16, 5, generator=gen)
    loss = (model(x) - y).pow(2).mean() * 30.0
    loss = loss * float("nan") if nan else loss
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _clip_then_step(opt, model, max_norm, scaler):
    """The clip_and_step this cut replaced: unscale, clip_grad_norm_ (a norm and a multiply), then the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    bad = ~torch.isfinite(grad_norm)
    if scaler is not None:
        found = sum(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        scaler.step(opt)
        scaler.update()
        skipped = bad | (found > 0)
    else:
        opt.found_inf, opt.grad_scale = bad.float(), None
        opt.step()
        del opt.found_inf, opt.grad_scale
        skipped = bad
    opt.zero_grad(set_to_none=True)
    return grad_norm.detach(), skipped


def _scaler(fp16: bool):
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if fp16 else None


def _state(model, opt, scaler):
    out = {f"p.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, p in enumerate(model.parameters()):
        out.update({f"s{i}.{k}": v.clone() for k, v in opt.state[p].items()})
    if scaler is not None:
        out["scale"], out["growth"] = scaler._scale.clone(), scaler._growth_tracker.clone()
    return out


# max_norm 0.05 clips every step (norms ~1-10); 1e6 never clips; inf is --max-grad-norm 0 (the trainer's mapping)
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6, INF], ids=["clipping", "not-clipping", "no-clip"])
def test_folded_clip_is_the_same_update_as_clip_then_step(fp16, max_norm):
    old, new = _mlp(), _mlp()
    opt_old, opt_new = _opt(old), _opt(new)
    sc_old, sc_new = _scaler(fp16), _scaler(fp16)
    backend = Backend("cpu")
    backend.wrap(new, opt_new)
    for step in range(5):
        nan = step == 2  # a non-finite gradient: skipped by both, on device
        _backward(old, sc_old, step, nan)
        _backward(new, sc_new, step, nan)
        norm_old, skip_old = _clip_then_step(opt_old, old, max_norm, sc_old)
        norm_new, skip_new = backend.clip_and_step(new, max_norm, sc_new)
        assert bool(skip_new) == bool(skip_old) == nan
        assert norm_new.shape == ()
        if not nan:  # clipping: the weights drift apart by rounding after the first step, and so do the norms
            exact = max_norm != 0.05 or step == 0
            assert torch.equal(norm_new, norm_old) if exact else torch.allclose(norm_new, norm_old, rtol=1e-6)
        a, b = _state(old, opt_old, sc_old), _state(new, opt_new, sc_new)
        assert a.keys() == b.keys()
        for k in a:
            if max_norm == 0.05:  # clipped gradients round in 2 steps instead of 3 (base.step_divisor)
                torch.testing.assert_close(b[k], a[k], atol=1e-7, rtol=1e-6, msg=k)
            else:
                assert torch.equal(b[k], a[k]), (step, k)
    assert int(opt_new.state[next(new.parameters())]["step"]) == 4  # 5 steps, the NaN one skipped
    if fp16:
        assert float(sc_new._scale) != 2.0**10  # backed off once, grew on the clean steps: the scaler is live


@pytest.mark.parametrize("max_norm,ulps", [(1.0, 1), (0.5, 1), (0.3, 2), (3.7, 2)])
def test_clipped_gradients_are_within_one_or_two_ulps(max_norm, ulps):
    """What the fused step divides by vs clip_grad_norm_'s multiply: 1 ulp apart when max_norm is a power of 2."""
    from repa_fast.engine.parallel.base import step_divisor

    g = torch.randn(200_000) * 3
    norm = g.norm()
    p = nn.Parameter(torch.empty_like(g))
    p.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_([p], max_norm, norm, foreach=True)
    want = p.grad
    got = g / step_divisor(norm, max_norm, None)
    assert int((got.view(torch.int32).long() - want.view(torch.int32).long()).abs().max()) <= ulps
    assert not torch.equal(got, g)  # it clipped
    assert step_divisor(norm, INF, None) is None and step_divisor(norm, 0.0, None) is None
    assert torch.equal(step_divisor(norm / 1e4, max_norm, None), torch.tensor(1.0))  # inactive: exactly 1
    scale = torch.tensor(2.0**12)
    assert torch.equal(step_divisor(norm, max_norm, scale), step_divisor(norm, max_norm, None) * scale)
    assert step_divisor(norm, INF, scale) is scale


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
@pytest.mark.parametrize("max_norm", [1.0, INF], ids=["clip", "no-clip"])
def test_gradients_are_touched_by_one_norm_and_the_fused_step_only(fp16, max_norm):
    model, scaler = _mlp(), _scaler(fp16)
    backend = Backend("cpu")
    backend.wrap(model, _opt(model))
    for step in range(2):  # the first step creates the optimizer state
        _backward(model, scaler, step)
        grads = [p.grad for p in model.parameters()]
        counter = AccessCounter()
        with counter:
            backend.clip_and_step(model, max_norm, scaler)
    _backward(model, scaler, 9)
    assert host_syncs(count_ops(backend.clip_and_step, model, max_norm, scaler)) == 0
    names = [op.name for op in counter.touching(grads)]
    assert names == ["aten._foreach_norm", "aten._fused_adamw_"], names  # no unscale, no clip multiply
    (step_op,) = [op for op in counter.ops if op.name == "aten._fused_adamw_"]
    grad_scale = step_op.kwargs.get("grad_scale")
    if fp16 or max_norm == 1.0:
        assert isinstance(grad_scale, torch.Tensor) and grad_scale.numel() == 1
    else:
        assert grad_scale is None  # fp32 without clipping: the step neither rescales nor writes back the gradients
    (norm_op,) = counter.touching(grads)[:1]
    assert nbytes(g for g in norm_op.reads if g.numel() > 1) == nbytes(grads)  # one read of every gradient
