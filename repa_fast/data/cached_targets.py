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


def describe(encoders, ds: LatentDataset, dtype: str, compute: str, batch_size: int, with_cls: bool = False) -> dict:
    """The header of a cache of ``encoders`` over ``ds``. ``with_cls``: each encoder's class token (REG,
    ``forward(images, with_cls=True)``) is stored too, (N, D) in ``<enc-type>.cls.npy`` (``cls_file``); a cache made
    without it has no ``class_tokens`` key (older caches read unchanged)."""
    first = encoders[0]
    header = {
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
    if with_cls:
        header["class_tokens"] = True
        for e, entry in zip(encoders, header["encoders"]):
            entry["cls_file"] = f"{e.enc_name}.cls.npy"
    return header


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
        self._arrays = self._cls_arrays = None
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
            if "cls_file" in e:
                cls_path = os.path.join(self.dir, e["cls_file"])
                if tuple(self._open(cls_path).shape) != (self.header["count"], e["embed_dim"]):
                    raise DataError(f"{cls_path}: not the (N, D) class tokens {HEADER_FILE} names; re-create the cache")

    @staticmethod
    def _open(path: str) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot open the cached targets ({exc}); re-create the cache") from exc

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None, "_cls_arrays": None}

    @property
    def has_class_tokens(self) -> bool:
        return bool(self.header.get("class_tokens"))

    def cls_rows(self, idx: int) -> list[torch.Tensor]:
        """Class tokens of dataset item ``idx``: one (D,) tensor per encoder (a cache made with ``--with-cls``)."""
        if self._cls_arrays is None:
            self._cls_arrays = [self._open(os.path.join(self.dir, e["cls_file"])) for e in self.header["encoders"]]
        return [torch.from_numpy(np.array(a[idx], copy=True)).view(self.dtype) for a in self._cls_arrays]

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [self._open(os.path.join(self.dir, e["file"])) for e in self.header["encoders"]]
        return self._arrays

    def check(self, encoders, ds: LatentDataset) -> None:
        """Refuse a cache made with other encoders, weights, resolution, grid, preprocessing or data."""
        h = self.header
        want = describe(encoders, ds, h["dtype"], h["compute_dtype"], h["batch_size"], self.has_class_tokens)
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
    """Items ``(targets list, moments, label)``: the base dataset without its images, targets from the cache; with
    ``with_cls`` (REG) ``({"patch": targets list, "cls": class tokens list}, moments, label)``."""

    def __init__(self, base: LatentDataset, cache: TargetCache, with_cls: bool = False):
        self.base, self.cache, self.with_cls = base, cache, with_cls
        self.path, self.resolution, self.num_classes = base.path, base.resolution, base.num_classes
        self.latent_shape = base.latent_shape

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        moments, label = self.base.read_latent(idx)
        if self.with_cls:
            return {"patch": self.cache.rows(idx), "cls": self.cache.cls_rows(idx)}, moments, label
        return self.cache.rows(idx), moments, label


def open_cached_targets(
    dataset: LatentDataset, encoders, cache_dir: str | None, with_cls: bool = False
) -> CachedTargetsDataset:
    """The trainer's hook for ``--targets cached``: check the cache against the run and wrap the dataset.
    ``with_cls``: the run is REG's and reads the class tokens, which the cache must hold."""
    cache = TargetCache(cache_dir or default_cache_dir(dataset.path))
    cache.check(encoders, dataset)
    if with_cls and not cache.has_class_tokens:
        names = ",".join(e["name"] for e in cache.header["encoders"])
        raise DataError(
            f"{cache.dir}: this target cache holds no class tokens, which REG (--reg) reads; rebuild it with "
            f"`python -m repa_fast.tools.cache_targets DATA --enc-type {names} --with-cls` (into another --out, "
            "or delete this one), or train with --targets computed"
        )
    return CachedTargetsDataset(dataset, cache, with_cls)
