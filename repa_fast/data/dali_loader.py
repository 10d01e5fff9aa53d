"""NVIDIA DALI reader of the REPA folder layout (``--loader dali``), in the resumable sampler's order.

Each ``iter(loader)`` (one per epoch, or the rest of one after a resume) asks the sampler for this rank's indices from
its current position (``ResumableDistributedSampler.local_indices``: the (seed, epoch) permutation, split over
ranks exactly as the DataLoader gets it) and builds a DALI pipeline over those files in that order, no DALI
shuffling: ``readers.file`` + ``decoders.image`` for the PNGs (decoded by DALI's threads), ``readers.numpy`` for
the moments, the labels passed with the file list. Batches are ``(uint8 (B, 3, R, R), float32 (B, 2C, h, w),
int64 (B,))`` as the DataLoader's, on the device: GPU tensors with DALI's prefetching on CUDA, CPU tensors here.
The position lives in the sampler (the loop's ``advance()``), which the checkpoint already holds; resume is exact.

Device paths (each behind a capability function, checked when the pipeline is built, never at import):
  GPU operators (output on the GPU, ``mixed`` decoding)   ``dali_gpu_available(device)``: DALI + a CUDA device;
  PNG is decoded on the CPU even in ``mixed`` mode (nvImageCodec decodes JPEG/JPEG 2000 on the GPU only);
  GPU Direct Storage for the .npy moments                 ``gds_available()``: the above + libcufile.
Neither can run on CPU machines; everything else (the CPU pipeline) is what the tests run.

Errors. A file DALI cannot read is found by mapping the failing batch (and the prefetched ones after it) back to its
sample indices and re-reading those with the DataLoader's own checks, so the message names the file exactly as the
DataLoader path does (``RefFolderDataset.__getitem__``).
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import logging
import os

import numpy as np
import torch

from .common import DataError
from .ref_layout import RefFolderDataset

logger = logging.getLogger("repa_fast.data.dali_loader")

PREFETCH = 2  # DALI prefetch_queue_depth: batches decoded ahead of the one being consumed
DALI_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # what decoders.image reads


def dali_available() -> bool:
    """NVIDIA DALI is importable (``pip install 'repa_fast[dali]'``)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def dali_gpu_available(device: torch.device) -> bool:
    """DALI's GPU operators can run: DALI installed and ``device`` is a usable CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available() and dali_available()


def gds_available(device: torch.device) -> bool:
    """GPU Direct Storage for ``readers.numpy(device='gpu')``: GPU operators and the cuFile library."""
    return dali_gpu_available(device) and ctypes.util.find_library("cufile") is not None


def pipeline_devices(device: torch.device) -> dict:
    """Where each stage runs for ``device``: DALI device id, decoder, numpy reader and output placement."""
    gpu = dali_gpu_available(device)
    return {
        "device_id": (device.index or 0) if gpu else None,
        "decoder": "mixed" if gpu else "cpu",
        "numpy": "gpu" if gds_available(device) else "cpu",
        "output": "gpu" if gpu else "cpu",
    }


def _require_dali():
    if not dali_available():
        raise ImportError("--loader dali needs NVIDIA DALI: pip install 'repa_fast[dali]'")
    import nvidia.dali  # noqa: F401

    return nvidia.dali


def choose_loader(loader: str, dataset, device: torch.device) -> str:
    """``"dali"`` or ``"dataloader"`` for ``--loader`` (auto / dataloader / dali); logs why, errors on impossible."""
    if loader == "dataloader":
        return "dataloader"
    reason = None
    if not isinstance(dataset, RefFolderDataset):
        reason = (
            f"{type(dataset).__name__} data is read by the DataLoader (DALI serves the REPA folder layout; the packed "
            "layout reads a sample from one memory map, and --targets cached reads no images)"
        )
    elif not dataset.image_fnames[0].lower().endswith(DALI_EXTENSIONS):
        reason = f"images like {dataset.image_fnames[0]} are not a format DALI decodes"
    elif not dali_available():
        reason = "NVIDIA DALI is not installed (pip install 'repa_fast[dali]')"
    if loader == "dali":
        if reason:
            from repa_fast.config import ConfigError

            raise ConfigError(f"--loader dali: {reason}; use --loader dataloader (or auto)")
        where = "GPU" if dali_gpu_available(device) else "CPU pipeline"
        logger.info("data loader: DALI (%s, as asked by --loader dali)", where)
        return "dali"
    if reason is None and device.type != "cuda":
        reason = f"the device is {device.type}, not CUDA (--loader dali runs DALI's CPU pipeline on purpose)"
    if reason:
        logger.info("data loader: torch DataLoader (--loader auto: %s)", reason)
        return "dataloader"
    logger.info("data loader: DALI on %s (--loader auto: DALI is installed and the device is CUDA)", device)
    return "dali"


def _build_pipeline(files: list[str], features: list[str], labels: list[int], batch: int, threads: int, dev: dict):
    dali = _require_dali()
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(
        batch_size=batch,
        num_threads=threads,
        device_id=dev["device_id"],
        prefetch_queue_depth=PREFETCH,
        seed=0,  # nothing in it is random; fixed for reproducibility anyway
    )
    def pipe():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="images")
        image = fn.decoders.image(encoded, device=dev["decoder"], output_type=types.RGB)  # (H, W, 3) uint8
        image = fn.transpose(image, perm=[2, 0, 1])  # (3, H, W)
        moments = fn.readers.numpy(files=features, random_shuffle=False, device=dev["numpy"], name="moments")
        if dev["output"] == "gpu":
            image, moments, label = image.gpu(), moments.gpu(), label.gpu()
        return image, moments, label

    p = pipe()
    p.build()
    return p


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shapes) as a torch tensor on ``device`` (a copy: DALI reuses its buffers)."""
    dense = tensor_list.as_tensor()
    if type(dense).__name__ == "TensorCPU":
        return torch.from_numpy(np.array(dense, copy=True)).to(device, non_blocking=True)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


