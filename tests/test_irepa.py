"""iREPA (docs/methods.md §iREPA) against the reference's math (tests/reference/irepa_ref.py, End2End-Diffusion/iREPA
@ 99ad4ac): projector keys, seeded init, forward, spatial z-score, loss terms and gradients, in float64."""

import math

import pytest
import torch

from repa_fast.errors import ConfigError
from repa_fast.models.projectors import ProjectionLayer
from repa_fast.models.sit import SiT
from repa_fast.objective import spatial_zscore, training_loss, warmup_loss
from tests.reference import irepa_ref
from tests.reference.irepa_ref import IrepaSiT, irepa_loss

SMALL = dict(input_size=8, patch_size=2, hidden_size=48, depth=3, num_heads=3, z_dims=[24], projector_dim=64,
             encoder_depth=2)  # fmt: skip
B, T, Z = 3, 16, 24
KINDS = [("linear", 3), ("conv", 1), ("conv", 3), ("conv", 5)]


def ours(kind, k, **kw):
    return SiT(projection_layer_type=kind, proj_kernel_size=k, impl="ref", **{**SMALL, **kw})


def ref_model(kind, k):
    return IrepaSiT(**SMALL, projection_layer_type=kind, proj_kwargs_kernel_size=k)


def perturbed_pair(kind, k, seed=0):
    torch.manual_seed(seed)
    model = ours(kind, k).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.4 / math.sqrt(p[0].numel() if p.dim() > 1 else p.shape[-1]))
    ref = ref_model(kind, k).double()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def assert_rel(a, e, rtol, what=""):
    assert a.shape == e.shape, (what, a.shape, e.shape)
    err = (a - e).abs().max().item()
    assert err <= rtol * max(e.abs().max().item(), 1e-30), f"{what}: max error {err:.3g} vs scale {e.abs().max():.3g}"


@pytest.mark.parametrize("kind,k", KINDS)
def test_keys_shapes_strict_loading_and_seeded_init_equal_irepas(kind, k):
    torch.manual_seed(3)
    model = ours(kind, k)
    torch.manual_seed(3)
    ref = ref_model(kind, k)
    sd, rsd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd)  # same keys in the same order
    for key in rsd:
        assert sd[key].shape == rsd[key].shape and torch.equal(sd[key], rsd[key]), key
    w = sd["projectors.0.projection_layer.weight"]
    assert w.shape == ((Z, 48) if kind == "linear" else (Z, 48, k, k))
    assert "projectors.0.projection_layer.bias" in sd and not any(".0.0." in key for key in sd)
    model.load_state_dict(rsd, strict=True)
    ref.load_state_dict(sd, strict=True)
    if kind == "conv":  # PyTorch's default Conv2d init (iREPA's _basic_init only touches Linear layers)
        bound = 1 / math.sqrt(48 * k * k)
        assert 0.9 * bound < w.abs().max() <= bound and torch.count_nonzero(sd["projectors.0.projection_layer.bias"])
    else:  # xavier-uniform, zero bias
        assert (
            w.abs().max() <= math.sqrt(6 / (Z + 48))
            and torch.count_nonzero(sd["projectors.0.projection_layer.bias"]) == 0
        )


def test_mlp_keeps_repas_keys():
    keys = [k for k in SiT(projection_layer_type="mlp", **SMALL).state_dict() if k.startswith("projectors")]
    assert keys == [f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


@pytest.mark.parametrize("kind,k", KINDS)
def test_forward_equals_reference(kind, k):
    model, ref = perturbed_pair(kind, k)
    model.eval(), ref.eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64), torch.rand(B, generator=g).double()
    y = torch.tensor([1, 2, 1000])
    v, zs = model(x, t, y)
    rv, rzs, _ = ref(x, t, y)
    assert_rel(v, rv, 1e-12, "velocity")
    assert_rel(zs[0], rzs[0], 1e-12, "zs")
    if kind == "conv" and k > 1:  # the projection of a token reads its neighbours on the 4x4 grid
        h = torch.randn(1, T, 48, dtype=torch.float64)
        base = model.projectors[0](h, 4)
        h[0, 5] += 1.0  # token (1, 1): its 3x3 neighbourhood changes, a far token (3, 3) does not
        moved = (model.projectors[0](h, 4) - base).abs().amax(-1)[0]
        assert moved[0] > 0 and moved[6] > 0 and (moved[15] == 0 if k == 3 else True)


