"""REG and iREPA SiTs with the Triton kernels (impl="triton", Triton's interpreter on CPU) equal the PyTorch
references (impl="ref"): the training loss and every parameter gradient; and a whole REG / iREPA training step
traces under torch.compile with no graph break (counted with torch._dynamo.explain, next to the REPA step)."""

import pytest
import torch

from repa_fast.models.sit import SiT
from repa_fast.objective import training_loss
from tests.conftest import assert_close

TINY = dict(patch_size=2, hidden_size=96, depth=3, num_heads=3, num_classes=10, encoder_depth=2, projector_dim=64)


def _perturb_(module: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero starts with zero gates and a zero final layer: add noise so that every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _batch(size, z_dim=32, reg=True):
    g = torch.Generator().manual_seed(2)
    T = (size // 2) ** 2
    x0, y = torch.randn(2, 4, size, size, generator=g), torch.tensor([3, 7])
    t, noise = torch.rand(2, generator=g), torch.randn(2, 4, size, size, generator=g)
    kw = dict(t=t, noise=noise)
    if reg:
        kw.update(cls_targets=[torch.randn(2, z_dim, generator=g)], cls_noise=torch.randn(2, z_dim, generator=g))
    return x0, y, [torch.randn(2, T, z_dim, generator=g)], kw


def _loss_and_grads(model, batch, **kw):
    x0, y, targets, draws = batch
    model.zero_grad(set_to_none=True)
    out = training_loss(model, x0, y, targets, impl=model.impl, **draws, **kw)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, {
        n: p.grad for n, p in model.named_parameters() if p.grad is not None
    }


# 16 + 1 tokens with qk-norm and RoPE (class token unrotated); 256 + 1 tokens (REG at 256 px) without; iREPA's conv.
CASES = [
    (8, dict(reg=True, qk_norm=True, use_rope=True), {}),
    (32, dict(reg=True), {}),
    (8, dict(projection_layer_type="conv", qk_norm=True, use_rope=True), dict(target_norm="zscore")),
    (8, dict(reg=True, projection_layer_type="linear"), dict(target_norm="zscore")),
]


@pytest.mark.parametrize("size,model_kw,loss_kw", CASES)
def test_family_sit_kernels_equal_references(size, model_kw, loss_kw):
    batch = _batch(size, reg=model_kw.get("reg", False))
    ref = SiT(input_size=size, z_dims=[32], impl="ref", **TINY, **model_kw).eval()
    _perturb_(ref)
    tri = SiT(input_size=size, z_dims=[32], impl="triton", **TINY, **model_kw).eval()
    tri.load_state_dict(ref.state_dict())
    out_r, grads_r = _loss_and_grads(ref, batch, **loss_kw)
    out_t, grads_t = _loss_and_grads(tri, batch, **loss_kw)
    for k in out_r:
        assert_close(out_t[k], out_r[k], "reduction")
    assert grads_t.keys() == grads_r.keys() and len(grads_r) > 30
    for n in grads_r:
        assert grads_r[n].abs().max() > 0, f"{n}: zero gradient, the test would be vacuous"
        assert_close(grads_t[n], grads_r[n], "reduction")
    if model_kw.get("reg"):
        assert out_r["cls"] > 0 and "cls_projectors2.weight" in grads_r and "final_layer.linear_cls.weight" in grads_r


@pytest.mark.parametrize(
    "model_kw,loss_kw",
    [
        ({}, {}),
        (dict(reg=True, qk_norm=True, use_rope=True), {}),
        (dict(projection_layer_type="conv"), dict(target_norm="zscore")),
    ],
    ids=["repa", "reg", "irepa"],
)
def test_training_step_has_no_graph_breaks(model_kw, loss_kw):
    """The whole step (t / noise / class-token noise drawn inside, model, losses) is one graph: dynamo captures one
    frame (a graph break would make two or more), and the compiled step (aot_eager, which also traces the custom
    ops' backward) gives the eager loss and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = SiT(input_size=8, z_dims=[32], impl="triton", **TINY, **model_kw).train()
    _perturb_(model)
    x0, y, targets, draws = _batch(8, reg=model_kw.get("reg", False))
    cls_targets = draws.get("cls_targets")

    def step(x0, y, targets, cls_targets):
        return training_loss(model, x0, y, targets, cls_targets=cls_targets, impl="triton", **loss_kw)["loss"]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter)
    grads = []
    for fn in (step, compiled):
        torch.manual_seed(5)  # same t, noise, class-token noise and label dropout in both
        model.zero_grad(set_to_none=True)
        loss = fn(x0, y, targets, cls_targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: torch.compile broke the step"
    assert counter.op_count > 50  # the step really was traced, not skipped
    (le, ge), (lc, gc) = grads
    assert_close(lc, le, "reduction")
    assert ge.keys() == gc.keys() and len(ge) > 30
    for n in ge:
        assert_close(gc[n], ge[n], "reduction")
