"""Shared harness of bench/bench_<op>.py: providers ref / compile(ref) / triton, modes fwd / bwd / full.

Everywhere: prints the analytic bytes each provider moves (bench/traffic.py; compile(ref) is not
modelled: what Inductor fuses depends on its version). On a CUDA GPU: also times every provider with
triton.testing.do_bench (quantiles 0.5, 0.2, 0.8), reports GB/s (the provider's analytic bytes / median time)
against the device's measured copy bandwidth, times compilation separately, and appends rows to
bench/results/<op>.csv with the device, versions and git sha. Without a GPU it says that timings need one.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import traffic  # noqa: E402  (bench/traffic.py)

MODES = ("fwd", "bwd", "full")
PROVIDERS = ("ref", "compile(ref)", "triton")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Case:
    """One op: ``make(model, batch, dtype, device) -> inputs``; ``ref(*inputs)`` and ``fused(*inputs)`` return
    a tensor or a tuple of tensors; ``traffic_op`` names its entry in bench/traffic.py's CASES."""

    name: str
    traffic_op: str
    make: Callable
    ref: Callable
    fused: Callable


def parse_args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default="SiT-B/2,SiT-L/2,SiT-XL/2", help="comma-separated, from traffic.SIT_SHAPES")
    p.add_argument("--batches", default="32,128,256", help="images per step (256 tokens each)")
    p.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated from {sorted(DTYPES)}")
    p.add_argument("--modes", default="fwd,bwd,full")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--csv", default=None, help="CSV to append GPU timings to (default bench/results/<op>.csv)")
    return p.parse_args()


def _split(s):
    return [t for t in s.split(",") if t]


def analytic_table(case: Case, args) -> dict:
    """Print the analytic bytes of ref and triton per (model, batch, dtype); returns {(m, b, d): op_traffic}."""
    print(f"\n== {case.name}: analytic memory traffic (GB = 1e9 B; compile(ref) not modelled) ==")
    print(
        f"{'model':9s} {'batch':>5s} {'dtype':5s} | {'ref fwd':>8s} {'ref bwd':>8s} {'ref full':>8s} | "
        f"{'tri fwd':>8s} {'tri bwd':>8s} {'tri full':>8s} | {'ratio':>6s}"
    )
    out = {}
    for model in _split(args.models):
        for batch in map(int, _split(args.batches)):
            for dname in _split(args.dtypes):
                t = traffic.op_traffic(case.traffic_op, model, batch, DTYPES[dname])
                out[(model, batch, dname)] = t
                r, f = t["ref"], t["fused"]
                cols = " ".join(f"{v / 1e9:8.3f}" for v in (r.fwd, r.bwd, r.full))
                cols += " | " + " ".join(f"{v / 1e9:8.3f}" for v in (f.fwd, f.bwd, f.full))
                print(f"{model:9s} {batch:5d} {dname:5s} | {cols} | {f.full / r.full:6.3f}")
    return out


def git_sha() -> str:
    """Short commit of the working tree, for benchmark rows ("unknown" outside a git checkout)."""
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"
    return out or "unknown"


def copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in bytes/s (1 GiB read + 1 GiB written per copy)."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _outputs(outs):
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    return [o for o in outs if o.requires_grad]


def _timed_fn(fn, inputs, mode):
    """A zero-argument callable for do_bench of ``mode``; bwd replays a retained graph."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "full":

        def full():
            outs = _outputs(fn(*inputs))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return full
    outs = _outputs(fn(*inputs))
    grads = [torch.ones_like(o) for o in outs]
    return lambda: torch.autograd.backward(outs, grads, retain_graph=True)


def _bytes(t: dict, provider: str, mode: str):
    if provider == "compile(ref)":
        return None
    tr = t["ref" if provider == "ref" else "fused"]
    return {"fwd": tr.fwd, "bwd": tr.bwd, "full": tr.full}[mode]


def gpu_timings(case: Case, args, analytic: dict, device=None) -> None:
    import triton
    import triton.testing

    device = device or torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    print(f"\n== {case.name}: GPU timings on {name}, copy bandwidth {copy_bw / 1e9:.0f} GB/s ==")
    path = args.csv or os.path.join(ROOT, "bench", "results", f"{case.name}.csv")
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if fresh:
            writer.writerow(
                [
                    "op",
                    "model",
                    "batch",
                    "dtype",
                    "provider",
                    "mode",
                    "ms_p50",
                    "ms_p20",
                    "ms_p80",
                    "bytes",
                    "GB_per_s",
                    "frac_copy_bw",
                    "compile_s",
                    "device",
                    "torch",
                    "triton",
                    "git",
                ]
            )
        for (model, batch, dname), t in analytic.items():
            inputs = case.make(model, batch, DTYPES[dname], device)
            for provider in _split(args.providers):
                fn, compile_s = case.ref if provider == "ref" else case.fused, ""
                if provider == "compile(ref)":
                    # bwd mode replays one graph (retain_graph=True), which donated buffers forbid
                    torch._functorch.config.donated_buffer = False
                    fn = torch.compile(case.ref)
                    start = time.perf_counter()
                    outs = _outputs(fn(*inputs))
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                    torch.cuda.synchronize()
                    compile_s = f"{time.perf_counter() - start:.1f}"
                for mode in _split(args.modes):
                    p50, p20, p80 = triton.testing.do_bench(
                        _timed_fn(fn, inputs, mode), quantiles=[0.5, 0.2, 0.8], grad_to_none=inputs
                    )
                    nbytes = _bytes(t, provider, mode)
                    gbps = nbytes / (p50 * 1e-3) / 1e9 if nbytes else float("nan")
                    print(
                        f"{model:9s} {batch:4d} {dname:5s} {provider:13s} {mode:4s} {p50:8.3f} ms "
                        f"[{p20:.3f}, {p80:.3f}]  {gbps:7.0f} GB/s  {gbps * 1e9 / copy_bw:5.2f}x copy"
                    )
                    writer.writerow(
                        [
                            case.name,
                            model,
                            batch,
                            dname,
                            provider,
                            mode,
                            f"{p50:.4f}",
                            f"{p20:.4f}",
                            f"{p80:.4f}",
                            nbytes or "",
                            f"{gbps:.1f}",
                            f"{gbps * 1e9 / copy_bw:.3f}",
                            compile_s,
                            name,
                            torch.__version__,
                            triton.__version__,
                            git_sha(),
                        ]
                    )
    print(f"appended rows to {path}")


def main(*cases: Case) -> None:
    names = ", ".join(c.name for c in cases)
    args = parse_args(f"Benchmark {names}: providers {', '.join(PROVIDERS)}; modes {', '.join(MODES)}")
    for case in cases:
        analytic = analytic_table(case, args)
        if torch.cuda.is_available():
            gpu_timings(case, args, analytic)
    if not torch.cuda.is_available():
        print("\nNo CUDA device: timings (ms, GB/s) need a GPU; only the analytic bytes above are shown.")
