"""REG (docs/methods.md §REG) against the reference's math (tests/reference/reg_ref.py, Martinser/REG @ 021ea2e):
state-dict keys and shapes, seeded init, forward, loss terms, gradients and the joint sampler, in float64."""

import math

import pytest
import torch

from repa_fast.errors import ConfigError
from repa_fast.models.sit import SiT, SiT_models
from repa_fast.objective import training_loss, warmup_loss
from repa_fast.sample import euler_maruyama_sampler, euler_sampler
from tests.reference.reg_ref import RegSiT, reg_euler_maruyama_sampler, reg_loss

SMALL = dict(input_size=8, patch_size=2, hidden_size=48, depth=3, num_heads=3, z_dims=[24], projector_dim=64,
             encoder_depth=2)  # fmt: skip
B, T, Z = 3, 16, 24


def ours(**kw):
    return SiT(reg=True, impl="ref", **{**SMALL, **kw})


def perturbed_pair(qk_norm=False, seed=0):
    """Our REG SiT with random weights (adaLN-Zero would hide most paths) and REG's with the same ones, float64."""
    torch.manual_seed(seed)
    model = ours(qk_norm=qk_norm).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.4 / math.sqrt(p.shape[-1]))
    ref = RegSiT(**SMALL, qk_norm=qk_norm).double()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 1000, (B,), generator=g)
    patch = torch.randn(B, T, Z, generator=g, dtype=torch.float64) * 2 + 0.3
    cls = torch.randn(B, Z, generator=g, dtype=torch.float64)
    return x0, y, patch, cls


def assert_rel(a, e, rtol, what=""):
    a, e = torch.as_tensor(a), torch.as_tensor(e)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    err = (a - e).abs().max().item()
    assert err <= rtol * max(e.abs().max().item(), 1e-30), f"{what}: max error {err:.3g} vs scale {e.abs().max():.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Model: keys, shapes, init, forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_has_exactly_regs_keys_and_shapes_and_loads_strictly(qk_norm):
    model, ref = ours(qk_norm=qk_norm), RegSiT(**SMALL, qk_norm=qk_norm)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes["pos_embed"] == (1, T + 1, 48)
    assert shapes["cls_projectors2.weight"] == (48, Z) and shapes["wg_norm.weight"] == (48,)
    assert shapes["final_layer.linear_cls.weight"] == (Z, 48) and shapes["final_layer.linear_cls.bias"] == (Z,)
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)


def test_xl2_key_set_equals_regs():
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"](z_dims=[768], encoder_depth=8, reg=True)
        ref = RegSiT(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16, z_dims=[768],
                     projector_dim=2048, encoder_depth=8)  # fmt: skip
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert model.pos_embed.shape == (1, 257, 1152)


def test_seeded_init_equals_regs_init():
    """Same module order and init as REG's models/sit.py:166-265, so a seeded build gives identical weights."""
    torch.manual_seed(7)
    model = ours()
    torch.manual_seed(7)
    ref = RegSiT(**SMALL)
    sd, rsd = model.state_dict(), ref.state_dict()
    for k in rsd:
        assert torch.equal(sd[k], rsd[k]), k
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0 and torch.count_nonzero(model.pos_embed[0, 1:]) > 0
    lc = model.final_layer.linear_cls
    assert torch.count_nonzero(lc.weight) == 0 and torch.count_nonzero(lc.bias) == 0
    assert torch.equal(model.wg_norm.weight, torch.ones(48)) and torch.count_nonzero(model.wg_norm.bias) == 0
    w = model.cls_projectors2.weight  # xavier-uniform, zero bias
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert 0.9 * bound < w.abs().max() <= bound and torch.count_nonzero(model.cls_projectors2.bias) == 0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_forward_equals_reference(qk_norm):
    model, ref = perturbed_pair(qk_norm)
    model.eval(), ref.eval()
    x0, y, _, cls = batch()
    t = torch.rand(B, dtype=torch.float64)
    v, zs, cls_v = model(x0, t, y, cls_token=cls)
    rv, rzs, rcls_v = ref(x0, t, y, cls_token=cls)
    assert zs[0].shape == (B, T + 1, Z)  # class token first, as REG's model
    assert_rel(v, rv, 1e-12, "velocity")
    assert_rel(zs[0], rzs[0], 1e-12, "zs")
    assert_rel(cls_v, rcls_v, 1e-12, "cls velocity")
    assert v.abs().max() > 1e-2 and cls_v.abs().max() > 1e-2  # a non-trivial function
    # The class token changes the image velocity (it is attended to), and only through the model.
    v2 = model(x0, t, y, cls_token=cls + 1.0)[0]
    assert (v2 - v).abs().max() > 1e-4


