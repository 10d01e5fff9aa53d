"""The packed layout: one memory-mapped ``.npy`` per field plus a small JSON index.

    DATA/index.json     format, version, count, resolution, latent shape, per-field file/dtype/shape/sha256,
                        label range and a cheap checksum (below)
    DATA/images.npy     uint8   (N, 3, R, R)
    DATA/moments.npy    float16 or float32 (N, 2C, h, w) = [mean, std] of the VAE posterior
    DATA/labels.npy     int64   (N,)

Checks. On open (cheap, milliseconds): the index parses and has this format/version; every field file exists and
its .npy header matches the index (dtype, shape); the label range in the index fits ``num_classes``; the
*sample checksum* matches and the sampled moment rows are finite. The sample checksum is the SHA-256 of the
index JSON without its "checksum" entry (sorted keys) followed by, for every field in sorted order, the file's
size and the raw bytes of rows ``sample_rows(N)`` (up to 16 rows evenly spaced, first and last included). It
catches a swapped or re-written index, truncated/replaced files and corrupted sampled rows; it cannot see a
corrupted row it does not sample, which is what the per-sample checks (finite moments, label range) and
``verify_packed`` (full SHA-256 of every file, every row checked) are for.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from repa_fast.io import write_json

from .common import DataError, LatentDataset, as_item, check_label, check_moments

FORMAT = "repa_fast.packed"
VERSION = 1
INDEX_FILE = "index.json"
FIELDS = ("images", "moments", "labels")
LATENT_DTYPES = {"fp16": "float16", "fp32": "float32"}
_ALLOWED_DTYPES = {"images": ("uint8",), "moments": ("float16", "float32"), "labels": ("int64",)}
_SAMPLE_ROWS = 16
_HASH_CHUNK = 1 << 24


def is_packed_layout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILE))


def field_specs(count: int, resolution: int, latent_shape, latent_dtype: str) -> dict:
    """Per-field file name, dtype and full shape of a packed dataset."""
    return {
        "images": {"file": "images.npy", "dtype": "uint8", "shape": [count, 3, resolution, resolution]},
        "moments": {"file": "moments.npy", "dtype": latent_dtype, "shape": [count, *map(int, latent_shape)]},
        "labels": {"file": "labels.npy", "dtype": "int64", "shape": [count]},
    }


def allocate_fields(root: str, specs: dict) -> None:
    """Create the (sparse) .npy files of every field; rows are then written in place through memmaps."""
    os.makedirs(root, exist_ok=True)
    for spec in specs.values():
        arr = np.lib.format.open_memmap(
            os.path.join(root, spec["file"]), mode="w+", dtype=spec["dtype"], shape=tuple(spec["shape"])
        )
        del arr


def open_fields(root: str, specs: dict, mode: str = "r") -> dict:
    return {name: np.load(os.path.join(root, spec["file"]), mmap_mode=mode) for name, spec in specs.items()}


def sample_rows(count: int) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, count - 1, num=min(count, _SAMPLE_ROWS)).round()})


def _index_bytes(index: dict) -> bytes:
    body = {k: v for k, v in index.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True).encode()


def sample_checksum(root: str, index: dict, arrays: dict) -> str:
    """SHA-256 over the index (minus "checksum"), each field's file size and its sampled rows (module doc)."""
    h = hashlib.sha256(_index_bytes(index))
    rows = sample_rows(index["count"])
    for name in sorted(arrays):
        h.update(str(os.path.getsize(os.path.join(root, index["fields"][name]["file"]))).encode())
        h.update(np.ascontiguousarray(arrays[name][rows]).tobytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(root: str, specs: dict, *, resolution: int, latent_shape, source: dict) -> dict:
    """Finish a packed dataset in ``root``: full-file hashes, label range, sample checksum, then index.json."""
    arrays = open_fields(root, specs)
    labels = arrays["labels"]
    fields = {name: dict(spec, sha256=file_sha256(os.path.join(root, spec["file"]))) for name, spec in specs.items()}
    index = {
        "format": FORMAT,
        "version": VERSION,
        "count": int(labels.shape[0]),
        "resolution": int(resolution),
        "latent_shape": [int(s) for s in latent_shape],
        "label_min": int(labels.min()),
        "label_max": int(labels.max()),
        "fields": fields,
        "source": source,
    }
    index["checksum"] = {
        "algorithm": "sha256",
        "rows": sample_rows(index["count"]),
        "value": sample_checksum(root, index, arrays),
    }
    write_json(os.path.join(root, INDEX_FILE), index, indent=1)
    return index


def read_index(path: str) -> dict:
    index_path = os.path.join(path, INDEX_FILE)
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{index_path}: cannot read the packed index ({exc}); re-run `python -m repa_fast.tools.pack SRC DST`"
        ) from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{index_path}: 'format' is not {FORMAT!r}; this is not a repa_fast packed dataset")
    if index.get("version") != VERSION:
        raise DataError(
            f"{index_path}: 'version' is {index.get('version')!r}, this repa_fast reads version "
            f"{VERSION}; re-pack the dataset with this version"
        )
    for key in ("count", "resolution", "latent_shape", "label_min", "label_max", "fields", "checksum"):
        if key not in index:
            raise DataError(f"{index_path}: missing field {key!r}; re-pack the dataset")
    return index


