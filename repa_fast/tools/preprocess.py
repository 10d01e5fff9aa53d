"""ImageNet-style JPEG folder -> training data (REPA layout or packed), batched, resumable, multi-process.

    python -m repa_fast.tools.preprocess --source train/ --dest data/imagenet256 --vae sd-vae-ft-mse/ \\
        --resolution 256 --batch-size 64 --layout ref|packed [--workers N] [--latent-dtype fp32|fp16]
    torchrun --nproc_per_node 8 -m repa_fast.tools.preprocess ...      (one process per GPU)

What it computes (docs/objective.md §Latents, REPA ``dataset_tools.py convert`` + ``encode``): image i is the i-th
image file in sorted path order, labelled with the index of its top-level folder among the sorted folders that hold
images (the reference tool's rule: empty folders are no class; for ImageNet this is torchvision ImageFolder's), ADM
center-cropped to --resolution (``transforms.adm_center_crop``), and its SD-VAE posterior [mean, std] from pixels
x / 127.5 - 1 in fp32. The ref layout uses the reference's file names (``00000/img00000000.png``,
``00000/img-mean-std-00000000.npy``, uncompressed PNG) and dataset.json files.

Work is cut into shards of --shard-size consecutive images (1000 = one reference folder); shard s belongs to
rank s % world. A finished shard leaves a marker in ``<work>/.progress/``; a restart with the same arguments
skips finished shards. ``<work>`` is --dest (ref) or ``--dest.tmp`` (packed, renamed to --dest at the end).
Rank 0 (or the parent of --workers processes) creates the work area and finalises once every shard is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repa_fast import errors
from repa_fast.cli import ranged
from repa_fast.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE
from repa_fast.data.common import DataError
from repa_fast.data.packed import LATENT_DTYPES, allocate_fields, field_specs, open_fields, write_index
from repa_fast.data.ref_layout import (
    FEATURES_DIR,
    IMAGES_DIR,
    LABELS_FILE,
    RefFolderDataset,
    ref_feature_name,
    ref_image_name,
)
from repa_fast.data.transforms import adm_center_crop
from repa_fast.data.vae import encode_moments, latent_geometry, load_vae, read_vae_config
from repa_fast.engine.parallel.process_group import launch_env
from repa_fast.io import publish, resumable_work, write_json

PROGRESS_DIR = ".progress"
RECORD_FILE = "preprocess.json"  # ref layout: the finished job's plan (the reference loader ignores it)


@dataclasses.dataclass
class PreprocessConfig:
    source: str
    dest: str
    vae: str
    resolution: int = 256
    batch_size: int = 64
    layout: str = "ref"  # "ref" (REPA folders) or "packed"
    latent_dtype: str = "fp32"  # packed only: "fp32" (reference bits) or "fp16"
    workers: int = 1  # processes started here (use 1 under torchrun)
    loader_workers: int = 2  # JPEG decode + crop processes per rank
    shard_size: int = 1000
    max_images: int | None = None
    device: str = "auto"  # "auto": cuda:<local rank> when CUDA is available, else cpu
    decoder: str = "pil"  # "pil" (exact ADM crop) or "dali" (DALI decode + resize, approximate; dali_loader)
    progress: bool = True
    wait_timeout_s: float = 3600.0  # how long rank 0 waits for the others' shards, others for the work area


def scan_image_folder(source: str, max_images: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) exactly as the reference's dataset tool assigns them.

    REPA preprocessing/dataset_tools.py:65-102 (``open_image_folder``): every image file under --source, at any
    depth, in sorted path order; its label is the index of its top-level folder among the sorted top-level folders
    that hold images. A folder without images is no class (it shifts no label), so a dataset preprocessed by either
    tool has the same labels. (The reference leaves a single-class folder unlabelled; here its label is 0.)
    """
    from repa_fast.data.ref_layout import supported_extensions

    if not os.path.isdir(source):
        raise DataError(
            f"{source}: --source does not exist or is not a directory; point it at the ImageNet train "
            "folder (one subfolder per class, e.g. ILSVRC/Data/CLS-LOC/train)"
        )
    exts = supported_extensions() - {".npy"}
    files = sorted(
        os.path.relpath(os.path.join(d, f), source).replace(os.sep, "/")
        for d, _, fs in os.walk(source)
        for f in fs
        if os.path.splitext(f)[1].lower() in exts
    )
    if not files:
        raise DataError(
            f"{source}: no images (extensions PIL can read); --source must hold one folder of images per class "
            "(ImageFolder layout), labels are the sorted folder index"
        )
    top = [f.split("/")[0] if "/" in f else "" for f in files]  # "" for images directly in --source, as the tool
    classes = sorted(set(top))
    if classes == [""]:  # the reference leaves such a dataset unlabelled; a class-conditional model needs labels
        raise DataError(
            f"{source}: no class subfolders; --source must hold one folder per class (ImageFolder layout), labels "
            "are the sorted folder index"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[c] for c in top]
    if max_images is not None:
        files, labels = files[:max_images], labels[:max_images]
    return files, labels, classes