def test_call_contract_errors():
    model = ours()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"needs cls_token=.*\(2, 24\)"):
        model(x, t, y)
    with pytest.raises(ValueError, match=r"\(2, 24\), got \(2, 23\)"):
        model(x, t, y, cls_token=torch.randn(2, 23))
    plain = SiT(impl="ref", **SMALL)
    with pytest.raises(ValueError, match="without reg=True"):
        plain(x, t, y, cls_token=torch.randn(2, 24))
    with pytest.raises(ConfigError, match="reg=True needs z_dims"):
        SiT(reg=True, **{**SMALL, "z_dims": []})
    with pytest.raises(ConfigError, match="'conv' with reg=True is not defined"):
        SiT(reg=True, projection_layer_type="conv", **SMALL)
    out = model(x, t, y, cls_token=torch.randn(2, 24), return_zs=False)
    assert len(out) == 3 and out[1] == [] and out[2].shape == (2, 24)
    # The null label is num_classes, as without REG.
    assert model.y_embedder.embedding_table.num_embeddings == 1001
    assert model(x, t, torch.tensor([1000, 3]), cls_token=torch.randn(2, 24))[0].shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Loss terms and gradients (REG loss.py:52-102, train.py:313-321)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_type,weighting", [("linear", "uniform"), ("cosine", "lognormal")])
def test_loss_terms_and_gradients_equal_reference(path_type, weighting):
    """Train mode, t / noise / class-token noise / label dropout all drawn from the global RNG in REG's order."""
    model, ref = perturbed_pair()
    model.train(), ref.train()
    x0, y, patch, cls = batch()
    kw = dict(path_type=path_type, weighting=weighting, proj_coeff=0.7, cls_coeff=0.3, impl="ref")
    torch.manual_seed(11)
    out = training_loss(model, x0, y, [patch], cls_targets=[cls], **kw)
    torch.manual_seed(11)
    zs = [torch.cat([cls[:, None], patch], dim=1)]  # REG train.py:305-308
    ref_out = reg_loss(ref, x0, y, zs, cls, path_type, weighting, proj_coeff=0.7, cls_coeff=0.3)
    assert set(out) == {"loss", "denoising", "alignment", "cls"}
    for key in out:
        assert out[key].dtype == torch.float64
        assert_rel(out[key], ref_out[key], 1e-12, key)
    assert out["cls"] > 0 and out["alignment"] < 0
    out["loss"].backward()
    ref_out["loss"].backward()
    grads = dict(ref.named_parameters())
    n_checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rg = grads[name].grad
        assert p.grad is not None and rg is not None, name
        assert_rel(p.grad, rg, 1e-10, name)
        n_checked += rg.abs().max() > 0
    assert n_checked >= 40  # every parameter gets a gradient, cls_projectors2 / wg_norm / linear_cls included
    assert model.final_layer.linear_cls.weight.grad.abs().max() > 0 and model.wg_norm.weight.grad.abs().max() > 0


def test_given_t_noise_and_cls_noise_and_the_draw_order():
    """Drawn in the order t, noise, class-token noise; passing them gives the same numbers; the formulas of the API."""
    model, _ = perturbed_pair()
    model.eval()
    x0, y, patch, cls = batch()
    torch.manual_seed(3)
    drawn = training_loss(model, x0, y, [patch], cls_targets=[cls], impl="ref")
    torch.manual_seed(3)
    t = torch.rand(B)
    noise, cls_noise = torch.randn_like(x0), torch.randn_like(cls)
    given = training_loss(model, x0, y, [patch], t=t, noise=noise, cls_targets=[cls], cls_noise=cls_noise, impl="ref")
    for k in drawn:
        assert torch.equal(drawn[k], given[k]), k
    td = t.double()
    tt = td[:, None, None, None]
    v, zs, cls_v = model(x0 * (1 - tt) + tt * noise, td, y, cls_token=(1 - td[:, None]) * cls + td[:, None] * cls_noise)
    cls_loss = ((cls_v - (cls_noise - cls)) ** 2).mean(1).mean()
    assert_rel(given["cls"], cls_loss, 1e-14, "cls")
    den = ((v - (noise - x0)) ** 2).mean((1, 2, 3)).mean()
    assert_rel(given["loss"], den + 0.5 * given["alignment"] + 0.03 * cls_loss, 1e-14, "total")


