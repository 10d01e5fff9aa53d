"""A small digits classifier whose features stand in for Inception on the embedded demo ("FD-digits").

Trained once on scikit-learn's digits (the demo's data, at 16 px, labels used: it is a measuring instrument, not
the REPA target, so the measure is not circular) and cached as safetensors; a few seconds on one CPU core.
Features, in the evaluator's vocabulary: ``pool`` (N, 64) global-average-pooled last conv, ``spatial``
(N, 8 * 8 * 4 = 256) the first 4 channels of the 8x8 conv map flattened NHWC (as ADM's sFID), ``logits`` (N, 10).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.io import atomic_path, ensure_cache_dir

logger = logging.getLogger("repa_fast")

RESOLUTION = 16
FILE = "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    metric_names = {"fid": "FD-digits", "sfid": "sFD-digits", "is": "IS-digits"}
    has_logits = True
    feature_dims = {"pool": 64, "spatial": 256}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)  # (32, 8, 8)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # (64, 4, 4)
        self.fc = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N, 3, H, W) -> features (module doc)."""
        x = images.float() / 127.5 - 1
        if x.shape[-1] != RESOLUTION:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=True)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        spatial = h[:, :4].permute(0, 2, 3, 1).reshape(len(x), -1)  # (N, 256), NHWC
        pool = F.relu(self.conv3(h)).mean(dim=(2, 3))  # (N, 64)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}


def digits_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's digits as uint8 (N, 3, R, R) and their labels (repa_fast.data.demo)."""
    from repa_fast.data.demo import _load_digits, digits_to_uint8

    bunch = _load_digits()
    return digits_to_uint8(bunch.images, resolution), torch.as_tensor(bunch.target, dtype=torch.int64)


def train_digits_classifier(epochs: int = 20, seed: int = 0, holdout: int = 297) -> tuple[DigitsClassifier, float]:
    """Train on all but the last ``holdout`` digits; returns (model, held-out top-1 accuracy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsClassifier()
    images, labels = digits_images()
    n = len(images) - holdout
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(64):
            x = images[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 px translation: robust to sample jitter
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x)["logits"], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(images[n:])["logits"].argmax(1) == labels[n:]).float().mean().item()
    return net, acc


def load_digits_classifier(cache_dir: str, device=None) -> DigitsClassifier:
    """The cached classifier from ``cache_dir``, trained (and written atomically) on first use."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_dir, FILE)
    net = DigitsClassifier()
    if os.path.isfile(path):
        net.load_state_dict(load_file(path))
    else:
        ensure_cache_dir(cache_dir, "--cache-dir (train.py: --eval-cache-dir)")  # before the training, not after
        net, acc = train_digits_classifier()
        logger.info("trained the digits feature network: held-out accuracy %.3f; cached in %s", acc, path)

        weights = {k: v.contiguous() for k, v in net.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(weights, tmp, metadata={"accuracy": f"{acc:.4f}"})
    return net.eval().requires_grad_(False).to(device or "cpu")


def digits_accuracy(net: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = net(torch.from_numpy(images).permute(0, 3, 1, 2))["logits"].argmax(1).numpy()
    return float((pred == labels).mean())
