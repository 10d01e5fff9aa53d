"""The EMA update of a SiT's trainable parameters: ref (three foreach passes) vs triton (one multi-tensor pass).

``python bench/bench_ema_update.py [--models SiT-XL/2,...] [--world 1,8]``: the bytes each provider moves per step
(ref 5 reads + 3 writes per element, triton 2 + 1; with --world W the EMA is sliced over W ranks, engine/parallel/
slices.py, and each rank moves 1/W of it) and the time they take at H100 SXM bandwidth (3.35 TB/s, predicted), on
any machine; on a CUDA GPU also the measured time (triton.testing.do_bench, quantiles 0.5 / 0.2 / 0.8) of both, on
the real parameter shapes, appended to bench/results/ema_update.csv with the device, versions and git sha.
"""

import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from _common import git_sha  # noqa: E402

from repa_fast.kernels.ema_update import ema_update_, ema_update_ref  # noqa: E402
from repa_fast.models.sit import build_sit  # noqa: E402

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, NVIDIA H100 datasheet
FLOATS_MOVED = {"ref": 8, "triton": 3}  # per element: (2 + 1 + 2) reads + 3 writes; 2 reads + 1 write


def shapes(model: str) -> list[tuple]:
    """Trainable parameter shapes of ``model`` at 256 px (32x32 latents) with one DINOv2-B projector (REPA)."""
    with torch.device("meta"):
        m = build_sit(model, input_size=32, in_channels=4, num_classes=1000, z_dims=[768], encoder_depth=8)
    return [tuple(p.shape) for p in m.parameters() if p.requires_grad]


def predicted(models, worlds) -> None:
    print("== EMA update per optimizer step and rank: bytes, and time at 3.35 TB/s (H100 SXM), predicted ==")
    print("ref: three passes over a full replica (any world size); triton: one pass over this rank's 1/W slice")
    print(f"{'model':9s} {'params':>8s} {'provider':>8s} {'world':>5s} | {'GB':>6s} {'ms':>6s}")
    for model in models:
        n = sum(torch.Size(s).numel() for s in shapes(model))
        for provider, w in [("ref", 1), *(("triton", w) for w in worlds)]:
            gb = FLOATS_MOVED[provider] * 4 * n / w / 1e9
            ms = gb * 1e9 / H100_BYTES_PER_S * 1e3
            print(f"{model:9s} {n / 1e6:7.1f}M {provider:>8s} {w:5d} | {gb:6.2f} {ms:6.2f}")


def _time(provider: str, ema: list, params: list, skip) -> tuple:
    import triton.testing

    if provider == "ref":
        fn = lambda: ema_update_ref(ema, params, 0.9999, skip)  # noqa: E731
    else:
        fn = lambda: ema_update_(ema, params, 0.9999, skip, impl="triton")  # noqa: E731
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])


def measured(models, csv_path: str) -> None:
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    fresh = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        out = csv.writer(f)
        if fresh:
            head = ["model", "provider", "ms_p50", "ms_p20", "ms_p80", "GB_per_s", "device", "torch", "triton", "sha"]
            out.writerow(head)
        for model in models:
            ema = [torch.randn(s, device=device) for s in shapes(model)]
            params = [e + 0.01 * torch.randn_like(e) for e in ema]
            skip = torch.tensor(False, device=device)
            n = sum(e.numel() for e in ema)
            for provider in ("ref", "triton"):
                p50, p20, p80 = _time(provider, ema, params, skip)
                gbs = FLOATS_MOVED[provider] * 4 * n / (p50 * 1e-3) / 1e9
                print(f"{model:9s} {provider:7s} {p50:8.3f} ms (p20 {p20:.3f}, p80 {p80:.3f}) {gbs:6.0f} GB/s, {name}")
                row = [model, provider, f"{p50:.4f}", f"{p20:.4f}", f"{p80:.4f}", f"{gbs:.0f}", name]
                out.writerow(row + [torch.__version__, triton.__version__, git_sha()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="SiT-B/2,SiT-L/2,SiT-XL/2")
    p.add_argument("--world", default="1,2,8", help="ranks the EMA is sliced over (DDP / ZeRO-1/2)")
    p.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "ema_update.csv"))
    args = p.parse_args()
    models = [m for m in args.models.split(",") if m]
    predicted(models, [int(w) for w in args.world.split(",") if w])
    if torch.cuda.is_available():
        measured(models, args.csv)
    else:
        print("\nno CUDA device: the times above are predicted from bytes; measured times need a GPU")


if __name__ == "__main__":
    main()
