"""The frozen encoders' targets, computed once per image and stored beside the data (``--targets cached``).

    python -m repa_fast.tools.cache_targets DATA --enc-type dinov2-vit-b [--dtype bf16|fp16|fp32] [--batch-size 256]
    torchrun --nproc_per_node 8 -m repa_fast.tools.cache_targets DATA ...          (one process per GPU)

REPA trains without augmentation, so the targets ``z = encoder(image)`` (docs/objective.md §Alignment loss) of a
sample never change: computing them once moves the encoder's forward (6% of an SiT-XL/2 step's FLOPs, 23% of
SiT-B/2's) and the image reads out of training, for disk: DINOv2-B at 256 px is 256 x 768 values per image
(384 KiB in bf16, ~0.5 TB for ImageNet-1k's 1.28M images, more than the images themselves).

Layout (``DATA/targets/`` unless ``--out``):
    header.json              format, count, encoders (name, tokens, width, weights SHA-256, file), resolution, grid,
                             preprocessing, stored dtype, compute dtype, batch size, dataset fingerprint
    <enc-type>.npy           (N, T, D) per encoder, row i = dataset item i; bf16 is stored as uint16 bit patterns
    <enc-type>.cls.npy       (N, D) per encoder with --with-cls: the class token REG reads (docs/methods.md §REG,
                             ``encoder(images, with_cls=True)``), same dtype; the header then has "class_tokens"

Rows are computed in dataset order, ``--batch-size`` rows per encoder forward. A training run reading the cache
checks every field of the header against its own encoders (weights hash included) and data, and refuses a cache
made differently, naming the field. Bitwise note: the forward of one image can depend on the batch it is computed
in (CPU GEMM blocking), so an fp32 cache reproduces the computed targets' bits when both passes use the same batch
size and precision.

Work happens in ``<out>.tmp/``, cut into shards of --shard-size rows; shard s belongs to rank s % world and a
finished shard leaves a marker, so a restart with the same arguments continues. Rank 0 writes ``header.json`` last
and renames ``<out>.tmp`` to ``<out>``: the cache directory is never half-made.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repa_fast import errors
from repa_fast.build import AMP_DTYPES as COMPUTE_DTYPES  # autocast, as --mixed-precision
from repa_fast.data.cached_targets import (
    _NUMPY_STORAGE,
    _TORCH_DTYPES,
    HEADER_FILE,
    STORE_DTYPES,
    _differences,
    default_cache_dir,
    describe,
    read_header,
)
from repa_fast.data.common import DataError, LatentDataset
from repa_fast.engine.parallel.process_group import launch_env
from repa_fast.io import publish, write_text

logger = logging.getLogger("repa_fast.tools.cache_targets")

PROGRESS_DIR = ".progress"


def _atomic_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


# ---- writing -----------------------------------------------------------------------------------------------------


class _Images(Dataset):
    """(index, image) of the dataset: only what the encoders see."""

    def __init__(self, ds: LatentDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, self.ds[i][0]


def _to_storage(z: torch.Tensor, dtype: str, first_row: int, ds: LatentDataset) -> np.ndarray:
    """(B, T, D) float -> numpy rows in the storage dtype; fp16 overflow is an error naming the sample."""
    z = z.detach().float().cpu().to(_TORCH_DTYPES[STORE_DTYPES[dtype]])
    if dtype != "fp32":
        finite = torch.isfinite(z.float()).flatten(1).all(dim=1)
        if not bool(finite.all()):
            row = first_row + int((~finite).nonzero()[0, 0])
            raise DataError(
                f"{ds.path}: item {row}: its targets overflow {dtype} (|value| > 65504 for fp16); use --dtype bf16 "
                "or fp32"
            )
    if dtype == "bf16":
        return z.view(torch.int16).numpy().view(np.uint16)
    return z.numpy()


class Job:
    """One cache run: the plan every rank agrees on, shard work, finalisation (as repa_fast.tools.preprocess)."""

    def __init__(
        self, ds, encoders, out: str, *, dtype: str, compute: str, batch_size: int, shard_size: int, with_cls=False
    ):
        if dtype not in STORE_DTYPES:
            raise DataError(f"--dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
        if shard_size % batch_size:
            raise DataError(f"--shard-size {shard_size} must be a multiple of --batch-size {batch_size}")
        self.ds, self.encoders, self.out = ds, encoders, os.path.normpath(out)
        self.dtype, self.compute, self.batch_size, self.shard_size = dtype, compute, batch_size, shard_size
        self.work = self.out + ".tmp"
        self.progress = os.path.join(self.work, PROGRESS_DIR)
        self.with_cls = with_cls
        self.plan = describe(encoders, ds, dtype, compute, batch_size, with_cls)
        self.num_shards = -(-len(ds) // shard_size)

    def is_complete(self) -> bool:
        if not os.path.isfile(os.path.join(self.out, HEADER_FILE)):
            if os.path.exists(self.out):
                raise DataError(f"{self.out}: exists but is not a target cache; choose another --out or delete it")
            return False
        diff = _differences(read_header(self.out), self.plan)
        if diff:
            raise DataError(
                f"{self.out}: holds a target cache made differently ({'; '.join(diff)}); pass another --out or "
                "delete it"
            )
        return True

    def prepare(self) -> None:
        """Rank 0: allocate the arrays in the work area, or check an unfinished one is for this plan."""
        plan_path = os.path.join(self.progress, "plan.json")
        if os.path.isfile(plan_path):
            return self._check_plan(plan_path)
        if os.path.exists(self.work):
            raise DataError(f"{self.work}: exists but holds no unfinished cache run; move it away or delete it")
        os.makedirs(self.progress)
        storage = _NUMPY_STORAGE[STORE_DTYPES[self.dtype]]
        for e in self.plan["encoders"]:
            shape = (len(self.ds), e["tokens"], e["embed_dim"])
            del_me = np.lib.format.open_memmap(os.path.join(self.work, e["file"]), "w+", storage, shape)
            del del_me
            if "cls_file" in e:
                path = os.path.join(self.work, e["cls_file"])
                del_me = np.lib.format.open_memmap(path, "w+", storage, (len(self.ds), e["embed_dim"]))
                del del_me
        _atomic_json(plan_path, self.plan)  # last: its presence means the area is ready

    def _check_plan(self, plan_path: str) -> None:
        with open(plan_path) as f:
            diff = _differences(json.load(f), self.plan)
        if diff:
            raise DataError(
                f"{self.work}: holds an unfinished cache run made differently ({'; '.join(diff)}); rerun with the "
                f"same arguments to resume, or delete {self.work} to start over"
            )

    def wait_prepared(self, timeout_s: float) -> None:
        plan_path = os.path.join(self.progress, "plan.json")
        deadline = time.monotonic() + timeout_s
        while not os.path.isfile(plan_path):
            if time.monotonic() > deadline:
                raise DataError(f"{plan_path}: rank 0 did not create the work area in time; check rank 0's log")
            time.sleep(0.5)
        self._check_plan(plan_path)

    def _marker(self, shard: int) -> str:
        return os.path.join(self.progress, f"shard-{shard:06d}.done")

    def pending_shards(self, rank: int, world: int) -> list[int]:
        return [s for s in range(rank, self.num_shards, world) if not os.path.isfile(self._marker(s))]

    def run_shards(self, rank: int, world: int, workers: int = 0) -> int:
        """Compute this rank's unfinished shards; returns the number of rows written."""
        shards = self.pending_shards(rank, world)
        n, b, done = len(self.ds), self.batch_size, 0
        batches = []
        for s in shards:
            lo, hi = s * self.shard_size, min((s + 1) * self.shard_size, n)
            batches += [list(range(i, min(i + b, hi))) for i in range(lo, hi, b)]
        arrays = [np.load(os.path.join(self.work, e["file"]), mmap_mode="r+") for e in self.plan["encoders"]]
        if self.with_cls:  # the class tokens' arrays follow the patch tokens' (same rows)
            arrays += [np.load(os.path.join(self.work, e["cls_file"]), mmap_mode="r+") for e in self.plan["encoders"]]
        device = next(self.encoders[0].parameters()).device
        amp = COMPUTE_DTYPES[self.compute]
        loader = DataLoader(_Images(self.ds), batch_sampler=batches, num_workers=workers)
        for idx, images in loader:
            images = images.to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if self.with_cls:  # (B, T, D) then (B, D) each, as the trainer's step_targets for REG
                    outs = [enc(images, with_cls=True) for enc in self.encoders]
                    zs = [o[0] for o in outs] + [o[1] for o in outs]
                else:
                    zs = [enc(images) for enc in self.encoders]  # (B, T, D) each, as the trainer's micro_step
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            for arr, z in zip(arrays, zs):
                arr[lo:hi] = _to_storage(z, self.dtype, lo, self.ds)
            done += hi - lo
            if hi == n or hi % self.shard_size == 0:
                for arr in arrays:
                    arr.flush()  # rows reach the file before the marker claims them
                open(self._marker((hi - 1) // self.shard_size), "w").close()
        return done

    def wait_all_done(self, timeout_s: float) -> None:
        pending, deadline = self.pending_shards(0, 1), time.monotonic() + timeout_s
        while pending:
            time.sleep(0.5)
            now = self.pending_shards(0, 1)
            if len(now) < len(pending):
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise DataError(f"{self.progress}: shards {now[:8]} unfinished; check the other ranks, then rerun")
            pending = now

    def finalize(self) -> str:
        _atomic_json(os.path.join(self.work, HEADER_FILE), self.plan)
        shutil.rmtree(self.progress)
        return publish(self.work, self.out)


def cache_targets(
    data_dir: str,
    enc_type: str,
    *,
    out: str | None = None,
    dtype: str = "bf16",
    mixed_precision: str = "no",
    batch_size: int = 256,
    shard_size: int | None = None,
    resolution: int | None = None,
    num_classes: int = 1000,
    encoder_checkpoint_dir: str | None = None,
    encoder_pretrained: bool = True,
    encoder_grid: int | None = None,
    seed: int = 0,
    kernels: str = "auto",
    device: str = "auto",
    workers: int = 0,
    wait_timeout_s: float = 3600.0,
    with_cls: bool = False,
) -> str | None:
    """Compute (or resume) the cache; returns its directory (None on ranks other than 0). Random-weight encoders
    (``encoder_pretrained=False``, tests and demo) are drawn after ``torch.manual_seed(seed)`` as the trainer does."""
    from repa_fast.build import build_encoders, seed_everything
    from repa_fast.config import TrainConfig
    from repa_fast.data import open_dataset

    rank, world, _ = launch_env()
    if mixed_precision not in COMPUTE_DTYPES:
        raise DataError(f"--mixed-precision must be one of {sorted(COMPUTE_DTYPES)}, got {mixed_precision!r}")
    ds = open_dataset(data_dir, num_classes=num_classes, resolution=resolution)
    if device == "auto":
        local = launch_env(default_local_rank=rank)[2]
        device = f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig()  # the encoders exactly as train.py builds them from the same options (repa_fast.build)
    cfg.update(
        dict(
            enc_type=enc_type,
            encoder_checkpoint_dir=encoder_checkpoint_dir,
            encoder_grid=encoder_grid,
            encoder_pretrained=encoder_pretrained,
            kernels=kernels,
        ),
        source="command line",
    )
    seed_everything(seed)
    try:
        encoders = build_encoders(cfg, ds.resolution, torch.device(device), enc_type=enc_type)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        raise DataError(f"--enc-type {enc_type}: {exc}") from exc
    job = Job(
        ds,
        encoders,
        out or default_cache_dir(data_dir),
        dtype=dtype,
        compute=mixed_precision,
        batch_size=batch_size,
        shard_size=shard_size or batch_size * max(1, 4096 // batch_size),
        with_cls=with_cls,
    )
    if job.is_complete():
        logger.info("%s: already complete", job.out)
        return job.out
    job.prepare() if rank == 0 else job.wait_prepared(wait_timeout_s)
    job.run_shards(rank, world, workers)
    if rank != 0:
        return None
    job.wait_all_done(wait_timeout_s)
    return job.finalize()


@errors.entry_point("python -m repa_fast.tools.cache_targets")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repa_fast.tools.cache_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", metavar="DATA", help="training data: REPA folder layout or packed")
    p.add_argument("--enc-type", required=True, help="comma-separated target encoders, as train.py --enc-type")
    p.add_argument("--dtype", choices=sorted(STORE_DTYPES), default="bf16", help="storage dtype of the targets")
    p.add_argument("--out", default=None, help="cache directory (default DATA/targets; train.py --targets-dir)")
    p.add_argument(
        "--mixed-precision",
        choices=sorted(COMPUTE_DTYPES),
        default="no",
        help="autocast of the encoder forward (no = fp32, the most exact; match train.py to reproduce its bits)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="rows per encoder forward, per process")
    p.add_argument("--shard-size", type=int, default=None, help="rows per resumable unit (multiple of batch size)")
    p.add_argument("--resolution", type=int, default=None, help="check the data's resolution (default: the data's)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--encoder-checkpoint-dir", default=None, help="as train.py")
    p.add_argument("--encoder-grid", type=int, default=None, help="as train.py (default resolution // 16)")
    p.add_argument("--no-encoder-pretrained", dest="encoder_pretrained", action="store_false", help="random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of random-weight encoders (as train.py --seed)")
    p.add_argument("--kernels", choices=("auto", "triton", "ref"), default="auto", help="as train.py")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda:0")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes reading the images")
    p.add_argument(
        "--with-cls",
        action="store_true",
        help="also store each encoder's class token (REG's target, <enc-type>.cls.npy): needed by --reg runs",
    )
    errors.add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = cache_targets(
        args.data_dir,
        args.enc_type,
        **{k: v for k, v in vars(args).items() if k not in ("data_dir", "enc_type", "debug")},
    )
    if out is not None:
        print(f"{out}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