def test_alignment_uses_each_encoders_own_class_token_and_zscore_skips_it():
    torch.manual_seed(0)
    model = ours(z_dims=[24, 40]).double().eval()
    x0, y, patch, cls = batch()
    patch2, cls2 = torch.randn(B, T, 40, dtype=torch.float64), torch.randn(B, 40, dtype=torch.float64)
    t, noise, cls_noise = torch.rand(B, dtype=torch.float64), torch.randn_like(x0), torch.randn_like(cls)
    kw = dict(t=t, noise=noise, cls_noise=cls_noise, impl="ref", target_norm="zscore", target_norm_alpha=0.8)
    out = training_loss(model, x0, y, [patch, patch2], cls_targets=[cls, cls2], **kw)
    tt = t[:, None, None, None]
    _, zs, _ = model(x0 * (1 - tt) + tt * noise, t, y, cls_token=(1 - t[:, None]) * cls + t[:, None] * cls_noise)

    def zscore(z):
        return (z - 0.8 * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True, unbiased=True) + 1e-6)

    targets = [torch.cat([c[:, None], zscore(p)], 1) for c, p in ((cls, patch), (cls2, patch2))]
    cos = [torch.nn.functional.cosine_similarity(z, tg, dim=-1, eps=0) for z, tg in zip(zs, targets)]
    assert_rel(out["alignment"], -(cos[0].mean() + cos[1].mean()) / 2, 1e-13, "alignment")


def test_loss_errors():
    model = ours()
    x0, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    patch, cls = torch.randn(2, T, Z), torch.randn(2, Z)
    with pytest.raises(ValueError, match="needs cls_token"):
        training_loss(model, x0, y, [patch])
    with pytest.raises(ValueError, match="without reg=True"):
        training_loss(SiT(impl="ref", **SMALL), x0, y, [patch], cls_targets=[cls])
    with pytest.raises(ValueError, match="2 class tokens"):
        training_loss(model, x0, y, [patch], cls_targets=[cls, cls])
    with pytest.raises(ValueError, match="target_norm='layer'"):
        training_loss(model, x0, y, [patch], cls_targets=[cls], target_norm="layer")
    # No patch targets (e.g. after a HASTE-style stop): no alignment, the class-token term stays.
    out = training_loss(model, x0, y, None, cls_targets=[cls])
    assert out["alignment"] == 0 and out["cls"] > 0


def test_erw_warmup_with_reg_is_the_alignment_at_t0_with_a_clean_class_token():
    """ERW's warm-up (clean input, t = 0) on a REG model: the class token enters clean too (alpha_0 c + sigma_0 n = c),
    so the warm-up alignment equals training_loss's at t = 0 when the projectors read block num_blocks."""
    model, _ = perturbed_pair()
    model.eval()
    x0, y, patch, cls = batch()
    warm = warmup_loss(model, x0, y, [patch], num_blocks=2, proj_coeff=0.5, cls_targets=[cls], impl="ref")
    full = training_loss(model, x0, y, [patch], t=torch.zeros(B, dtype=torch.float64), cls_targets=[cls], impl="ref")
    assert set(warm) == {"loss", "denoising", "alignment", "cls"}
    assert_rel(warm["alignment"], full["alignment"], 1e-13, "alignment")
    assert warm["denoising"] == 0 and warm["cls"] == 0 and torch.equal(warm["loss"], 0.5 * warm["alignment"])
    with pytest.raises(ValueError, match="needs cls_token"):
        warmup_loss(model, x0, y, [patch], num_blocks=2)


# ---------------------------------------------------------------------------------------------------------------
# Joint sampling (REG samplers.py:46-169)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg,low,high,cls_cfg",
    [(1.0, 0.0, 1.0, 1.5), (2.5, 0.2, 0.7, 1.5), (2.5, 0.2, 0.7, 4.0), (3.0, 0.0, 1.0, 0.0), (2.0, 0.3, 1.0, -1.0)],
)
def test_sde_sampler_equals_reference_with_fixed_seeds(cfg, low, high, cls_cfg):
    model, ref = perturbed_pair()
    model.eval(), ref.eval()
    g = torch.Generator().manual_seed(5)
    z, cz = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(B, Z, generator=g).double()
    y = torch.tensor([3, 999, 42])
    kw = dict(num_steps=9, cfg_scale=cfg, guidance_low=low, guidance_high=high, cls_latents=cz, cls_cfg_scale=cls_cfg)
    torch.manual_seed(21)
    out = euler_maruyama_sampler(model, z, y, **kw)
    torch.manual_seed(21)
    expected = reg_euler_maruyama_sampler(ref, z, y, **kw)
    assert out.shape == z.shape and out.dtype == torch.float64
    assert_rel(out, expected, 1e-10, "samples")
    if cls_cfg != 1.5:  # the class-token guidance acts on the image through the joint dynamics
        torch.manual_seed(21)
        other = euler_maruyama_sampler(model, z, y, **{**kw, "cls_cfg_scale": 1.5})
        assert (other - out).abs().max() > 1e-6