class _CropDataset(Dataset):
    """(index, (3, S, S) uint8) ADM-cropped source images."""

    def __init__(self, source: str, files: list[str], resolution: int):
        self.source, self.files, self.resolution = source, files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i: int):
        import PIL.Image

        path = os.path.join(self.source, self.files[i])
        try:
            with PIL.Image.open(path) as im:
                arr = adm_center_crop(im, self.resolution)  # (S, S, 3)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot decode source image ({exc}); remove or replace the file") from exc
        return i, torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, S, S)


class _RefWriter:
    def __init__(self, dest: str):
        self.dest = dest

    def write(self, i: int, image: np.ndarray, moments: np.ndarray, label: int) -> None:
        import PIL.Image

        img_path = os.path.join(self.dest, IMAGES_DIR, ref_image_name(i))
        npy_path = os.path.join(self.dest, FEATURES_DIR, ref_feature_name(i))
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.dirname(npy_path), exist_ok=True)
        # Uncompressed PNG, as the reference's convert step writes it.
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(img_path, format="png", compress_level=0, optimize=False)
        np.save(npy_path, moments.astype(np.float32))

    def flush(self) -> None:
        pass


class _PackedWriter:
    def __init__(self, work: str, specs: dict, latent_dtype: str):
        self.arrays = open_fields(work, specs, mode="r+")
        self.latent_dtype = latent_dtype

    def write(self, i: int, image: np.ndarray, moments: np.ndarray, label: int) -> None:
        self.arrays["images"][i] = image
        self.arrays["moments"][i] = moments.astype(self.latent_dtype)
        self.arrays["labels"][i] = label

    def flush(self) -> None:
        for a in self.arrays.values():
            a.flush()


