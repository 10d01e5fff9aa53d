"""Reading the frozen encoders' targets stored beside the data (``--targets cached``).

The cache is written by ``python -m repa_fast.tools.cache_targets`` (its module docstring has the layout and how
it is made). A training run opens it with ``open_cached_targets``, which checks every field of the header against
its own encoders (weights hash included) and data, and refuses a cache made differently, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch

from repa_fast.data.common import DataError, LatentDataset

logger = logging.getLogger("repa_fast.data.cached_targets")

FORMAT = "repa_fast.targets"
VERSION = 1
CACHE_DIR = "targets"
HEADER_FILE = "header.json"
STORE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16: raw bit patterns


def default_cache_dir(data_dir: str) -> str:
    return os.path.join(os.fspath(data_dir), CACHE_DIR)


# ---- the facts a cache is checked against ----------------------------------------------------------------------


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (sorted names, dtype, shape, bytes): the weights as the encoder uses them."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def preprocessing(encoder) -> dict:
    """How the encoder turns a uint8 image into its input: what a cache depends on. Every target encoder describes its
    own (``encoder.preprocessing``: DINOv2ViT, TimmViTEncoder, DigitsEncoder)."""
    own = getattr(encoder, "preprocessing", None)
    if not isinstance(own, dict):
        raise DataError(
            f"target encoder {getattr(encoder, 'enc_name', type(encoder).__name__)} does not describe its "
            "preprocessing (a `preprocessing` dict property), so a target cache cannot be checked against it"
        )
    return own


def dataset_fingerprint(ds: LatentDataset) -> dict:
    """Which samples, in which order: count and a SHA-256 of the file list (REPA layout) or of index.json (packed)."""
    from repa_fast.data.packed import INDEX_FILE, PackedDataset
    from repa_fast.data.ref_layout import RefFolderDataset

    h = hashlib.sha256()
    if isinstance(ds, RefFolderDataset):
        h.update("\n".join(ds.image_fnames + ds.feature_fnames).encode())
        h.update(np.ascontiguousarray(ds.labels).tobytes())
        kind = "ref"
    elif isinstance(ds, PackedDataset):
        with open(os.path.join(ds.path, INDEX_FILE), "rb") as f:
            h.update(f.read())
        kind = "packed"
    else:
        h.update(f"{type(ds).__name__}:{ds.path}:{ds.resolution}".encode())
        kind = type(ds).__name__
    return {"layout": kind, "count": len(ds), "sha256": h.hexdigest()}


def describe(encoders, ds: LatentDataset, dtype: str, compute: str, batch_size: int) -> dict:
    """The header of a cache of ``encoders`` over ``ds`` (everything but the per-encoder file names)."""
    first = encoders[0]
    return {
        "format": FORMAT,
        "version": VERSION,
        "count": len(ds),
        "encoders": [
            {
                "name": e.enc_name,
                "tokens": e.num_patches,
                "embed_dim": e.embed_dim,
                "weights_sha256": weights_sha256(e),
                "file": f"{e.enc_name}.npy",
            }
            for e in encoders
        ],
        "resolution": ds.resolution,
        "grid": first.grid,
        "preprocessing": preprocessing(first),
        "dtype": dtype,
        "compute_dtype": compute,
        "batch_size": int(batch_size),
        "dataset": dataset_fingerprint(ds),
    }


# ---- reading (training) ------------------------------------------------------------------------------------------


def read_header(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, HEADER_FILE)
    if not os.path.isfile(path):
        hint = f" (an unfinished run is in {cache_dir}.tmp: rerun the same command to finish it)"
        raise DataError(
            f"{path}: no target cache here{hint if os.path.isdir(cache_dir + '.tmp') else ''}; make it with "
            "`python -m repa_fast.tools.cache_targets DATA --enc-type ...`, or train with --targets computed"
        )
    try:
        with open(path) as f:
            header = json.load(f)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete {cache_dir} and re-create the cache") from exc
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} header; re-create the cache")
    return header


def _differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache {a!r}, this run {b!r}")
    return out


class TargetCache:
    """Read-only view of a finished cache; memmaps open lazily (after pickling into DataLoader workers)."""

    def __init__(self, cache_dir: str):
        self.dir = os.fspath(cache_dir)
        self.header = read_header(self.dir)
        self._arrays = None
        self.dtype = _TORCH_DTYPES[STORE_DTYPES[self.header["dtype"]]]
        for e in self.header["encoders"]:
            path = os.path.join(self.dir, e["file"])
            arr = self._open(path)
            want = (self.header["count"], e["tokens"], e["embed_dim"])
            if tuple(arr.shape) != want or arr.dtype != _NUMPY_STORAGE[STORE_DTYPES[self.header["dtype"]]]:
                raise DataError(
                    f"{path}: shape {arr.shape} / dtype {arr.dtype} disagree with {HEADER_FILE} ({want}, "
                    f"{self.header['dtype']}); the cache is damaged: delete {self.dir} and re-create it"
                )

    @staticmethod
    def _open(path: str) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot open the cached targets ({exc}); re-create the cache") from exc

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [self._open(os.path.join(self.dir, e["file"])) for e in self.header["encoders"]]
        return self._arrays

    def check(self, encoders, ds: LatentDataset) -> None:
        """Refuse a cache made with other encoders, weights, resolution, grid, preprocessing or data."""
        want = describe(encoders, ds, self.header["dtype"], self.header["compute_dtype"], self.header["batch_size"])
        diff = _differences(self.header, want)
        if diff:
            raise DataError(
                f"{os.path.join(self.dir, HEADER_FILE)}: this target cache does not match the run: "
                + "; ".join(diff)
                + ". Re-create it with `python -m repa_fast.tools.cache_targets` and this run's --enc-type, "
                "--resolution and encoder weights (or point --targets-dir at a matching cache), or use "
                "--targets computed"
            )

    def rows(self, idx: int) -> list[torch.Tensor]:
        """Targets of dataset item ``idx``: one (T, D) tensor per encoder, in the stored dtype."""
        return [torch.from_numpy(np.array(a[idx], copy=True)).view(self.dtype) for a in self.arrays]


class CachedTargetsDataset(LatentDataset):
    """Items ``(targets list, moments, label)``: the base dataset without its images, targets from the cache."""

    def __init__(self, base: LatentDataset, cache: TargetCache):
        self.base, self.cache = base, cache
        self.path, self.resolution, self.num_classes = base.path, base.resolution, base.num_classes
        self.latent_shape = base.latent_shape

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        moments, label = self.base.read_latent(idx)
        return self.cache.rows(idx), moments, label


def open_cached_targets(dataset: LatentDataset, encoders, cache_dir: str | None) -> CachedTargetsDataset:
    """The trainer's hook for ``--targets cached``: check the cache against the run and wrap the dataset."""
    cache = TargetCache(cache_dir or default_cache_dir(dataset.path))
    cache.check(encoders, dataset)
    return CachedTargetsDataset(dataset, cache)
