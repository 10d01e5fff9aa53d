"""Known-answer tests of the ADM metrics: Fréchet distance, Inception Score, Precision/Recall."""

import numpy as np
import pytest
import scipy.linalg
import torch

from repa_fast.eval import fid as fid_mod
from repa_fast.eval.fid import FeatureStats, FrechetError, frechet_distance
from repa_fast.eval.inception_score import inception_score, softmax_float32
from repa_fast.eval.precision_recall import manifold_radii, pairwise_distances, precision_recall


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_matches_direct_scipy_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # Symmetric SPD closed form: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2)
    r1 = scipy.linalg.sqrtm(s1).real
    alt = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(alt, rel=1e-8)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    v1, v2 = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_of_identical_features_is_zero_and_stats_dtypes_are_adm():
    acts = np.random.default_rng(2).standard_normal((300, 32)).astype(np.float32)
    s = FeatureStats.from_features(acts)
    assert s.mu.dtype == np.float32 and s.sigma.dtype == np.float64  # np.mean / np.cov as ADM
    assert abs(s.frechet_distance(FeatureStats.from_features(acts.copy()))) < 1e-6
    assert s.frechet_distance(FeatureStats.from_features(acts + 1)) == pytest.approx(32, rel=1e-5)


def test_frechet_eps_fallback_when_sqrtm_is_not_finite(monkeypatch, caplog):
    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.standard_normal(5), rng.standard_normal(5), random_spd(rng, 5), random_spd(rng, 5)
    real, calls = fid_mod._sqrtm, []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fid_mod, "_sqrtm", flaky)
    got = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    off = np.eye(5) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(real((s1 + off) @ (s2 + off)).real)
    assert got == pytest.approx(expected, rel=1e-10)
    assert "singular" in caplog.text


def test_frechet_shape_mismatch_is_a_clear_error():
    with pytest.raises(FrechetError, match="same feature network"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_known_answers():
    k = 7
    assert inception_score(np.full((100, k), 1 / k)) == pytest.approx(1.0, abs=1e-6)
    onehot = np.eye(k)[np.arange(700) % k]
    assert inception_score(onehot) == pytest.approx(k, rel=1e-6)
    # Consecutive splits (no shuffling): each split holds one class only -> IS 1 per split, not 2.
    two = np.eye(2)[np.repeat([0, 1], 50)]
    assert inception_score(two, split_size=50) == pytest.approx(1.0, abs=1e-6)
    assert inception_score(two, split_size=100) == pytest.approx(2.0, rel=1e-6)


def test_inception_score_matches_formula_on_random_logits():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((250, 11)).astype(np.float32) * 3
    p = softmax_float32(logits).astype(np.float64)
    expected = []
    for part in (p[:100], p[100:200], p[200:]):
        m = part.mean(0)
        expected.append(np.exp(np.mean(np.sum(part * np.log(part / m), 1))))
    assert inception_score(softmax_float32(logits), split_size=100) == pytest.approx(np.mean(expected), rel=1e-5)


def brute_force_pr(ref, samples, k=3, fp16=True):
    """Direct numpy Precision/Recall: all pairwise distances, radius = (k+1)-th smallest incl. self."""

    def dist(u, v):
        if not fp16:
            u, v = u.astype(np.float64), v.astype(np.float64)
            return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        nu = (u16.astype(np.float32) ** 2).sum(1).astype(np.float16)[:, None]
        nv = (v16.astype(np.float32) ** 2).sum(1).astype(np.float16)[None, :]
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        return np.maximum(nu - np.float16(2) * uv + nv, np.float16(0)).astype(np.float32)

    r_ref = np.sort(dist(ref, ref), 1)[:, k]
    r_s = np.sort(dist(samples, samples), 1)[:, k]
    d = dist(ref, samples)  # (n_ref, n_samples)
    precision = np.mean([(d[:, j] <= r_ref).any() for j in range(len(samples))])
    recall = np.mean([(d[i, :] <= r_s).any() for i in range(len(ref))])
    return precision, recall


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((300, 8)).astype(np.float32)
    samples = (rng.standard_normal((250, 8)) * 0.8 + 0.3).astype(np.float32)
    p, r = precision_recall(ref, samples)
    bp, br = brute_force_pr(ref, samples)
    assert abs(p - bp) <= 1 / 250 and abs(r - br) <= 1 / 300  # one float32 matmul-order tie at most
    ep, er = brute_force_pr(ref, samples, fp16=False)
    assert abs(p - ep) <= 0.02 and abs(r - er) <= 0.02  # fp16 distances move few points
    assert 0.2 < p < 0.99 and 0.2 < r < 0.99  # the test is not trivially (1, 1) or (0, 0)
    assert precision_recall(ref, samples, block=64) == (p, r)  # ADM's 10k blocks, here 64: same answer


def test_precision_recall_identical_sets_is_one_one():
    x = np.random.default_rng(6).standard_normal((200, 16)).astype(np.float32)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_radius_counts_self_and_distances_fall_back_to_fp32():
    x = np.random.default_rng(7).standard_normal((50, 8)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(manifold_radii(x), np.sort(d, 1)[:, 3], rtol=2e-3, atol=2e-3)
    big = torch.tensor([[300.0, 0.0], [0.0, 0.0]])  # |u|^2 = 90000 overflows fp16 -> float32 path
    out = pairwise_distances(big, big)
    assert torch.isfinite(out).all() and out[0, 1].item() == pytest.approx(90000.0)
