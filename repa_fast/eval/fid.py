"""Fréchet distance between Gaussians fitted to features, computed as OpenAI's ADM evaluator computes it.

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))           (Heusel et al. 2017, Eq. 6)

ADM (guided-diffusion ``evaluations/evaluator.py``, ``FIDStatistics.frechet_distance`` and ``compute_statistics``):
- statistics: ``mu = np.mean(acts, 0)`` keeps the float32 dtype of the activations, ``sigma = np.cov(acts,
  rowvar=False)`` is float64 (numpy promotes); we keep both dtypes, so ``mu1 - mu2`` is formed in float32 as there;
- ``scipy.linalg.sqrtm(S1 @ S2)``; if the result is not finite, retry with ``eps * I`` added to both covariances;
- a complex result is accepted when its diagonal's imaginary part is within 1e-3 of 0 (then the real part is kept),
  otherwise it is an error.
ADM calls ``sqrtm(..., disp=False)``; SciPy 1.18 removed ``disp``. With or without it, sqrtm returns the same
matrix (``disp`` only chose between printing and returning an error estimate that ADM discards), so we call
``sqrtm(A)`` and keep ADM's non-finite check and eps fallback.

The same code serves FID (Inception pool3, 2048-d), sFID (Inception mixed_6/conv, 2023-d) and the demo's
FD-digits (a digits classifier's features).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from repa_fast.errors import UserError

logger = logging.getLogger("repa_fast")


MIN_SAMPLES = 2  # feature vectors a covariance needs: the smallest N of FID-N (the one source; config.check_eval)


class FrechetError(UserError, ValueError):
    """The Fréchet distance cannot be computed from these statistics (mismatched shapes, complex sqrtm)."""


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: ``mu`` (float32 as ADM), ``sigma`` (float64)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    @classmethod
    def from_features(cls, acts: np.ndarray) -> FeatureStats:
        """``np.mean`` and ``np.cov(rowvar=False)`` of (N, D) activations, as ADM's ``compute_statistics``."""
        acts = np.asarray(acts)
        if acts.ndim != 2 or acts.shape[0] < MIN_SAMPLES:
            raise FrechetError(f"need at least {MIN_SAMPLES} feature vectors of shape (N, D), got {acts.shape}")
        return cls(np.mean(acts, axis=0), np.cov(acts, rowvar=False))

    def frechet_distance(self, other: FeatureStats, eps: float = 1e-6) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    try:
        from scipy import linalg
    except ImportError as e:
        raise ImportError("the Fréchet distance needs SciPy: pip install 'repa_fast[eval]'") from e
    out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out  # (sqrtm, errest) only if a SciPy ever returns both


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), with ADM's numerics (module doc)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise FrechetError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(were they computed with the same feature network and layer?)"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # ADM: "product might be almost singular"
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals (as ADM)", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a small imaginary part (ADM's tolerance: 1e-3)
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FrechetError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