class DALILoader:
    """Iterable over this rank's micro-batches of a ``RefFolderDataset``, sampler order (module doc)."""

    def __init__(self, dataset: RefFolderDataset, sampler, micro_batch: int, *, device, num_threads: int = 4):
        if sampler.local_batch_size % micro_batch:
            raise ValueError(f"micro-batch {micro_batch} does not divide the local batch {sampler.local_batch_size}")
        self.dataset, self.sampler, self.micro_batch = dataset, sampler, int(micro_batch)
        self.device, self.num_threads = torch.device(device), int(num_threads)

    def __len__(self) -> int:
        return len(self.sampler) // self.micro_batch

    def __iter__(self):
        indices = self.sampler.local_indices()  # materialised now, as the DataLoader's sampler iterator
        return self._epoch(indices) if len(indices) else iter(())

    def _epoch(self, indices: np.ndarray):
        ds = self.dataset
        files = [os.path.join(ds.images_dir, ds.image_fnames[i]) for i in indices]
        features = [os.path.join(ds.features_dir, ds.feature_fnames[i]) for i in indices]
        labels = [int(ds.labels[i]) for i in indices]
        dev = pipeline_devices(self.device)
        try:
            pipe = _build_pipeline(files, features, labels, self.micro_batch, self.num_threads, dev)
        except RuntimeError as exc:
            self._raise_named(indices, 0, exc)
        try:
            for b in range(len(indices) // self.micro_batch):
                try:
                    image, moments, label = pipe.run()
                except RuntimeError as exc:
                    self._raise_named(indices, b, exc)
                yield self._batch(indices[b * self.micro_batch : (b + 1) * self.micro_batch], image, moments, label)
        finally:
            del pipe

    def _batch(self, idx: np.ndarray, image, moments, label):
        ds, r = self.dataset, self.dataset.resolution
        for k, shape in enumerate(image.shape()):
            if tuple(shape) != (3, r, r):
                ds[int(idx[k])]  # raises the DataLoader's error, naming the file
                raise DataError(f"{ds.image_fnames[int(idx[k])]}: decoded to {tuple(shape)}, expected (3, {r}, {r})")
        for k, shape in enumerate(moments.shape()):
            if tuple(shape) != tuple(ds.latent_shape):
                ds[int(idx[k])]
                raise DataError(f"{ds.feature_fnames[int(idx[k])]}: moments {tuple(shape)}, expected {ds.latent_shape}")
        images = _to_torch(image, self.device)
        moments = _to_torch(moments, self.device).float()
        if self.device.type == "cpu":  # the DataLoader's finiteness check (on GPU it would cost a host sync)
            bad = ~torch.isfinite(moments.flatten(1)).all(dim=1)
            if bool(bad.any()):
                ds[int(idx[int(bad.nonzero()[0, 0])])]
        labels = _to_torch(label, self.device).reshape(-1).long()
        return images, moments, labels

    def _raise_named(self, indices: np.ndarray, batch: int, exc: Exception):
        """Re-read the failing batch and those DALI prefetched after it with the DataLoader's checks."""
        lo = batch * self.micro_batch
        candidates = indices[lo : lo + (PREFETCH + 1) * self.micro_batch]
        for i in candidates:
            self.dataset[int(i)]  # a DataError naming the file when this sample is the broken one
        names = [self.dataset.image_fnames[int(i)] for i in candidates[:4]]
        raise DataError(
            f"{self.dataset.path}: DALI failed on a batch holding {names}{' ...' if len(candidates) > 4 else ''} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); re-run preprocessing for those "
            "samples or use --loader dataloader"
        ) from exc


# ---- ImageNet JPEG decoding for repa_fast.tools.preprocess --decoder dali -----------------------------------------

MAX_HALVINGS = 4  # BOX halvings the static graph can apply: sources up to 2**5 x the output side


def _crop_inputs(paths: list[str], batches: list[list[int]], size: int):
    """Per batch: encoded bytes, the ADM sizes (transforms.adm_crop_geometry) and the indices, for external_source."""
    import PIL.Image

    from .transforms import adm_crop_geometry

    for batch in batches:
        data, steps, final, offset = [], [[] for _ in range(MAX_HALVINGS)], [], []
        for i in batch:
            path = paths[i]
            try:
                with PIL.Image.open(path) as im:  # header only
                    w, h = im.size
            except (OSError, SyntaxError, ValueError) as exc:
                raise DataError(f"{path}: cannot decode source image ({exc}); remove or replace the file") from exc
            halvings, resized, crop = adm_crop_geometry(w, h, size)
            if len(halvings) > MAX_HALVINGS:
                raise DataError(f"{path}: {w}x{h} needs {len(halvings)} halvings (> {MAX_HALVINGS}); use --decoder pil")
            cur = (h, w)
            for k in range(MAX_HALVINGS):
                cur = halvings[k] if k < len(halvings) else cur
                steps[k].append(np.array(cur, dtype=np.float32))
            data.append(np.fromfile(path, dtype=np.uint8))
            final.append(np.array(resized, dtype=np.float32))
            offset.append(np.array(crop, dtype=np.int32))
        yield (data, *steps, final, offset, [np.array(i, dtype=np.int64) for i in batch])


def adm_crop_batches(paths, batches, size: int, device, *, num_threads: int = 4):
    """Yields ``(indices int64 (B,), images uint8 (B, 3, S, S))`` per batch of ``batches``: DALI decodes (nvJPEG on
    the GPU when ``dali_gpu_available``, else its CPU decoder, bit-identical to PIL's libjpeg here) and approximates
    the ADM crop: each BOX halving as a LINEAR resize to the same size (an exact 2x2 box for even sides), the
    BICUBIC resize with DALI's antialiased cubic (not PIL's a = -0.5 fixed-point kernel), the crop at ADM's offsets.
    EXIF orientation is ignored, as by PIL's ``open``. The differences from PIL are measured in bench/bench_data.py.
    """
    dali = _require_dali()
    fn, types = dali.fn, dali.types
    device = torch.device(device)
    dev = pipeline_devices(device)
    batches = [list(b) for b in batches]
    if not batches:
        return
    crop_shape = np.array([size, size], dtype=np.int32)

    @dali.pipeline_def(
        batch_size=max(len(b) for b in batches),
        num_threads=num_threads,
        device_id=dev["device_id"],
        prefetch_queue_depth=PREFETCH,
    )
    def pipe():
        encoded, *steps, final, offset, idx = fn.external_source(
            source=_crop_inputs(paths, batches, size), num_outputs=MAX_HALVINGS + 4, batch=True
        )
        image = fn.decoders.image(encoded, device=dev["decoder"], output_type=types.RGB, adjust_orientation=False)
        for hw in steps:  # identity when no halving is due
            image = fn.resize(image, size=hw, interp_type=types.INTERP_LINEAR, antialias=False)
        image = fn.resize(image, size=final, interp_type=types.INTERP_CUBIC, antialias=True)
        image = fn.slice(image, start=offset, shape=crop_shape, axis_names="HW")
        image = fn.transpose(image, perm=[2, 0, 1])  # (3, S, S)
        return image.gpu() if dev["output"] == "gpu" else image, idx

    p = pipe()
    p.build()
    for b in range(len(batches)):
        try:
            image, idx = p.run()
        except StopIteration:
            return
        except RuntimeError as exc:
            _raise_source_error(paths, batches[b : b + PREFETCH + 1], exc)
        yield _to_torch(idx, torch.device("cpu")).reshape(-1), _to_torch(image, device)


def _raise_source_error(paths, batches, exc):
    """The first file PIL cannot decode among the failing batch and the prefetched ones, else DALI's message."""
    import PIL.Image

    names = [paths[i] for b in batches for i in b]
    for path in names:
        try:
            with PIL.Image.open(path) as im:
                im.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path}: cannot decode source image ({err}); remove or replace the file") from exc
    raise DataError(
        f"DALI failed on a batch holding {names[:4]}{' ...' if len(names) > 4 else ''} ({str(exc).splitlines()[0]}); "
        "rerun with --decoder pil"
    ) from exc
