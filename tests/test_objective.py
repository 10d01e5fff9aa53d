"""The REPA objective against the reference's own forms and a float64 recomputation (docs/objective.md
§Interpolants, §Losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

from repa_fast.kernels.align_loss import alignment_loss_ref
from repa_fast.models.sit import SiT_models
from repa_fast.objective import denoising_loss, interpolant, sample_time, training_loss


def reference_proj_loss(zs, zs_tilde):
    """The reference SILoss projection loss, loop for loop (loss.py:80-88)."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return proj_loss / (len(zs) * bsz)


def random_model(**kw):
    model = SiT_models["SiT-S/2"](input_size=8, depth=3, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 / math.sqrt(p.shape[-1]))
    return model.eval()  # eval: no label dropout, so fp32 and fp64 runs see the same labels


def test_alignment_loss_equals_reference_loop():
    targets = [torch.randn(5, 16, 24), torch.randn(5, 16, 40) * 3]
    preds = [torch.randn(5, 16, 24), torch.randn(5, 16, 40)]
    ours = alignment_loss_ref(preds, targets)
    ref = reference_proj_loss(targets, preds)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    # negative and bounded: exact alignment gives -1
    assert -1 <= ours.item() <= 1
    torch.testing.assert_close(alignment_loss_ref(targets, [2 * z for z in targets]), torch.tensor(-1.0))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_total_loss_equals_float64_recomputation(path_type):
    torch.manual_seed(3)
    model = random_model(z_dims=[24, 40], encoder_depth=2)
    B = 4
    x0, y = torch.randn(B, 4, 8, 8), torch.randint(0, 1000, (B,))
    t, noise = torch.rand(B), torch.randn(B, 4, 8, 8)
    targets = [torch.randn(B, 16, 24), torch.randn(B, 16, 40)]
    out = training_loss(model, x0, y, targets, t=t, noise=noise, path_type=path_type, proj_coeff=0.7)

    # float64 recomputation from the formulas of docs/objective.md, on a float64 copy of the same model
    m64 = random_model(z_dims=[24, 40], encoder_depth=2).double()
    m64.load_state_dict(model.state_dict())
    x0d, td, nd = x0.double(), t.double()[:, None, None, None], noise.double()
    if path_type == "linear":
        a, s, da, ds = 1 - td, td, -torch.ones_like(td), torch.ones_like(td)
    else:
        a, s = torch.cos(math.pi * td / 2), torch.sin(math.pi * td / 2)
        da, ds = -math.pi / 2 * torch.sin(math.pi * td / 2), math.pi / 2 * torch.cos(math.pi * td / 2)
    xt, v = a * x0d + s * nd, da * x0d + ds * nd
    v_hat, zs = m64(xt, t.double(), y)
    den = ((v_hat - v) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = reference_proj_loss([z.double() for z in targets], zs)
    total = den + 0.7 * proj
    assert abs(out["loss"].item() - total.item()) <= 1e-6 * abs(total.item())
    assert abs(out["denoising"].item() - den.item()) <= 1e-6 * abs(den.item())
    assert abs(out["alignment"].item() - proj.item()) <= 1e-6
    assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0


def test_alignment_gradients_reach_exactly_projector_early_blocks_and_embedders():
    torch.manual_seed(0)
    enc_depth, depth = 2, 4
    model = SiT_models["SiT-S/2"](input_size=8, depth=depth, z_dims=[24], encoder_depth=enc_depth)
    with torch.no_grad():  # leave init: adaLN-Zero would zero the block gradients
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    out = training_loss(model, torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), [torch.randn(3, 16, 24)])
    out["alignment"].backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n in trainable
        if n.startswith(("projectors.", "x_embedder.", "t_embedder.", "y_embedder."))
        or any(n.startswith(f"blocks.{i}.") for i in range(enc_depth))
    }
    assert reached == expected
    assert model.pos_embed.grad is None


def test_interpolant_derivatives_are_time_derivatives():
    t = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    h = 1e-6
    for path in ("linear", "cosine"):
        a, s, da, ds = interpolant(t, path)
        a2, s2, _, _ = interpolant(t + h, path)
        a1, s1, _, _ = interpolant(t - h, path)
        torch.testing.assert_close(da, (a2 - a1) / (2 * h), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(ds, (s2 - s1) / (2 * h), atol=1e-7, rtol=1e-6)
        zero = torch.zeros(1, dtype=torch.float64)
        assert torch.equal(interpolant(zero, path)[0], torch.ones(1, dtype=torch.float64))  # alpha_0 = 1


def test_time_sampling_laws():
    n = 200_000
    u = sample_time(n, "uniform")
    assert u.shape == (n,) and u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    lin = sample_time(n, "lognormal", "linear").double()
    logit = torch.log(lin / (1 - lin))  # = n ~ N(0, 1)
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    cos = sample_time(n, "lognormal", "cosine").double()
    log_s = torch.log(torch.tan(math.pi * cos / 2))  # = n ~ N(0, 1)
    assert abs(log_s.mean().item()) < 0.01 and abs(log_s.std().item() - 1) < 0.01


def test_draws_t_and_noise_when_not_given_and_plain_sit_without_targets():
    model = random_model(z_dims=[], encoder_depth=2)
    x0, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,))
    torch.manual_seed(5)
    a = training_loss(model, x0, y, None)
    torch.manual_seed(5)
    b = training_loss(model, x0, y, [])
    torch.manual_seed(6)
    c = training_loss(model, x0, y, None)
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["loss"], c["loss"])
    assert a["alignment"].item() == 0 and torch.equal(a["loss"], a["denoising"])


