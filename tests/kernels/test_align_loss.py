"""Alignment loss kernel vs the float64 reference and the reference REPA per-sample loop."""

import pytest
import torch
import torch.nn.functional as F

from repa_fast.kernels import align_loss
from repa_fast.kernels.align_loss import alignment_loss, alignment_loss_ref, cosine_similarity_rows
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64


def _repa_loop(zs, zs_tilde):
    """REPA's SILoss projection term (loss.py:80-88): a loop over encoders and samples of -mean_t cos."""
    proj_loss, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            cos = (F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)
            proj_loss = proj_loss + (-cos).mean()
    return proj_loss / (len(zs) * bsz)


def _loss(impl, K):
    return lambda *t: alignment_loss(list(t[:K]), list(t[K:]), impl=impl)


@pytest.mark.parametrize("shapes", [[(3, 9, 768)], [(1, 7, 1152)], [(2, 5, 130), (2, 5, 768)]])
def test_alignment_loss_fp32(shapes):
    """K = len(shapes) encoders; the gradient reaches the projector outputs only (targets are frozen)."""
    preds = [torch.randn(s, requires_grad=True) for s in shapes]
    targets = [torch.randn(s) for s in shapes]
    check_against_fp64(
        _loss("triton", len(shapes)),
        _loss("ref", len(shapes)),
        preds + targets,
        ["reduction"],
        ["elementwise"] * len(shapes),
    )


def test_reference_equals_repa_per_sample_loop():
    preds = [torch.randn(3, 9, 130, dtype=torch.float64), torch.randn(3, 9, 64, dtype=torch.float64)]
    targets = [torch.randn_like(p) for p in preds]
    expected = _repa_loop(targets, preds)
    assert_close(alignment_loss_ref(preds, targets), expected)
    assert_close(
        alignment_loss([p.float() for p in preds], [z.float() for z in targets], impl="triton"), expected, "reduction"
    )


def test_cosine_rows_both_gradients():
    """The per-row op is differentiable in the target too (dz path), for callers that train both sides."""
    p, z = torch.randn(2, 5, 130, requires_grad=True), torch.randn(2, 5, 130, requires_grad=True)
    check_against_fp64(
        lambda p, z: cosine_similarity_rows(p, z, impl="triton"),
        lambda p, z: align_loss.cosine_similarity_rows_ref(p, z),
        [p, z],
        ["elementwise"],
        ["elementwise", "elementwise"],
    )


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float32])
def test_bf16_projector_output(target_dtype):
    """bf16 projector output (autocast) against bf16 or fp32 targets: fp32 math, dp stored in bf16."""
    p = torch.randn(2, 5, 768, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(2, 5, 768).to(target_dtype)
    _, grads = check_against_fp64(_loss("triton", 1), _loss("ref", 1), [p, z], ["reduction"], ["elementwise"])
    assert grads[0].dtype == torch.bfloat16


def test_zero_rows_follow_normalize_eps_semantics():
    """Rows with |p| < eps (normalize divides by eps; no gradient through the clamped norm: dp = z_hat / eps),
    an exactly zero prediction row, and a zero target row (cos = 0)."""
    p = torch.randn(1, 6, 130, dtype=torch.float64)
    z = torch.randn(1, 6, 130, dtype=torch.float64)
    p[0, 1] = 0.0
    p[0, 2] *= 1e-14
    z[0, 4] = 0.0
    p.requires_grad_()
    check_against_fp64(
        _loss("triton", 1),
        _loss("ref", 1),
        [p.float().detach().requires_grad_(), z.float()],
        ["reduction"],
        ["elementwise"],
    )


def test_small_tiles_many_programs(monkeypatch):
    monkeypatch.setattr(align_loss, "_launch_config", lambda n_rows, D, dev: (2, 256, 4))
    p, z = torch.randn(1, 7, 130, requires_grad=True), torch.randn(1, 7, 130)
    check_against_fp64(_loss("triton", 1), _loss("ref", 1), [p, z], ["reduction"], ["elementwise"])


def test_bad_inputs_raise_clear_errors():
    p = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="one prediction per target"):
        alignment_loss([p], [p, p])
    with pytest.raises(ValueError, match="z_dim"):
        alignment_loss([p], [torch.randn(2, 4, 9)], impl="triton")