def _check_field(path: str, index: dict, name: str, arr: np.ndarray) -> None:
    """The index entry of ``name`` is allowed and agrees with the .npy header actually on disk."""
    spec = index["fields"][name]
    where = f"{os.path.join(path, INDEX_FILE)}: field '{name}'"
    if spec["dtype"] not in _ALLOWED_DTYPES[name]:
        raise DataError(f"{where} has dtype {spec['dtype']}, expected one of {_ALLOWED_DTYPES[name]}; re-pack")
    expect = field_specs(index["count"], index["resolution"], index["latent_shape"], spec["dtype"])[name]
    if list(spec["shape"]) != expect["shape"]:
        raise DataError(
            f"{where} has shape {spec['shape']}, expected {expect['shape']} from count/resolution/"
            "latent_shape; the index is inconsistent: re-pack"
        )
    if str(arr.dtype) != spec["dtype"] or list(arr.shape) != list(spec["shape"]):
        raise DataError(
            f"{os.path.join(path, spec['file'])}: holds {arr.dtype} {list(arr.shape)} but "
            f"{INDEX_FILE} says {spec['dtype']} {spec['shape']} for field '{name}'; the files do not "
            "belong together: re-pack"
        )


def open_checked(path: str, num_classes: int, resolution: int | None = None) -> tuple[dict, dict]:
    """Read and cheaply validate a packed dataset; returns (index, read-only memmaps)."""
    index = read_index(path)
    arrays = {}
    for name in FIELDS:
        spec = index["fields"].get(name)
        if spec is None:
            raise DataError(f"{os.path.join(path, INDEX_FILE)}: no field '{name}'; re-pack the dataset")
        fpath = os.path.join(path, spec["file"])
        try:
            arrays[name] = np.load(fpath, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(
                f"{fpath}: cannot open field '{name}' ({exc}); the file is missing, truncated or "
                "corrupt: re-pack the dataset"
            ) from exc
        _check_field(path, index, name, arrays[name])
    if index["count"] == 0:
        raise DataError(
            f"{os.path.join(path, INDEX_FILE)}: count is 0 (dataset is empty); re-pack from a non-empty source"
        )
    if resolution is not None and resolution != index["resolution"]:
        raise DataError(
            f"{path}: images are {index['resolution']}x{index['resolution']} but resolution "
            f"{resolution} was asked for; pass --resolution {index['resolution']} or re-preprocess"
        )
    if index["label_min"] < 0 or index["label_max"] >= num_classes:
        check_label(
            index["label_max"] if index["label_min"] >= 0 else index["label_min"],
            num_classes,
            f"{os.path.join(path, INDEX_FILE)}: field 'labels'",
        )
    value = sample_checksum(path, index, arrays)
    if value != index["checksum"].get("value"):
        raise DataError(
            f"{os.path.join(path, INDEX_FILE)}: checksum mismatch (index or sampled rows changed since "
            "packing); the dataset is corrupt or its files were mixed up: run "
            f"`python -m repa_fast.tools.pack --verify {path}` to locate it, then re-pack"
        )
    for i in sample_rows(index["count"]):
        check_moments(arrays["moments"][i], tuple(index["latent_shape"]), f"{path}: field 'moments', row {i}")
    return index, arrays


class PackedDataset(LatentDataset):
    """Memory-mapped packed dataset. Memmaps are opened lazily per process (never pickled to DataLoader workers)."""

    def __init__(self, path: str, *, num_classes: int = 1000, resolution: int | None = None):
        self.path = str(path)
        self.num_classes = int(num_classes)
        self.index, self._arrays = open_checked(self.path, self.num_classes, resolution)
        self.resolution = int(self.index["resolution"])
        self.latent_shape = tuple(self.index["latent_shape"])
        self.latent_dtype = self.index["fields"]["moments"]["dtype"]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrays = None

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = open_fields(self.path, self.index["fields"])
        return self._arrays

    def __len__(self) -> int:
        return int(self.index["count"])

    def __getitem__(self, idx: int):
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"{self.path}: index {idx} out of range for {n} samples")
        idx = idx % n
        where = f"{self.path}: row {idx}"
        a = self.arrays
        moments = check_moments(a["moments"][idx], self.latent_shape, f"{where}, field 'moments'")
        label = check_label(a["labels"][idx], self.num_classes, f"{where}, field 'labels'")
        return as_item(a["images"][idx], moments, label)

    def read_latent(self, idx: int):
        """(moments, label) of row ``idx`` without touching the images file."""
        where = f"{self.path}: row {idx}"
        moments = check_moments(self.arrays["moments"][idx], self.latent_shape, f"{where}, field 'moments'")
        label = check_label(self.arrays["labels"][idx], self.num_classes, f"{where}, field 'labels'")
        return torch.from_numpy(np.array(moments, dtype=np.float32, copy=True)), torch.tensor(label, dtype=torch.int64)


def verify_packed(path: str, *, num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Full check: every file's SHA-256 and every moment row finite (labels: the index's range, which the
    checksum and the labels file's SHA-256 tie to the data). Raises DataError; returns the index."""
    index = read_index(path)
    _, arrays = open_checked(path, num_classes if num_classes is not None else index["label_max"] + 1)
    for name in FIELDS:
        spec = index["fields"][name]
        fpath = os.path.join(path, spec["file"])
        if file_sha256(fpath) != spec.get("sha256"):
            raise DataError(
                f"{fpath}: SHA-256 differs from {INDEX_FILE} (field '{name}'); the file is corrupt: re-pack the dataset"
            )
    moments = arrays["moments"]
    for start in range(0, index["count"], chunk):
        block = np.asarray(moments[start : start + chunk], dtype=np.float32)
        finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{path}: field 'moments', row {row} has NaN/inf values; re-encode that sample")
    return index
