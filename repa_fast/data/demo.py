"""The embedded demo dataset: scikit-learn's handwritten digits in pixel space.

1797 greyscale 8x8 digits (values 0..16 = ink), 10 classes, shipped inside scikit-learn (no download).
Images: ink / 16 in [0, 1] (bright digit on black, like MNIST), bilinear upsampling to R x R
(``F.interpolate``, align_corners=False: smooth strokes rather than 4x4 blocks, so the images look like
natural-image crops to the encoder), rounded to uint8 and replicated to RGB.
Moments: [image / 127.5 - 1 (3 channels), zeros (3 channels)], i.e. a posterior with std 0, so the loop's
``x0 = (mean + std * eps) * scale`` gives exactly the [-1, 1] pixels (the demo preset sets scale 1.0), the
same scaling the SD-VAE sees its input in (docs/objective.md §Latents). latent_shape = (6, R, R).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .common import DataError, LatentDataset


def _load_digits():
    from repa_fast.errors import require

    return require("sklearn.datasets", "demo", "the demo dataset", "scikit-learn").load_digits()


def digits_to_uint8(digits: np.ndarray, resolution: int) -> torch.Tensor:
    """(N, 8, 8) ink values 0..16 -> (N, 3, R, R) uint8 (module doc)."""
    x = torch.from_numpy(np.asarray(digits, dtype=np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, R, R)


class DigitsDataset(LatentDataset):
    """scikit-learn digits as (image, moments, label) items; everything precomputed (5.5 MB at 32 px)."""

    def __init__(self, resolution: int = 32, *, num_classes: int = 10):
        if int(resolution) < 8:
            raise DataError(f"DigitsDataset: resolution {resolution} is below the digits' native 8 px; use 8 or more")
        if num_classes < 10:
            raise DataError(f"DigitsDataset: the digits have 10 classes, num_classes={num_classes} is too small")
        bunch = _load_digits()
        self.path = "sklearn.datasets.load_digits"
        self.resolution = int(resolution)
        self.num_classes = int(num_classes)
        self.images = digits_to_uint8(bunch.images, self.resolution)  # (N, 3, R, R) uint8
        self.labels = torch.as_tensor(bunch.target, dtype=torch.int64)  # (N,)
        self.latent_shape = (6, self.resolution, self.resolution)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, idx: int):
        image = self.images[idx]
        mean = image.to(torch.float32) / 127.5 - 1.0  # the VAE input scaling, docs/objective.md §Latents
        moments = torch.cat([mean, torch.zeros_like(mean)], dim=0)  # (6, R, R): std 0 -> x0 = pixels
        return image.clone(), moments, self.labels[idx].clone()