class Job:
    """One preprocessing run: the plan every rank agrees on, shard work and finalisation."""

    def __init__(self, cfg: PreprocessConfig):
        if cfg.layout not in ("ref", "packed"):
            raise DataError(f"--layout must be 'ref' or 'packed', got {cfg.layout!r}")
        if cfg.decoder not in ("pil", "dali"):
            raise DataError(f"--decoder must be 'pil' or 'dali', got {cfg.decoder!r}")
        if cfg.latent_dtype not in LATENT_DTYPES:
            raise DataError(f"--latent-dtype must be one of {sorted(LATENT_DTYPES)}, got {cfg.latent_dtype!r}")
        self.cfg = cfg
        self.files, self.labels, self.classes = scan_image_folder(cfg.source, cfg.max_images)
        self.latent_shape = latent_geometry(read_vae_config(cfg.vae), cfg.resolution)
        self.dtype = LATENT_DTYPES[cfg.latent_dtype]
        self.specs = field_specs(len(self.files), cfg.resolution, self.latent_shape, self.dtype)
        self.work = cfg.dest if cfg.layout == "ref" else os.path.normpath(cfg.dest) + ".tmp"
        self.progress = os.path.join(self.work, PROGRESS_DIR)
        self.num_shards = -(-len(self.files) // cfg.shard_size)
        listing = "\n".join(f"{f}\t{lab}" for f, lab in zip(self.files, self.labels))
        self.plan = {
            "source": os.path.abspath(cfg.source),
            "count": len(self.files),
            "layout": cfg.layout,
            "resolution": cfg.resolution,
            "latent_shape": list(self.latent_shape),
            "latent_dtype": self.dtype,
            "shard_size": cfg.shard_size,
            "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }
        if cfg.decoder != "pil":  # other pixels: a run is not resumed (nor reused) with the other decoder
            self.plan["decoder"] = cfg.decoder

    # ---- work area -------------------------------------------------------------------------------------------
    def _finished_plan(self) -> dict | None:
        """The plan of a finished dataset at --dest ({} if made by another tool), None if there is none."""
        dest = self.cfg.dest
        if self.cfg.layout == "packed":
            if not os.path.isfile(os.path.join(dest, "index.json")):
                return None
            with open(os.path.join(dest, "index.json")) as f:
                return json.load(f).get("source", {}).get("plan", {})
        if os.path.isdir(self.progress):
            return None
        if os.path.isfile(os.path.join(dest, RECORD_FILE)):
            with open(os.path.join(dest, RECORD_FILE)) as f:
                return json.load(f)["plan"]
        return {} if os.path.isfile(os.path.join(dest, FEATURES_DIR, LABELS_FILE)) else None

    def is_complete(self) -> bool:
        """True when --dest is this very job, finished; a finished *different* dataset there is an error."""
        plan = self._finished_plan()
        if plan is None:
            return False
        if plan != self.plan:
            what = (
                "with different "
                + ", ".join(sorted(k for k in {**plan, **self.plan} if plan.get(k) != self.plan.get(k)))
                if plan
                else "by another tool"
            )
            raise DataError(f"{self.cfg.dest}: already holds a finished dataset made {what}; choose another --dest")
        return True

    def _check_plan(self, plan_path: str) -> None:
        with open(plan_path) as f:
            old = json.load(f)
        if old != self.plan:
            diff = sorted(k for k in {**old, **self.plan} if old.get(k) != self.plan.get(k))
            raise DataError(
                f"{self.work}: holds an unfinished run with different {', '.join(diff)}; rerun with the "
                f"same arguments to resume, or delete {self.work} to start over"
            )

    def prepare(self) -> None:
        """Rank 0: create the work area (or check that an unfinished one is for this plan)."""
        plan_path = os.path.join(self.progress, "plan.json")
        if os.path.isfile(plan_path):
            return self._check_plan(plan_path)
        if self.cfg.layout == "packed" and os.path.exists(self.cfg.dest):
            raise DataError(f"{self.cfg.dest}: --dest already exists; pick a new destination or delete it")
        if os.path.isdir(self.work) and os.listdir(self.work):
            ours = {PROGRESS_DIR} | {s["file"] for s in self.specs.values()}
            if self.cfg.layout == "ref" or not set(os.listdir(self.work)) <= ours:
                raise DataError(
                    f"{self.work}: not empty and not an unfinished preprocessing run; use an empty or new destination"
                )
        os.makedirs(self.progress, exist_ok=True)
        if self.cfg.layout == "packed":
            allocate_fields(self.work, self.specs)
        write_json(plan_path, self.plan)  # written last: its presence means the area is ready

    def wait_prepared(self) -> None:
        plan_path = os.path.join(self.progress, "plan.json")
        deadline = time.monotonic() + self.cfg.wait_timeout_s
        while not os.path.isfile(plan_path):
            if time.monotonic() > deadline:
                raise DataError(f"{plan_path}: rank 0 did not create the work area in time; check rank 0's log")
            time.sleep(1.0)
        self._check_plan(plan_path)

    def _marker(self, shard: int) -> str:
        return os.path.join(self.progress, f"shard-{shard:06d}.done")

    def pending_shards(self, rank: int, world: int) -> list[int]:
        return [s for s in range(rank, self.num_shards, world) if not os.path.isfile(self._marker(s))]

    # ---- shard work --------------------------------------------------------------------------------------------
    def _device(self, rank: int) -> torch.device:
        if self.cfg.device != "auto":
            return torch.device(self.cfg.device)
        if torch.cuda.is_available():
            local = launch_env(default_local_rank=rank)[2]  # a --workers child: its index picks the GPU
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")

    def _batches(self, shards: list[int]) -> list[list[int]]:
        """Batches of image indices that never straddle two shards (a shard completes at a batch boundary)."""
        out, n, b = [], len(self.files), self.cfg.batch_size
        for s in shards:
            lo, hi = s * self.cfg.shard_size, min((s + 1) * self.cfg.shard_size, n)
            out += [list(range(i, min(i + b, hi))) for i in range(lo, hi, b)]
        return out

    def _crops(self, shards: list[int], rank: int):
        """(indices, uint8 (B, 3, S, S)) batches: PIL in DataLoader workers, or DALI (--decoder dali)."""
        if self.cfg.decoder == "dali":
            from repa_fast.data.dali_loader import adm_crop_batches

            paths = [os.path.join(self.cfg.source, f) for f in self.files]
            threads = max(1, self.cfg.loader_workers)
            return adm_crop_batches(
                paths, self._batches(shards), self.cfg.resolution, self._device(rank), num_threads=threads
            )
        return DataLoader(
            _CropDataset(self.cfg.source, self.files, self.cfg.resolution),
            batch_sampler=self._batches(shards),
            num_workers=self.cfg.loader_workers,
        )

    def run_shards(self, rank: int, world: int) -> int:
        """Process this rank's unfinished shards; returns the number of images written."""
        shards = self.pending_shards(rank, world)
        if not shards:
            return 0
        vae = load_vae(self.cfg.vae, self._device(rank))
        writer = _RefWriter(self.work) if self.cfg.layout == "ref" else _PackedWriter(self.work, self.specs, self.dtype)
        loader = self._crops(shards, rank)
        left = {s: min(self.cfg.shard_size, len(self.files) - s * self.cfg.shard_size) for s in shards}
        from tqdm import tqdm

        bar = tqdm(
            total=sum(left.values()), unit="img", desc=f"rank {rank}", position=rank, disable=not self.cfg.progress
        )
        for idx, images in loader:
            moments = encode_moments(vae, images).cpu().numpy()  # (B, 2C, h, w)
            self._write_batch(writer, idx.tolist(), images.cpu().numpy(), moments)
            shard = int(idx[0]) // self.cfg.shard_size
            left[shard] -= len(idx)
            bar.update(len(idx))
            if left[shard] == 0:
                writer.flush()  # the rows are on disk before the marker says so
                open(self._marker(shard), "w").close()
        bar.close()
        return int(bar.n)

    def _write_batch(self, writer, idx: list[int], images: np.ndarray, moments: np.ndarray) -> None:
        finite = np.isfinite(moments.reshape(len(idx), -1)).all(axis=1)
        if not finite.all():
            bad = idx[int(np.flatnonzero(~finite)[0])]
            raise DataError(
                f"{os.path.join(self.cfg.source, self.files[bad])}: the VAE produced NaN/inf moments; "
                "check the VAE weights (--vae) and this image"
            )
        for k, i in enumerate(idx):
            writer.write(i, images[k], moments[k], self.labels[i])

    # ---- finalisation ------------------------------------------------------------------------------------------
    def wait_all_done(self) -> None:
        """Rank 0: wait for the other ranks' shards; gives up after wait_timeout_s without any shard finishing."""
        pending = self.pending_shards(0, 1)
        deadline = time.monotonic() + self.cfg.wait_timeout_s
        while pending:
            time.sleep(1.0)
            now = self.pending_shards(0, 1)
            if len(now) < len(pending):
                deadline = time.monotonic() + self.cfg.wait_timeout_s
            elif time.monotonic() > deadline:
                raise DataError(
                    f"{self.progress}: shards {now[:8]} are still unfinished; check the other ranks, "
                    "then rerun the same command to resume"
                )
            pending = now

    def finalize(self) -> str:
        if self.cfg.layout == "ref":
            for sub, name in ((IMAGES_DIR, ref_image_name), (FEATURES_DIR, ref_feature_name)):
                labels = [[name(i), lab] for i, lab in enumerate(self.labels)]
                write_json(os.path.join(self.work, sub, LABELS_FILE), {"labels": labels, "classes": self.classes})
            write_json(os.path.join(self.work, RECORD_FILE), {"plan": self.plan, "classes": self.classes})
            shutil.rmtree(self.progress)  # last: from here on the dataset counts as finished
            RefFolderDataset(self.work, num_classes=len(self.classes), resolution=self.cfg.resolution)  # self-check
            return self.work
        source = {
            "layout": "imagefolder",
            "path": os.path.abspath(self.cfg.source),
            "classes": self.classes,
            "order": "class-major, files sorted within a class",
            "plan": self.plan,
        }
        write_index(
            self.work, self.specs, resolution=self.cfg.resolution, latent_shape=self.latent_shape, source=source
        )
        shutil.rmtree(self.progress)
        return publish(self.work, self.cfg.dest)


def _child(cfg: PreprocessConfig, rank: int, world: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        _resumable_writes(Job(cfg).run_shards, cfg, rank, world)
    except errors.RepaFastError as exc:
        print(f"error (worker {rank}): {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _resumable_writes(fn, cfg: PreprocessConfig, *args):
    """``fn(*args)``; a full disk (or another write failure) becomes a WriteError saying that rerunning resumes."""
    with resumable_work(cfg.dest, "Finished shards are kept: rerun the same command to continue."):
        return fn(*args)


def preprocess(cfg: PreprocessConfig) -> str | None:
    """Run (or resume) a preprocessing job; returns the finished dataset path (None on non-zero ranks)."""
    return _resumable_writes(_preprocess, cfg, cfg)


def _preprocess(cfg: PreprocessConfig) -> str | None:
    rank, world, _ = launch_env()
    if world > 1 and cfg.workers > 1:
        raise DataError("use either torchrun (WORLD_SIZE > 1) or --workers N, not both")
    job = Job(cfg)
    if job.is_complete():
        print(f"{cfg.dest}: already complete, nothing to do")
        return cfg.dest
    if cfg.workers > 1:
        job.prepare()
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA-safe; children re-import torch
        procs = [ctx.Process(target=_child, args=(cfg, r, cfg.workers)) for r in range(cfg.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise DataError(f"preprocessing workers {failed} failed (errors above); rerun the same command to resume")
        return job.finalize()
    job.prepare() if rank == 0 else job.wait_prepared()
    job.run_shards(rank, world)
    if rank != 0:
        return None
    job.wait_all_done()
    return job.finalize()


_FLAG_HELP = {
    "resolution": "output side S of the ADM center crop",
    "batch_size": "images per VAE forward",
    "latent_dtype": "packed layout: moment storage, fp32 (the reference's bits) or fp16 (half the size)",
    "workers": "processes to start here, shards split between them (leave 1 under torchrun)",
    "loader_workers": "JPEG decode/crop processes per rank",
    "shard_size": "images per resumable unit (1000 = one reference folder)",
    "device": "VAE device: auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda:0, ...",
    "wait_timeout_s": "seconds without progress after which rank 0 stops waiting for the other ranks' shards (and "
    "they for its setup)",
}


_FLAG_CHECK = {
    "resolution": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "workers": AT_LEAST_1,
    "loader_workers": NON_NEGATIVE,
    "shard_size": AT_LEAST_1,
    "wait_timeout_s": POSITIVE,
}


@errors.entry_point("preprocess")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repa_fast.tools.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="ImageNet-style folder: one subfolder of images per class")
    p.add_argument("--dest", required=True, help="output dataset directory")
    p.add_argument(
        "--vae",
        required=True,
        help="mse (stabilityai/sd-vae-ft-mse, as the reference), ema, a hub id or a local diffusers directory",
    )
    p.add_argument("--layout", choices=["ref", "packed"], default="ref")
    p.add_argument(
        "--decoder",
        choices=["pil", "dali"],
        default="pil",
        help="pil: the exact ADM crop (default); dali: NVIDIA DALI decoding (nvJPEG on the GPU) and resizing, "
        "close to ADM but not bit-equal (README states the measured difference)",
    )
    for f in dataclasses.fields(PreprocessConfig):
        if f.name in _FLAG_HELP:
            choices = sorted(LATENT_DTYPES) if f.name == "latent_dtype" else None
            p.add_argument(
                "--" + f.name.replace("_", "-"),
                type=ranged(type(f.default), _FLAG_CHECK[f.name]) if f.name in _FLAG_CHECK else type(f.default),
                default=f.default,
                choices=choices,
                help=f"{_FLAG_HELP[f.name]} (default {f.default})",
            )
    p.add_argument(
        "--max-images", type=ranged(int, AT_LEAST_1), default=None, help="only the first N images (for a quick subset)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    errors.add_debug_flag(p)
    args = p.parse_args(argv)
    out = preprocess(PreprocessConfig(**{k: v for k, v in vars(args).items() if k != "debug"}))
    if out is not None:
        print(f"{out}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
