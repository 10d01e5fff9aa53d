"""CKNNA and mutual k-NN against direct implementations; invariances; the CKNNA and linear-probe CLIs on a tiny run."""

import csv
import os

import numpy as np
import pytest
import torch

from repa_fast.eval.cknna import cknna, hsic_unbiased, mutual_knn
from repa_fast.eval.linear_probe import train_probe


def direct_hsic(K, L):
    """Song et al. 2012 Eq. 5 written out term by term, in float64 loops."""
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    t1 = sum(Kt[i, j] * Lt[j, i] for i in range(n) for j in range(n))
    t2 = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    t3 = 2 * sum(Kt[i, j] * Lt[j, m] for i in range(n) for j in range(n) for m in range(n)) / (n - 2)
    return (t1 + t2 - t3) / (n * (n - 3))


def direct_cknna(a, b, k):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    K, L = a @ a.T, b @ b.T
    n = len(a)

    def knn(M):
        mask = np.zeros((n, n))
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: -M[i, j])[:k]
            mask[i, others] = 1
        return mask

    mK, mL = knn(K), knn(L)
    kl = direct_hsic(mK * mL * K, mK * mL * L)
    kk, ll = direct_hsic(mK * K, mK * K), direct_hsic(mL * L, mL * L)
    return kl / (np.sqrt(kk * ll) + 1e-6), np.mean((mK * mL).sum(1) / k)


def test_hsic_matches_the_written_out_formula():
    rng = np.random.default_rng(0)
    K, L = rng.standard_normal((9, 9)), rng.standard_normal((9, 9))
    assert hsic_unbiased(torch.tensor(K), torch.tensor(L)).item() == pytest.approx(direct_hsic(K, L), rel=1e-10)


def test_cknna_and_mutual_knn_match_direct_implementation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((24, 6))
    b = a @ rng.standard_normal((6, 5)) + 0.8 * rng.standard_normal((24, 5))  # related but not identical
    want_cknna, want_mknn = direct_cknna(a, b, k=5)
    assert cknna(torch.tensor(a), torch.tensor(b), k=5) == pytest.approx(want_cknna, rel=1e-8, abs=1e-10)
    assert mutual_knn(torch.tensor(a), torch.tensor(b), k=5) == pytest.approx(want_mknn, rel=1e-12)
    assert 0.05 < want_cknna < 0.95  # a non-trivial case


def test_cknna_invariances_and_identity():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(60, 16, generator=g), torch.randn(60, 12, generator=g)
    b = b + a[:, :12]
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    base = cknna(a, b)
    assert cknna(a.double() @ q, b) == pytest.approx(base, abs=1e-9)  # orthogonal transform of A
    assert cknna(a, 7.5 * b) == pytest.approx(base, abs=1e-9)  # isotropic scaling of B
    assert cknna(0.01 * a, b) == pytest.approx(base, abs=1e-9)
    assert cknna(a, a.clone()) == pytest.approx(1.0, abs=2e-4)  # 1 up to the metric's +1e-6 in the denominator
    assert mutual_knn(a, a.clone()) == 1.0
    assert cknna(a, b) != pytest.approx(cknna(a, torch.randn(60, 12, generator=g)), abs=1e-3)


def test_cknna_rejects_bad_k():
    with pytest.raises(ValueError, match="k = 10"):
        cknna(torch.randn(8, 3), torch.randn(8, 3))


def test_linear_probe_learns_a_linear_rule():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 10, generator=g) * 5 + 3  # BatchNorm takes care of scale and offset
    y = (x[:, 0] - x[:, 1] > 0).long() + 2 * (x[:, 2] > 3).long()
    acc = train_probe(x[:500], y[:500], x[500:], y[500:], num_classes=4, epochs=30, batch_size=50)
    assert acc > 0.9
    shuffled = train_probe(x[:500], y[:500][torch.randperm(500, generator=g)], x[500:], y[500:], 4, 10, 50)
    assert shuffled < 0.6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from repa_fast.engine.trainer import train

    from ..engine.helpers import tiny_cfg

    return train(tiny_cfg(tmp_path_factory.mktemp("rep"), steps=2, ckpt_every=2))["run_dir"]


def test_cknna_and_linear_probe_clis_on_a_tiny_run(run_dir, tmp_path):
    from repa_fast.eval import cknna as cknna_cli
    from repa_fast.eval import linear_probe
    from repa_fast.eval.layer_features import collect_layer_features

    out = str(tmp_path)
    assert cknna_cli.main(["--ckpt", run_dir, "--num-images", "40", "--k", "5", "--t", "0.25", "--out", out]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "cknna_t0.25.csv"))))
    assert [int(r["layer"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    assert os.path.getsize(os.path.join(out, "cknna_t0.25.png")) > 1000
    # The CSV holds the metric of the collected features (and the random demo target is the training one).
    from repa_fast.options import LayerFeatureOptions

    args = LayerFeatureOptions(ckpt=run_dir, weights="ema", t=0.25, num_images=40, batch_size=64, seed=0, out=out)
    feats = collect_layer_features(args)
    for r, h in zip(rows, feats.layers):
        assert float(r["cknna"]) == pytest.approx(cknna(h, feats.target, 5), abs=1e-6)
    again = collect_layer_features(args)
    assert torch.equal(again.target, feats.target) and all(map(torch.equal, again.layers, feats.layers))

    argv = ["--ckpt", run_dir, "--num-images", "60", "--val-images", "20", "--epochs", "2", "--out", out]
    assert linear_probe.main(argv) == 0
    rows = list(csv.DictReader(open(os.path.join(out, "linear_probe_t0.5.csv"))))
    assert len(rows) >= 2 and all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    assert linear_probe.main([*argv[:4], "--val-images", "5000"]) == 2  # more than the dataset: an error