def test_spatial_zscore_equals_irepas():
    z = torch.randn(4, T, Z, dtype=torch.float64) * 3 + 1.2
    for alpha in (0.6, 0.8, 1.0):
        assert_rel(spatial_zscore(z, alpha), irepa_ref.spatial_zscore(z, alpha), 1e-15, "zscore")
    out = spatial_zscore(z, 1.0)
    assert_rel(out.std(1), torch.ones(4, Z, dtype=torch.float64), 1e-5, "unit std")  # unbiased, eps 1e-6
    assert spatial_zscore(z.bfloat16()).dtype == torch.float32  # computed in fp32 at least


@pytest.mark.parametrize("kind,k,norm", [("conv", 3, "zscore"), ("linear", 3, "zscore"), ("conv", 1, None)])
def test_loss_terms_and_gradients_equal_reference(kind, k, norm):
    model, ref = perturbed_pair(kind, k)
    model.train(), ref.train()  # label dropout drawn after t and the noise, in both
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 1000, (B,), generator=g)
    patch = torch.randn(B, T, Z, generator=g, dtype=torch.float64) * 2 + 0.5
    torch.manual_seed(9)
    out = training_loss(model, x0, y, [patch], proj_coeff=1.0, target_norm=norm, target_norm_alpha=0.6, impl="ref")
    torch.manual_seed(9)
    target = irepa_ref.spatial_zscore(patch, alpha=0.6) if norm else patch  # ldm/train.py:319-327
    expected = irepa_loss(ref, x0, y, [target], proj_coeff=1.0)
    for key in expected:
        assert_rel(out[key], expected[key], 1e-12, key)
    assert out["cls"] == 0
    out["loss"].backward()
    expected["loss"].backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_rel(p.grad, grads[name].grad, 1e-10, name)
    assert model.projectors[0].projection_layer.weight.grad.abs().max() > 0


def test_options_are_checked():
    with pytest.raises(ConfigError, match="projection_layer_type='mlp2'"):
        SiT(projection_layer_type="mlp2", **SMALL)
    for bad in (2, 0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="odd kernel size"):
            SiT(projection_layer_type="conv", proj_kernel_size=bad, **SMALL)
    with pytest.raises(ConfigError, match="'conv' with reg=True is not defined"):
        SiT(projection_layer_type="conv", reg=True, **SMALL)
    with pytest.raises(ValueError, match="not the 4x4 token grid"):
        ProjectionLayer("conv", 48, Z)(torch.randn(1, 15, 48), 4)


def test_erw_warmup_with_irepa_switches():
    """ERW's warm-up (t = 0, clean latent) with the conv projector and z-scored targets equals the alignment term of
    training_loss at t = 0 when the projectors read block num_blocks."""
    model, _ = perturbed_pair("conv", 3)
    model.eval()
    x0, y = torch.randn(B, 4, 8, 8, dtype=torch.float64), torch.tensor([4, 5, 6])
    patch = torch.randn(B, T, Z, dtype=torch.float64)
    kw = dict(target_norm="zscore", target_norm_alpha=0.6, impl="ref")
    warm = warmup_loss(model, x0, y, [patch], num_blocks=2, proj_coeff=0.5, **kw)
    full = training_loss(model, x0, y, [patch], t=torch.zeros(B, dtype=torch.float64), **kw)
    assert_rel(warm["alignment"], full["alignment"], 1e-13, "alignment")
    plain = warmup_loss(model, x0, y, [patch], num_blocks=2, impl="ref")
    assert (plain["alignment"] - warm["alignment"]).abs() > 1e-4  # the z-score changed the target