def test_autocast_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = random_model(z_dims=[24], encoder_depth=2)
    args = (model, torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), [torch.randn(4, 16, 24)])
    kw = dict(t=torch.rand(4), noise=torch.randn(4, 4, 8, 8))
    fp32 = training_loss(*args, **kw)
    bf16 = training_loss(*args, **kw, autocast_dtype=torch.bfloat16)
    assert bf16["loss"].dtype == torch.float32
    assert abs(bf16["loss"].item() - fp32["loss"].item()) < 0.02 * abs(fp32["loss"].item())
    assert bf16["loss"].item() != fp32["loss"].item()  # autocast really ran


def test_bad_choices_and_grid_mismatch_errors():
    model = random_model(z_dims=[24], encoder_depth=2)
    x0, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,))
    with pytest.raises(ValueError, match="path_type='edm'"):
        training_loss(model, x0, y, None, path_type="edm")
    with pytest.raises(ValueError, match="weighting='sigmoid'"):
        training_loss(model, x0, y, None, weighting="sigmoid")
    with pytest.raises(ValueError, match="prediction='eps'"):
        training_loss(model, x0, y, None, prediction="eps")
    with pytest.raises(ValueError, match=r"SiT has 16 tokens \(4x4\) but the encoder gives 256 \(16x16\)"):
        training_loss(model, x0, y, [torch.randn(2, 256, 24)])
    with pytest.raises(ValueError, match="projector 0 outputs 24 channels but encoder 0 gives 32"):
        training_loss(model, x0, y, [torch.randn(2, 16, 32)])
    with pytest.raises(ValueError, match="1 projector"):
        training_loss(model, x0, y, [torch.randn(2, 16, 24)] * 2)


def test_losses_keep_float64_inputs_in_float64():
    """Losses compute in at least fp32 and never below the input precision: float64 inputs give float64 results
    that equal a float64 recomputation to ~1e-12 (a `.float()` cast inside the losses differs by ~1e-8)."""
    torch.manual_seed(5)
    pred, target = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    den = denoising_loss(pred, target)
    assert den.dtype == torch.float64
    assert abs(den.item() - ((pred - target) ** 2).mean(dim=(1, 2, 3)).mean().item()) < 1e-12
    preds = [torch.randn(3, 16, 24, dtype=torch.float64), torch.randn(3, 16, 40, dtype=torch.float64)]
    targets = [torch.randn_like(p) * 3 for p in preds]
    align = alignment_loss_ref(preds, targets)
    assert align.dtype == torch.float64
    assert abs(align.item() - reference_proj_loss(targets, preds).item()) < 1e-12
    # Low precision still goes up to fp32, never stays in bf16.
    assert denoising_loss(pred.bfloat16(), target.bfloat16()).dtype == torch.float32
    assert alignment_loss_ref([p.bfloat16() for p in preds], [z.bfloat16() for z in targets]).dtype == torch.float32


def test_training_loss_of_a_float64_model_equals_float64_recomputation():
    torch.manual_seed(6)
    model = random_model(z_dims=[24], encoder_depth=2).double()
    x0, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (2,))
    t, noise = torch.rand(2, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    targets = [torch.randn(2, 16, 24, dtype=torch.float64)]
    out = training_loss(model, x0, y, targets, t=t, noise=noise, proj_coeff=0.7, impl="ref")
    td = t[:, None, None, None]
    v_hat, zs = model(x0 * (1 - td) + td * noise, t, y)
    total = ((v_hat - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).mean() + 0.7 * reference_proj_loss(targets, zs)
    assert out["loss"].dtype == torch.float64
    assert abs(out["loss"].item() - total.item()) < 1e-12 * max(1.0, abs(total.item()))


def test_interpolant_is_one_function_for_tensors_and_floats():
    """The samplers call it with Python floats, training with tensors: same numbers, bit for bit in float64."""
    for path in ("linear", "cosine"):
        for t in (0.0, 0.04, 0.3, 0.77, 1.0):
            floats = interpolant(t, path)
            tensors = interpolant(torch.tensor([t], dtype=torch.float64), path)
            assert all(isinstance(f, float) for f in floats)
            assert [f for f in floats] == [x.item() for x in tensors]
    with pytest.raises(ValueError, match="path_type"):
        interpolant(0.5, "edm")
