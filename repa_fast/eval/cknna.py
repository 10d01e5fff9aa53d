"""CKNNA and mutual k-NN alignment between a SiT's layers and a target encoder (REPA Fig. 2/3 style).

    python -m repa_fast.eval.cknna --ckpt RUN_DIR --t 0.5 --num-images 1024 [--enc-type dinov2-vit-b] [--out DIR]

Metric, as Huh et al. 2024 ("The Platonic Representation Hypothesis") define it in their metric function
(minyoungg/platonic-rep ``metrics.py``, ``AlignmentMetrics.cknna``, k = 10, unbiased):
- features are L2-normalised per row and K = A A^T, L = B B^T (their ``measure_alignment.py`` normalises first);
- each row's top-k neighbours exclude the row itself (the diagonal is -inf before the top-k);
- the mask is the intersection of the two top-k masks; HSIC_unbiased (Song et al. 2012, Eq. 5) of (mask * K,
  mask * L), and CKNNA = HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6), with HSIC(K, K) computed on K's own
  mask;
- **no outlier clipping**: their driver script clips features at the 0.95 quantile before calling the metric
  (``measure_alignment.py``, ``remove_outliers``); we do not, so numbers are the metric's, not the driver's.
Mutual k-NN (same file, ``mutual_knn``): mean over rows of |kNN_A(i) ∩ kNN_B(i)| / k, the row itself excluded.

Protocol (REPA maintainers, sihyun-yu/REPA issue 24): the noisy input x_t at a given t, the null class label,
each block's output averaged over patches, against the target encoder's patch tokens averaged over patches on the
clean image; N images of the run's dataset. Writes ``cknna_t<t>.csv`` and ``.png`` (score vs layer).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from repa_fast import errors
from repa_fast.config import ConfigError


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator, Song et al. 2012 Eq. 5 (diagonals zeroed). K, L: (n, n), n >= 4."""
    n = K.shape[0]
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    value = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2)) - 2 * (Kt @ Lt).sum() / (n - 2)
    return value / (n * (n - 3))


def _topk_mask(K: torch.Tensor, k: int) -> torch.Tensor:
    """(n, n) 0/1: each row's k largest entries of K, its own diagonal excluded."""
    idx = K.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices
    return torch.zeros_like(K).scatter_(1, idx, 1.0)


def _kernels(a: torch.Tensor, b: torch.Tensor, k: int):
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise ValueError(f"need two (N, D) feature sets over the same N images, got {tuple(a.shape)}, {tuple(b.shape)}")
    if not 2 <= k < len(a):
        raise ValueError(f"k = {k} must satisfy 2 <= k < N = {len(a)}")
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return a @ a.T, b @ b.T


def cknna(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """CKNNA between (N, Da) and (N, Db) features of the same images (module doc)."""
    K, L = _kernels(a, b, k)
    mK, mL = _topk_mask(K, k), _topk_mask(L, k)

    def sim(X, mX, Y, mY):
        m = mX * mY
        return hsic_unbiased(m * X, m * Y)

    kl, kk, ll = sim(K, mK, L, mL), sim(K, mK, K, mK), sim(L, mL, L, mL)
    return float(kl / (torch.sqrt(kk * ll) + 1e-6))


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean share of common k nearest neighbours (cosine), the point itself excluded."""
    K, L = _kernels(a, b, k)
    return float((_topk_mask(K, k) * _topk_mask(L, k)).sum(1).div(k).mean())


def parse_args(argv=None):
    """(layer-feature options, k) from the command line."""
    from repa_fast import cli_flags
    from repa_fast.options import LayerFeatureOptions

    p = cli_flags.parser("python -m repa_fast.eval.cknna", __doc__)
    cli_flags.add_layer_feature_flags(p)
    p.add_argument("--k", type=int, default=10, help="neighbours (Huh et al.: 10)")
    ns = p.parse_args(argv)
    return cli_flags.options_from(ns, LayerFeatureOptions), ns.k


def layer_scores(feats, k: int = 10) -> list[dict]:
    """CKNNA and mutual k-NN of every layer's features against the target's, one row per layer (1-indexed)."""
    return [
        {"layer": i + 1, "cknna": cknna(h, feats.target, k), "mutual_knn": mutual_knn(h, feats.target, k)}
        for i, h in enumerate(feats.layers)
    ]


@errors.entry_point("python -m repa_fast.eval.cknna")
def main(argv=None) -> int:
    from repa_fast.eval.layer_features import collect_layer_features, write_scores

    opts, k = parse_args(argv)
    if k < 2 or k >= opts.num_images:
        raise ConfigError(f"--k {k} must be >= 2 and below --num-images {opts.num_images}")
    feats = collect_layer_features(opts)
    rows = layer_scores(feats, k)
    title = f"CKNNA vs {feats.target_name}, t = {opts.t}"
    path = write_scores(rows, feats.out_dir(opts), f"cknna_t{opts.t}", "cknna", title)
    best = max(rows, key=lambda r: r["cknna"])
    print(f"wrote {path}: best layer {best['layer']} (CKNNA {best['cknna']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
