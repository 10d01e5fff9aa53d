"""Training data: the REPA folder layout, the packed layout, the embedded demo set and a resumable sampler.

Every dataset yields ``(image uint8 (3, R, R), moments float32 (2C, h, w), label int64)`` and exposes
``resolution``, ``num_classes``, ``latent_shape`` and ``len()`` (see ``common.py``).
"""

from __future__ import annotations

import os

from .common import DataError, LatentDataset
from .demo import DigitsDataset
from .packed import PackedDataset, is_packed_layout, verify_packed
from .ref_layout import RefFolderDataset, is_ref_layout
from .sampler import ResumableDistributedSampler

__all__ = [
    "DataError",
    "DigitsDataset",
    "LatentDataset",
    "PackedDataset",
    "RefFolderDataset",
    "ResumableDistributedSampler",
    "open_dataset",
    "verify_packed",
]


def open_dataset(path, *, num_classes: int = 1000, resolution: int | None = None) -> LatentDataset:
    """Open ``path`` as a packed dataset (``index.json``) or a REPA folder (``images/`` + ``vae-sd/``).

    Cheap validation happens here (counts, shapes, dtypes, label range, checksum); ``__getitem__`` checks each
    sample. ``resolution`` None means "whatever the data has"; otherwise it must match.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(
            f"{path}: data directory does not exist; pass --data-dir pointing at a REPA-preprocessed "
            "folder (images/ + vae-sd/) or a packed dataset (index.json), made with "
            "`python -m repa_fast.tools.preprocess`"
        )
    if not os.path.isdir(path):
        raise DataError(f"{path}: --data-dir must be a directory, not a file")
    if is_packed_layout(path):
        return PackedDataset(path, num_classes=num_classes, resolution=resolution)
    if is_ref_layout(path):
        return RefFolderDataset(path, num_classes=num_classes, resolution=resolution)
    entries = sorted(os.listdir(path))
    if not entries:
        raise DataError(
            f"{path}: data directory is empty; create the dataset with "
            f"`python -m repa_fast.tools.preprocess --source IMAGENET/train --dest {path} ...`"
        )
    raise DataError(
        f"{path}: neither a packed dataset (no index.json) nor a REPA folder (no images/ or vae-sd/); "
        f"found {entries[:5]}{' ...' if len(entries) > 5 else ''}. Point --data-dir at the dataset root"
    )
