"""Data path benchmarks on one CPU core: loaders and layouts, cached targets, DALI preprocessing vs PIL, step time.

    python bench/bench_data.py [--n 256] [--resolution 256] [--jpegs 300] [--skip read,loaders,preprocess,step]

  read        ``dataset[i]`` per layout: REPA folder (PNG + .npy) vs packed (memory-mapped), shuffled, warm cache.
  loaders     samples/s of whole batches per loader and layout, one process / one DALI thread (per CPU core):
              DataLoader on the REPA folder, on the packed layout, with --targets cached (no image read), and
              DALI's CPU pipeline on the REPA folder (GPU decoding cannot run here).
  preprocess  ImageNet-like JPEGs (sizes 300..1024 px, smooth content + detail + noise, quality 90): ADM crop to
              --resolution by PIL (the default, exact) and by ``--decoder dali`` (DALI CPU decode + resize): images/s
              of each, mean/max |delta| in uint8 levels, and the moments of a small random SD-VAE-shaped encoder's
              posterior means on both (no pretrained VAE can be downloaded here).
  step        one training step (repa_fast provider of bench/throughput.py) with computed vs cached targets.
Writes a synthetic dataset to a temporary directory; prints one line per measurement.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from repa_fast.data import ResumableDistributedSampler, open_dataset  # noqa: E402
from repa_fast.data.ref_layout import ref_feature_name, ref_image_name  # noqa: E402
from repa_fast.tools.pack import pack  # noqa: E402


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


def samples_per_s(make_loader, n: int, passes: int = 2) -> float:
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        count = sum(len(batch[2]) for batch in make_loader())
        best = max(best, count / (time.perf_counter() - t0))
    assert count == n
    return best


def bench_loaders(ref: str, packed: str, n: int, batch: int) -> None:
    from torch.utils.data import DataLoader

    from repa_fast.data import cached_targets as cached
    from repa_fast.data.dali_loader import DALILoader, dali_available
    from repa_fast.models.encoders import load_encoders
    from repa_fast.tools import cache_targets as ct

    ds_ref, ds_packed = open_dataset(ref), open_dataset(packed)
    # A DINOv2-B-sized bf16 cache filled with random bits (running ViT-B on 1 core would take minutes): reading it
    # costs the same as reading real targets.
    encs = load_encoders("dinov2-vit-b", ds_ref.resolution, pretrained=False)
    job = ct.Job(
        ds_ref, encs, cached.default_cache_dir(ref), dtype="bf16", compute="no", batch_size=batch, shard_size=batch
    )
    job.prepare()
    arr = np.load(os.path.join(job.work, job.plan["encoders"][0]["file"]), mmap_mode="r+")
    arr[:] = np.random.default_rng(0).integers(0x3C00, 0x4000, arr.shape, dtype=np.uint16)
    arr.flush()
    ds_cached = cached.CachedTargetsDataset(ds_ref, cached.TargetCache(job.finalize()))
    sampler = ResumableDistributedSampler(n, batch, seed=0)
    cases = {
        "DataLoader, REPA folder (PIL PNG + npy)": lambda: DataLoader(ds_ref, batch, sampler=sampler, drop_last=True),
        "DataLoader, packed": lambda: DataLoader(ds_packed, batch, sampler=sampler, drop_last=True),
        "DataLoader, --targets cached (bf16 DINOv2-B targets + npy, no image)": lambda: DataLoader(
            ds_cached, batch, sampler=sampler, drop_last=True
        ),
    }
    if dali_available():
        cases["DALI CPU pipeline (1 thread), REPA folder"] = lambda: DALILoader(
            ds_ref, sampler, batch, device="cpu", num_threads=1
        )
    else:
        print("  DALI not installed (pip install 'repa_fast[dali]'): DALI loader not measured")
    for name, make in cases.items():
        print(f"  {name}: {samples_per_s(make, n // batch * batch):.0f} samples/s per core")


def write_imagenet_like(root: str, n: int) -> list[str]:
    """Photo-like JPEGs: smooth colour field + mid-frequency detail + noise, ImageNet-like sizes, quality 90."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (1024, 768), (333, 500), (500, 500)]
    sizes += [(300, 225), (517, 389), (1023, 683)]
    os.makedirs(root, exist_ok=True)
    paths = []
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        coarse = rng.integers(0, 256, (max(h // 64, 2), max(w // 64, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        mid = rng.standard_normal((max(h // 6, 2), max(w // 6, 2), 3)).astype(np.float32) * 18
        img += np.stack(
            [
                np.asarray(Image.fromarray(mid[..., c], mode="F").resize((w, h), Image.Resampling.BILINEAR))
                for c in range(3)
            ],
            -1,
        )
        img += rng.standard_normal(img.shape).astype(np.float32) * 4
        path = os.path.join(root, f"{k:05d}.JPEG")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def tiny_sd_vae_encoder():
    """An SD-VAE-shaped (8x down, 4 latent channels) random AutoencoderKL, small widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def bench_preprocess(tmp: str, n: int, size: int) -> None:
    from repa_fast.data.dali_loader import adm_crop_batches, dali_available
    from repa_fast.data.transforms import adm_center_crop
    from repa_fast.data.vae import encode_moments

    paths = write_imagenet_like(os.path.join(tmp, "jpeg"), n)
    t0 = time.perf_counter()
    pil = []
    for p in paths:
        with Image.open(p) as im:
            pil.append(adm_center_crop(im, size).transpose(2, 0, 1))
    pil_rate = n / (time.perf_counter() - t0)
    print(f"  PIL decode + ADM crop to {size}: {pil_rate:.1f} images/s per core ({n} JPEGs)")
    if not dali_available():
        print("  DALI not installed: --decoder dali not measured")
        return
    batches = [list(range(i, min(i + 32, n))) for i in range(0, n, 32)]
    t0 = time.perf_counter()
    dali = [None] * n
    for idx, images in adm_crop_batches(paths, batches, size, "cpu", num_threads=1):
        for i, im in zip(idx.tolist(), images):
            dali[i] = im.numpy()
    dali_rate = n / (time.perf_counter() - t0)
    print(f"  DALI (CPU, 1 thread) decode + resize + crop: {dali_rate:.1f} images/s per core")
    a, b = np.stack(pil).astype(np.int16), np.stack(dali).astype(np.int16)
    d = np.abs(a - b)
    per_image = d.reshape(n, -1).mean(1)
    print(
        f"  |DALI - PIL| in uint8 levels: mean {d.mean():.3f}, max {d.max()}, "
        f"99th percentile {np.percentile(d, 99):.0f}, worst image mean {per_image.max():.2f}; "
        f"pixels equal: {(d == 0).mean() * 100:.1f}%"
    )
    vae = tiny_sd_vae_encoder()
    with torch.no_grad():
        m = [
            torch.cat([encode_moments(vae, torch.from_numpy(x[i : i + 16].astype(np.uint8))) for i in range(0, n, 16)])
            for x in (a, b)
        ]
    for name, k in (("mean", slice(0, 4)), ("std", slice(4, 8))):
        p, q = m[0][:, k], m[1][:, k]
        print(
            f"  latent posterior {name} (random SD-VAE-shaped encoder): PIL mean {p.mean():.4f} std {p.std():.4f}, "
            f"DALI mean {q.mean():.4f} std {q.std():.4f}, max |delta| {(p - q).abs().max():.4f}"
        )


def bench_step(args) -> None:
    import throughput as tp

    targs = tp.parse_args(
        ["--model", "SiT-S/2", "--enc-type", "dinov2-vit-b", "--batch-size", "4", "--resolution", "128"]
        + ["--steps", "3", "--warmup", "1", "--mixed-precision", "no", "--providers", "repa_fast,repa_fast_cached"]
    )
    device = torch.device("cpu")
    torch.manual_seed(0)
    batch = tp.synthetic_batch(targs, device)
    for name, cached in (("computed targets", False), ("cached targets", True)):
        step = tp.RepaFastStep(targs, device, kernels="ref", cached=cached)
        sec, _ = tp.time_provider(step, batch, targs, device)
        share = tp.step_flops_per_image(targs, cached=True) / tp.step_flops_per_image(targs)
        print(
            f"  SiT-S/2 + DINOv2-B, 128 px, batch 4, fp32, {name}: {sec * 1e3:.0f} ms per step"
            + (f" (FLOPs x {share:.3f})" if cached else "")
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="samples of the synthetic training set")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="loader batch size")
    p.add_argument("--jpegs", type=int, default=300, help="JPEGs for the preprocessing comparison")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: read, loaders, preprocess, step")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {args.resolution} px")
    with tempfile.TemporaryDirectory() as tmp:
        ref, packed = os.path.join(tmp, "ref"), os.path.join(tmp, "packed")
        if not {"read", "loaders"} <= skip:
            write_ref_layout(ref, args.n, args.resolution)
            pack(ref, packed, progress=False, workers=0)
        if "read" not in skip:
            print("read (dataset[i], one process):")
            for name, path in (("REPA folder (PNG + npy)", ref), ("packed (memory-mapped)", packed)):
                sec = time_reads(open_dataset(path))
                print(f"  {name}: {sec * 1e3:.3f} ms per sample ({args.resolution} px, {args.n} samples)")
        if "loaders" not in skip:
            print(f"loaders (batches of {args.batch}, samples/s on one core):")
            bench_loaders(ref, packed, args.n, args.batch)
        if "preprocess" not in skip:
            print("preprocess (decode + ADM crop):")
            bench_preprocess(tmp, args.jpegs, args.resolution)
        if "step" not in skip:
            print("training step (CPU, kernels=ref):")
            bench_step(args)


if __name__ == "__main__":
    main()
