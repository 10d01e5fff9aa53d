"""Convert the REPA folder layout into the packed layout, streaming, resumable and atomic.

    python -m repa_fast.tools.pack SRC DST [--latent-dtype fp32|fp16] [--num-classes 1000] [--workers 4]
    python -m repa_fast.tools.pack --verify DST

Rows keep the reference's sorted order (row i of DST is item i of the REPA dataset SRC). Work happens in
``DST.tmp/``; a progress file there records the rows already flushed, so an interrupted run continues where it
stopped; ``DST.tmp`` is renamed to ``DST`` only once the index is written, so ``DST`` is never half-made.
Memory use is one batch: rows go straight from the DataLoader into memory-mapped files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from repa_fast import errors
from repa_fast.cli import ranged
from repa_fast.config import AT_LEAST_1, NON_NEGATIVE
from repa_fast.data.common import DataError
from repa_fast.data.packed import (
    LATENT_DTYPES,
    allocate_fields,
    field_specs,
    is_packed_layout,
    open_fields,
    verify_packed,
    write_index,
)
from repa_fast.data.ref_layout import RefFolderDataset
from repa_fast.io import TMP_PREFIX, publish, resumable_work, write_json

PROGRESS_FILE = "progress.json"


def _plan(ds: RefFolderDataset, latent_dtype: str) -> dict:
    names = hashlib.sha256("\n".join(ds.feature_fnames + ds.image_fnames).encode()).hexdigest()
    return {
        "source": os.path.abspath(ds.path),
        "count": len(ds),
        "resolution": ds.resolution,
        "latent_shape": list(ds.latent_shape),
        "latent_dtype": latent_dtype,
        "file_list_sha256": names,
    }


def _start_or_resume(tmp: str, plan: dict, specs: dict) -> int:
    """Rows already done in ``tmp`` (0 for a fresh start); refuses a tmp dir made for other inputs."""
    progress_path = os.path.join(tmp, PROGRESS_FILE)
    if os.path.isfile(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        if progress.get("plan") != plan:
            raise DataError(
                f"{tmp}: left by an interrupted pack of different inputs or options "
                f"({progress.get('plan')}); delete {tmp} to start over"
            )
        return int(progress["done"])
    if os.path.exists(tmp):
        ours = {spec["file"] for spec in specs.values()}
        if not {f for f in os.listdir(tmp) if not f.startswith(TMP_PREFIX)} <= ours:
            raise DataError(f"{tmp}: exists and holds files pack did not write; move it away or delete it")
        shutil.rmtree(tmp)  # allocation itself was interrupted: nothing in it is worth keeping
    allocate_fields(tmp, specs)
    write_json(progress_path, {"plan": plan, "done": 0})
    return 0


def _to_latent_dtype(moments: torch.Tensor, dtype: str, first_row: int, ds: RefFolderDataset) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is reported below, with the file name
        out = moments.numpy().astype(dtype)
    if dtype == "float16":
        finite = np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
        if not finite.all():
            row = first_row + int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"{os.path.join(ds.features_dir, ds.feature_fnames[row])}: moments overflow float16 "
                "(|value| > 65504); pack with --latent-dtype fp32"
            )
    return out


def pack(
    src: str,
    dst: str,
    *,
    latent_dtype: str = "fp32",
    num_classes: int = 1000,
    workers: int = 4,
    batch_size: int = 64,
    flush_every: int = 4096,
    progress: bool = True,
) -> dict:
    """Convert REPA layout ``src`` into packed ``dst``; returns the written index."""
    if latent_dtype not in LATENT_DTYPES:
        raise DataError(f"--latent-dtype must be one of {sorted(LATENT_DTYPES)}, got {latent_dtype!r}")
    dst = os.path.normpath(dst)
    if os.path.exists(dst):
        what = "a packed dataset" if is_packed_layout(dst) else "something"
        raise DataError(f"{dst}: already exists ({what}); pick a new destination or delete it")
    ds = RefFolderDataset(src, num_classes=num_classes)
    dtype = LATENT_DTYPES[latent_dtype]
    specs = field_specs(len(ds), ds.resolution, ds.latent_shape, dtype)
    plan = _plan(ds, dtype)
    tmp = dst + ".tmp"
    with resumable_work(tmp, f"The work area {tmp} keeps the rows already written: rerun the same command."):
        return _pack_into(ds, src, dst, tmp, plan, specs, dtype, workers, batch_size, flush_every, progress)


def _pack_into(ds, src, dst, tmp, plan, specs, dtype, workers, batch_size, flush_every, progress) -> dict:
    done = _start_or_resume(tmp, plan, specs)
    arrays = open_fields(tmp, specs, mode="r+")
    loader = DataLoader(Subset(ds, range(done, len(ds))), batch_size=batch_size, num_workers=workers)
    from tqdm import tqdm

    bar = tqdm(total=len(ds), initial=done, unit="img", desc=f"pack {os.path.basename(dst)}", disable=not progress)
    row, since_flush = done, 0
    for images, moments, labels in loader:
        n = labels.shape[0]
        arrays["images"][row : row + n] = images.numpy()
        arrays["moments"][row : row + n] = _to_latent_dtype(moments, dtype, row, ds)
        arrays["labels"][row : row + n] = labels.numpy()
        row, since_flush = row + n, since_flush + n
        bar.update(n)
        if since_flush >= flush_every or row == len(ds):
            for a in arrays.values():
                a.flush()  # rows reach the file before the progress file claims them
            write_json(os.path.join(tmp, PROGRESS_FILE), {"plan": plan, "done": row})
            since_flush = 0
    bar.close()
    del arrays
    source = {"layout": "ref", "path": os.path.abspath(src), "order": "reference sorted order"}
    index = write_index(tmp, specs, resolution=ds.resolution, latent_shape=ds.latent_shape, source=source)
    os.remove(os.path.join(tmp, PROGRESS_FILE))
    publish(tmp, dst)
    return index


@errors.entry_point("pack")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repa_fast.tools.pack", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="SRC DST: REPA-layout source, packed destination (with --verify: the packed dataset only)",
    )
    p.add_argument(
        "--latent-dtype",
        choices=sorted(LATENT_DTYPES),
        default="fp32",
        help="storage dtype of the moments (fp32 = the reference's bits; fp16 halves the size)",
    )
    p.add_argument(
        "--num-classes", type=ranged(int, AT_LEAST_1), default=1000, help="labels must lie in [0, num_classes)"
    )
    p.add_argument(
        "--workers", type=ranged(int, NON_NEGATIVE), default=4, help="DataLoader processes decoding the source files"
    )
    p.add_argument("--batch-size", type=ranged(int, AT_LEAST_1), default=64)
    p.add_argument("--verify", action="store_true", help="fully verify a packed dataset (SHA-256 + every row)")
    errors.add_debug_flag(p)
    args = p.parse_args(argv)
    if args.verify:
        if len(args.paths) != 1:
            p.error("--verify takes exactly one path: the packed dataset")
        index = verify_packed(args.paths[0], num_classes=args.num_classes)
        print(f"{args.paths[0]}: OK ({index['count']} samples, all files match their SHA-256)")
        return 0
    if len(args.paths) != 2:
        p.error("expected SRC DST")
    index = pack(
        *args.paths,
        latent_dtype=args.latent_dtype,
        num_classes=args.num_classes,
        workers=args.workers,
        batch_size=args.batch_size,
    )
    print(f"{args.paths[1]}: packed {index['count']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
