"""The residual stream's layout (issue 18, cut 2a): every SiT block sees the same contiguous (N, T, D) tensor, so the
per-block compiled module (engine/parallel/parallelize.apply_compile) compiles once, and the outputs are bit for bit
those of the strided stream the patch embedding used to hand to block 0."""

import pytest
import torch
from torch._dynamo.utils import counters

from repa_fast.engine.parallel.parallelize import apply_compile
from repa_fast.models.sit import SiT


def _tiny(impl: str, **kw) -> SiT:
    """Depth 3 (block 0 and two more), width 64, 16 tokens: small enough for Triton's interpreter."""
    model = SiT(
        input_size=8,
        patch_size=2,
        hidden_size=64,
        depth=3,
        num_heads=2,
        num_classes=10,
        z_dims=[16],
        encoder_depth=1,
        impl=impl,
        **kw,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adaLN-Zero starts with zero gates: perturb so that every block changes the stream
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _inputs():
    return torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 7])


def _block_input_layouts(model, *inputs):
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: seen.append((a[0].stride(), a[0].is_contiguous())))
        for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_every_block_reads_one_contiguous_layout(impl):
    model = _tiny(impl).eval()
    seen = _block_input_layouts(model, *_inputs())
    assert len(seen) == 3
    assert all(contiguous for _, contiguous in seen), seen
    assert len({strides for strides, _ in seen}) == 1, seen  # block 0 included
    assert seen[0][0] == (16 * 64, 64, 1)


def test_per_block_compile_does_not_recompile_for_block_zero():
    """The repo's per-block compile: one graph serves all blocks, forward and backward. A D-strided block-0 input
    fails dynamo's stride guard ("tensor 'x' stride mismatch") and compiles a second graph."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny("triton")
    apply_compile(model, backend="eager")  # the trainer's --compile, with a backend that needs no compiler
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, zs = model(*_inputs())
        (out.square().mean() + zs[0].square().mean()).backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for p in model.blocks.parameters())
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_outputs_bitwise_equal_to_the_strided_stream(impl, monkeypatch):
    """The copy changes the layout, never a value: outputs and every gradient equal, bit for bit, those of the model
    fed the D-strided tokens (the patch embedding before the cut)."""
    model = _tiny(impl)
    inputs = _inputs()

    def run():
        model.zero_grad(set_to_none=True)
        out, zs = model(*inputs)
        (out.square().mean() + zs[0].square().mean()).backward()
        return [out.detach(), zs[0].detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    contiguous = run()
    embed = model.x_embedder
    monkeypatch.setattr(embed, "forward", lambda x: embed.proj(x).flatten(2).transpose(1, 2))
    assert not _block_input_layouts(model, *inputs)[0][1]  # the patched model really feeds a strided stream
    strided = run()
    assert len(contiguous) == len(strided) > 20
    for a, b in zip(contiguous, strided):
        assert torch.equal(a, b)
