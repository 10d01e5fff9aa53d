"""SiT with the Triton kernels (impl="triton", through Triton's interpreter on CPU) equals SiT with the PyTorch
references (impl="ref"): loss and every parameter gradient; and a compiled SiT block equals the eager one."""

import pytest
import torch

from repa_fast.kernels import alignment_loss
from repa_fast.models.sit import SiT_models, SiTBlock
from tests.conftest import assert_close


def _perturb_(module: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero starts with zero gates and a zero final layer: add noise so that every path carries signal."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def _loss_and_grads(model, x, t, y, target, z_target, impl):
    model.zero_grad(set_to_none=True)
    out, zs = model(x, t, y)
    loss = (out - target).square().mean() + 0.5 * alignment_loss(zs, [z_target], impl=impl)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# Full depth, small latents (the interpreter's cost is per program): SiT-S/2 plain at 16x16 (64 tokens), SiT-B/2
# with qk-norm and 2-D RoPE (the fused qk_norm_rope op) at 8x8 (16 tokens).
@pytest.mark.parametrize("name,size,extra", [("SiT-S/2", 16, {}), ("SiT-B/2", 8, {"qk_norm": True, "use_rope": True})])
def test_sit_kernels_equal_references(name, size, extra):
    kw = dict(input_size=size, num_classes=10, z_dims=[64], encoder_depth=4, **extra)
    tokens = (size // 2) ** 2
    x, t, y = torch.randn(2, 4, size, size), torch.rand(2), torch.tensor([3, 7])
    target, z_target = torch.randn(2, 4, size, size), torch.randn(2, tokens, 64)
    ref = SiT_models[name](impl="ref", **kw).eval()
    _perturb_(ref)
    loss_r, grads_r = _loss_and_grads(ref, x, t, y, target, z_target, "ref")
    tri = SiT_models[name](impl="triton", **kw).eval()
    tri.load_state_dict(ref.state_dict())
    del ref  # SiT-B/2 is 130M parameters: keep at most two models' worth of tensors alive
    loss_t, grads_t = _loss_and_grads(tri, x, t, y, target, z_target, "triton")
    assert_close(loss_t, loss_r, "reduction")
    assert grads_t.keys() == grads_r.keys() and len(grads_r) > 20
    for n in grads_r:
        assert grads_r[n].abs().max() > 0, f"{n}: zero gradient, the test would be vacuous"
        assert_close(grads_t[n], grads_r[n], "reduction")


def test_compiled_block_equals_eager():
    """torch.compile(fullgraph=True) traces a SiT block whose ops are repa_fast:: custom ops (aot_eager on CPU)."""
    from repa_fast.kernels import rope_2d_cos_sin

    torch._dynamo.reset()
    block = SiTBlock(384, 6, qk_norm=True, impl="triton")
    _perturb_(block)
    rope = rope_2d_cos_sin(64, 4, 4)
    x = torch.randn(2, 16, 384, requires_grad=True)
    c = torch.randn(2, 384, requires_grad=True)

    def step(fn):
        block.zero_grad(set_to_none=True)
        out = fn(x, c, rope)
        gx, gc = torch.autograd.grad(out.square().sum(), [x, c], retain_graph=True)
        out.square().sum().backward()
        return out.detach(), gx, gc, {n: p.grad.clone() for n, p in block.named_parameters()}

    eager = step(block)
    compiled = step(torch.compile(block, backend="aot_eager", fullgraph=True))
    for a, e in zip(compiled[:3], eager[:3]):
        assert_close(a, e)
    for n in eager[3]:
        assert_close(compiled[3][n], eager[3][n], "reduction")
