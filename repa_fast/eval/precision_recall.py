"""Improved Precision and Recall (Kynkäänniemi et al. 2019) as OpenAI's ADM evaluator computes them.

ADM (guided-diffusion ``evaluations/evaluator.py``, ``ManifoldEstimator`` and ``DistanceBlock``), kept here:
- distances are **squared** Euclidean, ``max(|u|^2 - 2 u.v + |v|^2, 0)``, computed in **float16** (the features
  are cast to fp16 first); a block of up to 10000 x 10000 pairs that has any non-finite fp16 value is recomputed
  in float32; the result is stored as float32;
- the radius of a point is its distance to the k-th nearest neighbour **counting itself** (k = 3: the 4th smallest
  distance of its row, ``np.partition(..., kth=3)``), with no percentile clamping;
- precision = share of samples inside at least one reference ball, recall = share of reference points inside at
  least one sample ball, with ``<=``.
The fp16 arithmetic is emulated op by op: each of norm, matmul, product by 2, the two sums and the max is rounded to
fp16 as a TF fp16 kernel would round its output (accumulation inside the norm and the matmul is float32).
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 10000  # ADM's row_batch_size = col_batch_size


def _distances(u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ADM's ``_batch_pairwise_distances`` with every op's output rounded to ``dtype``. (n, D), (m, D) -> (n, m)."""
    u, v = u.to(dtype), v.to(dtype)
    norm_u = (u.float() ** 2).sum(1).to(dtype)[:, None]  # (n, 1)
    norm_v = (v.float() ** 2).sum(1).to(dtype)[None, :]  # (1, m)
    uv = (u.float() @ v.float().T).to(dtype)  # (n, m): float32 accumulation, fp16 output
    return torch.clamp_min(norm_u - 2 * uv + norm_v, 0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances, fp16 unless non-finite there (then float32), returned as float32 (ADM ``DistanceBlock``)."""
    d16 = _distances(u, v, torch.float16)
    if torch.isfinite(d16).all():
        return d16.float()
    return _distances(u, v, torch.float32)


def manifold_radii(features: np.ndarray, k: int = 3, block: int = BLOCK, device=None) -> np.ndarray:
    """(N,) float32: squared distance to the k-th neighbour, self included (ADM ``manifold_radii``)."""
    f = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    radii = np.zeros(len(f), dtype=np.float32)
    for b1 in range(0, len(f), block):
        rows = torch.cat(
            [pairwise_distances(f[b1 : b1 + block], f[b2 : b2 + block]) for b2 in range(0, len(f), block)], 1
        )
        radii[b1 : b1 + block] = torch.kthvalue(rows.cpu(), k + 1, dim=1).values.numpy()
    return radii


def precision_recall(
    ref: np.ndarray, samples: np.ndarray, k: int = 3, block: int = BLOCK, device=None
) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``ref`` features, both (N, D) (ADM ``compute_prec_recall``)."""
    r1 = torch.as_tensor(manifold_radii(ref, k, block, device), device=device)
    r2 = torch.as_tensor(manifold_radii(samples, k, block, device), device=device)
    f1 = torch.as_tensor(np.asarray(ref, dtype=np.float32), device=device)
    f2 = torch.as_tensor(np.asarray(samples, dtype=np.float32), device=device)
    ref_in = torch.zeros(len(f1), dtype=torch.bool, device=device)  # ref point inside some sample ball -> recall
    sample_in = torch.zeros(len(f2), dtype=torch.bool, device=device)  # sample inside some ref ball -> precision
    for b1 in range(0, len(f1), block):
        for b2 in range(0, len(f2), block):
            d = pairwise_distances(f1[b1 : b1 + block], f2[b2 : b2 + block])  # (n1, n2)
            ref_in[b1 : b1 + block] |= (d <= r2[None, b2 : b2 + block]).any(1)
            sample_in[b2 : b2 + block] |= (d <= r1[b1 : b1 + block, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