def test_sde_sampler_draws_image_noise_then_class_noise_before_each_call():
    """A model that records the RNG state at each call: the draws before call k are 2k normals (image, class token)."""
    model, _ = perturbed_pair()
    model.eval()
    seen = []
    real = model.forward

    def spy(*a, **kw):
        seen.append(torch.randn(1).item())  # the next value of the global stream at call time
        return real(*a, **kw)

    model.forward = spy
    z, cz, y = (
        torch.randn(2, 4, 8, 8, dtype=torch.float64),
        torch.randn(2, Z, dtype=torch.float64),
        torch.tensor([1, 2]),
    )
    torch.manual_seed(4)
    euler_maruyama_sampler(model, z, y, num_steps=3, cls_latents=cz)
    torch.manual_seed(4)
    expect = []
    for _ in range(2):  # two stochastic steps, then the deterministic last one
        torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, Z, dtype=torch.float64)
        expect.append(torch.randn(1).item())
    expect.append(torch.randn(1).item())
    assert seen == expect


@pytest.mark.parametrize("heun,cfg,cls_cfg", [(False, 1.0, 1.5), (True, 2.0, 1.5), (False, 2.0, 0.0)])
def test_ode_sampler_integrates_the_class_token_with_the_same_steps(heun, cfg, cls_cfg):
    """Ours to define (REG has no ODE sampler): Euler/Heun on (x, c) jointly, guidance as in the SDE."""
    model, _ = perturbed_pair()
    model.eval()
    z, cz = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, Z, dtype=torch.float64)
    y = torch.tensor([5, 6])
    out = euler_sampler(model, z, y, num_steps=5, heun=heun, cfg_scale=cfg, cls_latents=cz, cls_cfg_scale=cls_cfg)

    def slope(x, c, t):
        guided = cfg > 1
        xin, cin = (torch.cat([x, x]), torch.cat([c, c])) if guided else (x, c)
        yin = torch.cat([y, torch.full_like(y, 1000)]) if guided else y
        v, _, cv = model(xin, torch.full((xin.shape[0],), t, dtype=torch.float64), yin, cls_token=cin)
        if not guided:
            return v, cv
        (vc, vu), (cc, cu) = v.chunk(2), cv.chunk(2)
        return vu + cfg * (vc - vu), (cu + cls_cfg * (cc - cu)) if cls_cfg > 0 else cc

    x, c = z.clone(), cz.clone()
    ts = torch.linspace(1, 0, 6, dtype=torch.float64).tolist()
    for i in range(5):
        dt = ts[i + 1] - ts[i]
        d, dc = slope(x, c, ts[i])
        xn, cn = x + dt * d, c + dt * dc
        if heun and i < 4:
            d2, dc2 = slope(xn, cn, ts[i + 1])
            xn, cn = x + dt * (0.5 * d + 0.5 * d2), c + dt * (0.5 * dc + 0.5 * dc2)
        x, c = xn, cn
    assert_rel(out, x, 1e-12, "ode samples")


def test_sampler_cls_latents_errors():
    model = ours().eval()
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for sampler in (euler_sampler, euler_maruyama_sampler):
        with pytest.raises(ValueError, match=r"reg=True\): pass cls_latents=torch.randn\(B, 24\)"):
            sampler(model, z, y, num_steps=2)
        with pytest.raises(ValueError, match="one class token per image"):
            sampler(model, z, y, num_steps=2, cls_latents=torch.randn(3, 24))
        with pytest.raises(ValueError, match="not a REG SiT"):
            sampler(SiT(impl="ref", **SMALL).eval(), z, y, num_steps=2, cls_latents=torch.randn(2, 24))
        with pytest.raises(ValueError, match="cls_cfg_scale=nan"):
            sampler(model, z, y, num_steps=2, cls_latents=torch.randn(2, 24), cls_cfg_scale=float("nan"))


def test_autocast_bf16_close_to_fp32():
    """Under bf16 autocast the class-token path runs too (mixed-dtype token concatenation) and the losses stay fp32."""
    torch.manual_seed(0)
    model, _ = perturbed_pair()
    model = model.float().eval()
    x0, y, patch, cls = (t.float() if t.is_floating_point() else t for t in batch())
    kw = dict(t=torch.rand(B), noise=torch.randn_like(x0), cls_targets=[cls], cls_noise=torch.randn_like(cls))
    fp32 = training_loss(model, x0, y, [patch], **kw)
    bf16 = training_loss(model, x0, y, [patch], autocast_dtype=torch.bfloat16, **kw)
    for k in fp32:
        assert bf16[k].dtype == torch.float32
        assert abs(bf16[k].item() - fp32[k].item()) < 0.03 * abs(fp32[k].item()), k
    assert bf16["cls"].item() != fp32["cls"].item()  # autocast really ran
