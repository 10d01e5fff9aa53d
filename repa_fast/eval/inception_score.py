"""Inception Score as OpenAI's ADM evaluator computes it (``Evaluator.compute_inception_score``).

    IS = mean over splits of exp( mean_i KL(p(y|x_i) || p(y)) )            (Salimans et al. 2016)

ADM's choices, kept: p(y|x) = softmax(pool3 @ W) with the 2048x1008 ``softmax/logits/MatMul`` weight and **no
bias**; the splits are **consecutive** chunks of 5000 samples in file order (no shuffling; the last chunk may be
shorter); the result is the mean of the per-split scores only (no standard deviation). The softmax is float32 (TF
graph), the KL arithmetic is numpy on those float32 probabilities.
"""

from __future__ import annotations

import numpy as np


def softmax_float32(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float32 (max-subtracted, as tf.nn.softmax)."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """IS of (N, K) class probabilities (rows sum to 1), over consecutive splits of ``split_size``."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"inception_score: expected (N, K) probabilities, got shape {probs.shape}")
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 = nan in ADM too; mask it to 0 (its limit)
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        kl = np.where(part > 0, kl, 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))
