"""The reference (REPA) folder layout, read exactly as the reference ``dataset.py`` pairs it.

    DATA/images/00000/img00000000.png ...          uncompressed RGB PNGs (``dataset_tools.py convert``)
    DATA/images/dataset.json                       {"labels": [["00000/img00000000.png", 6], ...]}
    DATA/vae-sd/00000/img-mean-std-00000000.npy    float32 (2C, h, w) = [mean, std] (``dataset_tools.py encode``)
    DATA/vae-sd/dataset.json                       {"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}

Pairing (reference ``CustomDataset``): every file under ``images/`` and under ``vae-sd/`` whose extension PIL knows
or is ``.npy`` is listed recursively; both lists are sorted by relative path and paired by position; labels come
from ``vae-sd/dataset.json`` keyed by the feature file name. We keep that rule, and additionally refuse a pairing
whose reference-style file numbers disagree (``img00000012.png`` with ``img-mean-std-00000013.npy``).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from .common import DataError, LatentDataset, as_item, check_image, check_label, check_moments

IMAGES_DIR = "images"
FEATURES_DIR = "vae-sd"
LABELS_FILE = "dataset.json"
_IMAGE_ID = re.compile(r"img(\d+)\.[A-Za-z]+$")
_FEATURE_ID = re.compile(r"img-mean-std-(\d+)\.npy$")


def ref_image_name(index: int) -> str:
    """Name the reference ``convert`` step gives image ``index``: 1000 files per folder."""
    s = f"{index:08d}"
    return f"{s[:5]}/img{s}.png"


def ref_feature_name(index: int) -> str:
    s = f"{index:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def supported_extensions() -> set[str]:
    import PIL.Image

    PIL.Image.init()
    return set(PIL.Image.EXTENSION.keys()) | {".npy"}


def list_data_files(root: str) -> list[str]:
    """Sorted relative paths ('/'-separated) of the files the reference would list under ``root``."""
    exts = supported_extensions()
    names = []

    def unreadable(e: OSError):
        if isinstance(e, PermissionError):
            raise permission_error(e.filename or root) from e
        raise DataError(f"{e.filename or root}: cannot list the folder ({e.strerror or e})") from e

    for dirpath, _dirs, files in os.walk(root, onerror=unreadable):
        for fname in files:
            if os.path.splitext(fname)[1].lower() in exts:
                names.append(os.path.relpath(os.path.join(dirpath, fname), start=root).replace(os.sep, "/"))
    return sorted(names)


def permission_error(path: str) -> DataError:
    """A file or folder this process may not read: said as such (the data is not corrupt, nothing to delete)."""
    return DataError(
        f"{path}: permission denied (this is not corruption: the file is intact but not readable by this user); "
        "fix its permissions (e.g. chmod a+r, and a+rx on folders) or run as a user who can read it"
    )


def is_ref_layout(path: str) -> bool:
    return os.path.isdir(os.path.join(path, IMAGES_DIR)) or os.path.isdir(os.path.join(path, FEATURES_DIR))


def _read_labels(features_dir: str, feature_names: list[str]) -> np.ndarray:
    path = os.path.join(features_dir, LABELS_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: missing; the REPA layout keeps class labels there (written by `dataset_tools.py encode` or "
            "`python -m repa_fast.tools.preprocess --layout ref`)"
        )
    try:
        with open(path, "rb") as f:
            entries = json.load(f)["labels"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a JSON object with a 'labels' list ({exc!r}); re-create it") from exc
    if entries is None:
        raise DataError(
            f"{path}: 'labels' is null (the source had no class folders); class-conditional training "
            "needs labels: re-run preprocessing from an ImageNet-style folder with one folder per class"
        )
    _check_label_entries(path, entries)
    table = {str(name).replace("\\", "/"): lab for name, lab in entries}
    missing = [name for name in feature_names if name not in table]
    if missing:
        raise DataError(
            f"{path}: no label for {len(missing)} feature files, e.g. {missing[0]}; the labels must be "
            f"keyed by the file names under {FEATURES_DIR}/ (re-run the encode step)"
        )
    labels = np.array([table[name] for name in feature_names])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be one integer per file (got dtype {labels.dtype}, ndim {labels.ndim})")
    return labels.astype(np.int64)


def _check_label_entries(path: str, entries) -> None:
    """``labels`` is a list of [file name, integer label] pairs (dataset_tools.py's layout); the first entry that is not
    one is named with its index."""
    if not isinstance(entries, list):
        raise DataError(
            f"{path}: 'labels' is a {type(entries).__name__}, expected a list of [file name, integer label] pairs; "
            "re-create the file (re-run the encode step)"
        )
    for i, e in enumerate(entries):
        if not (isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[0], str)):
            raise DataError(
                f"{path}: labels[{i}] is {json.dumps(e)[:80]}, expected a [file name, integer label] pair such as "
                '["00000/img-mean-std-00000000.npy", 6]; re-create the file (re-run the encode step)'
            )


def _check_pairing(image_names: list[str], feature_names: list[str], data_dir: str) -> None:
    """Refuse reference-named files whose numbers disagree at the same sorted position."""
    for img, feat in zip(image_names, feature_names):
        mi, mf = _IMAGE_ID.search(img), _FEATURE_ID.search(feat)
        if mi and mf and int(mi.group(1)) != int(mf.group(1)):
            raise DataError(
                f"{data_dir}: {IMAGES_DIR}/{img} is paired with {FEATURES_DIR}/{feat} (files are paired by sorted "
                "position, as in the reference); a file is missing or extra on one side: re-run preprocessing or "
                "remove the stray file"
            )


def load_image_file(path: str) -> np.ndarray:
    """(C, H, W) uint8 as the reference reads it (pyspng when installed, else PIL; .npy images too)."""
    try:
        if path.lower().endswith(".npy"):
            image = np.load(path)
            return image.reshape(-1, *image.shape[-2:])
        with open(path, "rb") as f:
            data = f.read()
        try:
            import pyspng  # optional, the reference's fast path
        except ImportError:
            pyspng = None
        if pyspng is not None and path.lower().endswith(".png"):
            image = pyspng.load(data)
        else:
            import io

            import PIL.Image

            with PIL.Image.open(io.BytesIO(data)) as im:
                image = np.array(im)
        return image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)
    except PermissionError as exc:
        raise permission_error(path) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot decode image ({exc}); the file is truncated or corrupt: delete the "
            "sample's files and re-run preprocessing"
        ) from exc


def load_moments_file(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except PermissionError as exc:
        raise permission_error(path) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot read moments .npy ({exc}); the file is truncated or corrupt: re-encode "
            "the sample (re-run preprocessing)"
        ) from exc


def _peek_moments(path: str) -> tuple[tuple, np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except PermissionError as exc:
        raise permission_error(path) from exc
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot read moments .npy header ({exc}); the file is truncated or corrupt: re-encode it"
        ) from exc
    return tuple(arr.shape), arr.dtype


class RefFolderDataset(LatentDataset):
    """The REPA layout; cheap checks on open, full per-sample checks in ``__getitem__``."""

    def __init__(self, path: str, *, num_classes: int = 1000, resolution: int | None = None):
        self.path = str(path)
        self.images_dir = os.path.join(self.path, IMAGES_DIR)
        self.features_dir = os.path.join(self.path, FEATURES_DIR)
        for d, what in ((self.images_dir, "PNG images"), (self.features_dir, "VAE moment .npy files")):
            if not os.path.isdir(d):
                raise DataError(
                    f"{d}: missing; the REPA layout needs {IMAGES_DIR}/ and {FEATURES_DIR}/ ({what} "
                    "here); create them with `python -m repa_fast.tools.preprocess --layout ref`"
                )
        self.image_fnames = list_data_files(self.images_dir)
        self.feature_fnames = list_data_files(self.features_dir)
        self._check_counts()
        _check_pairing(self.image_fnames, self.feature_fnames, self.path)
        self.num_classes = int(num_classes)
        self.labels = _read_labels(self.features_dir, self.feature_fnames)
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            i = int(bad[0])
            check_label(
                self.labels[i],
                self.num_classes,
                f"{os.path.join(self.features_dir, LABELS_FILE)} "
                f"(entry {self.feature_fnames[i]}, {bad.size} bad labels in all)",
            )
        self._infer_shapes(resolution)

    def _check_counts(self) -> None:
        ni, nf = len(self.image_fnames), len(self.feature_fnames)
        if ni == 0 or nf == 0:
            empty = self.images_dir if ni == 0 else self.features_dir
            raise DataError(
                f"{empty}: no data files found (dataset is empty); run "
                "`python -m repa_fast.tools.preprocess` to create the dataset"
            )
        if ni != nf:
            raise DataError(
                f"{self.path}: {ni} images in {IMAGES_DIR}/ but {nf} moment files in {FEATURES_DIR}/; every image "
                "needs exactly one latent file: finish or re-run the encode step, or remove the stray files"
            )

    def _infer_shapes(self, resolution: int | None) -> None:
        """Resolution from the first image, latent shape from the first .npy header; the last pair must agree."""
        first = check_image_header(os.path.join(self.images_dir, self.image_fnames[0]))
        if resolution is not None and first != resolution:
            raise DataError(
                f"{os.path.join(self.images_dir, self.image_fnames[0])}: images are {first}x{first} "
                f"but resolution {resolution} was asked for; pass --resolution {first} or re-run "
                f"preprocessing at {resolution}"
            )
        self.resolution = first
        shape, dtype = _peek_moments(os.path.join(self.features_dir, self.feature_fnames[0]))
        if len(shape) != 3 or shape[0] % 2 or dtype not in (np.float32, np.float16):
            raise DataError(
                f"{os.path.join(self.features_dir, self.feature_fnames[0])}: moments have shape {shape} "
                f"and dtype {dtype}, expected float32 (2C, h, w) = [mean, std]; re-encode the dataset"
            )
        self.latent_shape = shape
        last = len(self) - 1
        if check_image_header(os.path.join(self.images_dir, self.image_fnames[last])) != self.resolution:
            raise DataError(
                f"{os.path.join(self.images_dir, self.image_fnames[last])}: its size differs from "
                f"the first image ({self.resolution}px); all images must share one resolution"
            )
        last_shape, _ = _peek_moments(os.path.join(self.features_dir, self.feature_fnames[last]))
        if last_shape != shape:
            raise DataError(
                f"{os.path.join(self.features_dir, self.feature_fnames[last])}: moments shape "
                f"{last_shape} differs from the first file's {shape}; re-encode the dataset"
            )

    def __len__(self) -> int:
        return len(self.feature_fnames)

    def __getitem__(self, idx: int):
        image_path = os.path.join(self.images_dir, self.image_fnames[idx])
        feature_path = os.path.join(self.features_dir, self.feature_fnames[idx])
        image = check_image(load_image_file(image_path), self.resolution, image_path)
        moments = check_moments(load_moments_file(feature_path), self.latent_shape, feature_path)
        label = check_label(self.labels[idx], self.num_classes, f"{feature_path} (label)")
        return as_item(image, moments, label)

    def read_latent(self, idx: int):
        feature_path = os.path.join(self.features_dir, self.feature_fnames[idx])
        moments = check_moments(load_moments_file(feature_path), self.latent_shape, feature_path)
        label = check_label(self.labels[idx], self.num_classes, f"{feature_path} (label)")
        return torch.from_numpy(moments.copy()), torch.tensor(label, dtype=torch.int64)


def check_image_header(path: str) -> int:
    """Side length of a square image, read from the header only (no decode)."""
    if path.lower().endswith(".npy"):
        shape, _ = _peek_moments(path)
        h, w = shape[-2:]
    else:
        import PIL.Image

        try:
            with PIL.Image.open(path) as im:
                w, h = im.size
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(
                f"{path}: cannot read the image header ({exc}); the file is truncated or corrupt, re-create it"
            ) from exc
    if w != h:
        raise DataError(f"{path}: image is {w}x{h}; training images must be square (ADM center crop)")
    return int(w)
