"""What every dataset shares: the error type, the per-sample checks and the (image, moments, label) contract.

A dataset item is ``(image, moments, label)``:
  image   uint8 (3, R, R), the ADM-cropped RGB image the target encoder sees (docs/objective.md §Alignment targets);
  moments float32 (2C, h, w), the VAE posterior [mean, std] stacked on the channel axis (docs/objective.md §Latents),
          from which the loop draws x0 = (mean + std * eps) * scale;
  label   int64 scalar in [0, num_classes).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from repa_fast.errors import UserError

FLOAT_MOMENT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class DataError(UserError, ValueError):
    """Bad training data: the message names the file (or row), the field and the fix."""


class LatentDataset(Dataset):
    """Base of every dataset the loop consumes; subclasses set the attributes below in ``__init__``."""

    resolution: int  # R: images are (3, R, R)
    num_classes: int
    latent_shape: tuple[int, int, int]  # (2C, h, w) of the stored moments
    path: str

    def read_latent(self, idx: int):
        """``(moments, label)`` of item ``idx``; subclasses skip reading the image (cached targets need none)."""
        _image, moments, label = self[idx]
        return moments, label

    def describe(self) -> str:
        c2, h, w = self.latent_shape
        return (
            f"{type(self).__name__}({self.path}): {len(self)} samples, images 3x{self.resolution}x{self.resolution}"
            f" uint8, moments {c2}x{h}x{w}, {self.num_classes} classes"
        )


def check_image(image: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """``image`` (3, R, R) uint8, else a DataError naming ``where``."""
    if image.dtype != np.uint8:
        raise DataError(f"{where}: image dtype is {image.dtype}, expected uint8; re-run preprocessing")
    if image.shape != (3, resolution, resolution):
        got = "x".join(str(s) for s in image.shape)
        raise DataError(
            f"{where}: image has shape {got} (C x H x W), expected 3x{resolution}x{resolution}; every image must be "
            f"RGB at the dataset resolution (re-run preprocessing with --resolution {resolution}, or pass the "
            "resolution the data was made at)"
        )
    return image


def check_moments(moments: np.ndarray, latent_shape: tuple, where: str) -> np.ndarray:
    """``moments`` of ``latent_shape``, float32/float16 and finite; returned as float32."""
    if moments.dtype not in FLOAT_MOMENT_DTYPES:
        raise DataError(f"{where}: moments dtype is {moments.dtype}, expected float32 or float16; re-encode")
    if tuple(moments.shape) != tuple(latent_shape):
        raise DataError(
            f"{where}: moments have shape {tuple(moments.shape)}, expected {tuple(latent_shape)} like the rest of the "
            "dataset ([mean, std] of the VAE posterior stacked on the channel axis); re-encode this file"
        )
    moments = np.asarray(moments, dtype=np.float32)
    if not np.isfinite(moments).all():
        bad = int((~np.isfinite(moments)).sum())
        raise DataError(
            f"{where}: moments contain {bad} NaN/inf values; the VAE encoding of this sample is broken, re-encode it"
        )
    return moments


def check_label(label: int, num_classes: int, where: str) -> int:
    label = int(label)
    if not 0 <= label < num_classes:
        raise DataError(
            f"{where}: label {label} is outside [0, {num_classes}); pass --num-classes {label + 1} or more, or fix "
            "the labels"
        )
    return label


def as_item(image: np.ndarray, moments: np.ndarray, label: int):
    """The (image, moments, label) tuple of tensors; copies so the tensors never alias a read-only memmap."""
    return (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)),
        torch.from_numpy(np.array(moments, dtype=np.float32, copy=True)),
        torch.tensor(label, dtype=torch.int64),
    )
