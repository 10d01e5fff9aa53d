"""Per-sample read time of the two dataset layouts (REPA folder of PNG + .npy vs packed memory-mapped arrays).

    python bench/bench_data.py [--n 256] [--resolution 256]

Writes a synthetic REPA-layout dataset (random uint8 images saved as PNG like the reference's converter, Gaussian
moments as .npy) to a temporary directory, packs it with repa_fast.data.pack, and times ``dataset[i]`` over a
shuffled pass of each (median of 3 passes, one process, warm page cache).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repa_fast.data import open_dataset  # noqa: E402
from repa_fast.data.pack import pack  # noqa: E402
from repa_fast.data.ref_layout import ref_feature_name, ref_image_name  # noqa: E402


def write_ref_layout(root: str, n: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        img, feat = ref_image_name(i), ref_feature_name(i)
        for sub, name in (("images", img), ("vae-sd", feat)):
            os.makedirs(os.path.join(root, sub, os.path.dirname(name)), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
            os.path.join(root, "images", img)
        )
        lat = resolution // 8
        np.save(os.path.join(root, "vae-sd", feat), rng.standard_normal((8, lat, lat)).astype(np.float32))
        labels.append([feat, int(rng.integers(0, 1000))])
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)


def time_reads(ds, passes: int = 3) -> float:
    order = np.random.default_rng(1).permutation(len(ds))
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in order:
            ds[int(i)]
        times.append((time.perf_counter() - t0) / len(ds))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--resolution", type=int, default=256)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ref, packed = os.path.join(tmp, "ref"), os.path.join(tmp, "packed")
        write_ref_layout(ref, args.n, args.resolution)
        pack(ref, packed, progress=False, workers=0)
        for name, path in (("REPA folder (PNG + npy)", ref), ("packed (memory-mapped)", packed)):
            sec = time_reads(open_dataset(path))
            print(f"{name}: {sec * 1e3:.3f} ms per sample ({args.resolution} px, {args.n} samples)")


if __name__ == "__main__":
    main()
