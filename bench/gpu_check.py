"""One prepared GPU check: ceilings, the GPU tests, per-op and whole-step timings, a profile, a real trainer run.

    PYTHONPATH=. python bench/gpu_check.py --out DIR [--parts a,b,c,d,e,f] [--smoke]

Parts (each isolated: a failing part is reported in the summary and the others still run):
  a  environment: GPU, torch/triton/CUDA versions; the two ceilings measured here (bf16 8192^3 matmul TFLOP/s on
     random data; device-to-device copy GB/s counting bytes read + written)
  b  ``pytest -m gpu -q``: compiled kernels vs float64, compiled block == eager, no host sync in a training step
  c  per-op timings at SiT-XL/2 shapes (batch 32 and 256, 256 tokens, D 1152; the loss at z-dim 768): ``ref``
     eager, ``compile(ref)``, ``triton`` at each tile configuration of a small sweep (launch config overridden),
     modes fwd and fwd+bwd; triton.testing.do_bench medians (it flushes L2 before each run); GB/s from the analytic
     bytes (traffic module) as a fraction of the copy bandwidth of part a
  d  whole-step throughput, SiT-XL/2 + DINOv2-B (random weights) at 256 px, bf16, synthetic data: the reference step
     structure, repa_fast eager, repa_fast with each SiT block compiled (dynamic=False; torch._dynamo.reset()
     between batch sizes); batch 32, 64, 128 (OOM reported); img/s, TFLOP/s, MFU against the measured matmul rate
     and 989 TFLOP/s, peak memory, compile time; which attention kernel SDPA ran
  e  torch.profiler of the compiled repa_fast step (batch 32): the 25 most expensive GPU kernels with their share of
     the step, grouped (GEMM, attention, fused kernels, elementwise, reduction, optimizer/EMA, copy, other), plus
     the encoder forward's share (a profiler range around it)
  f  the trainer for real: ``train.py`` on a synthetic REPA-layout dataset, SiT-B/2 + random DINOv2-B, bf16,
     ``--compile``, 30 steps with a checkpoint at 15, then ``--resume`` from 15 to 30 in a second process; losses
     finite, final weights (and EMA) of the resumed run vs the straight run (bitwise, else the largest difference)
  g  (always) files under --out and a summary table printed last

Files under --out (at most 8, so that a device call returns all of them): env.json, pytest_gpu.log, ops.csv,
step.csv, profile.md, train_check.log, report.md. A part that does not run still writes its file (saying why).

``--smoke``: tiny shapes on the CPU (Triton interpreter, ``aot_eager``/``eager`` compile backends) in about a
minute; tests/test_gpu_check.py runs it so that CI proves the script starts, parses and writes every file.
The device commands and their expected durations are in bench/README_gpu_check.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from repa_fast.io import atomic_path, write_text  # noqa: E402

PARTS = "abcdef"
H100_BF16_PEAK = 989.0  # dense bf16 TFLOP/s of an H100 SXM (datasheet), the issue's MFU denominator
FILES = ("env.json", "pytest_gpu.log", "ops.csv", "step.csv", "profile.md", "train_check.log", "report.md")


class Check:
    """What the parts share: options, device, the ceilings of part a, report sections and the summary rows."""

    def __init__(self, out: str, smoke: bool):
        self.out, self.smoke = out, smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.compile_backend = "inductor" if self.cuda else "aot_eager"
        self.step_batches: tuple[int, ...] = (32, 64, 128)
        self.copy_gbps: float | None = None
        self.matmul_tflops: float | None = None
        self.sections: list[str] = []
        self.summary: list[tuple[str, str, float, str]] = []

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def write_atomic(path: str, text: str) -> None:
    write_text(path, text)


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["note"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows or [{"note": "no rows"}])


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bench_ms(check: Check, fn, reps: int = 2) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds: triton.testing.do_bench on CUDA (events, L2 flushed), else wall clock."""
    if check.cuda:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


# ----------------------------------------------------------------------------------------------------------------
# a. environment and ceilings
# ----------------------------------------------------------------------------------------------------------------
def part_a(check: Check) -> str:
    import triton

    env = {
        "device": torch.cuda.get_device_name() if check.cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "smoke": check.smoke,
        "git": _git_sha(),
    }
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        env |= {"sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    n, dtype = (8192, torch.bfloat16) if check.cuda else (256, torch.float32)
    gen = torch.Generator(device=check.device).manual_seed(0)
    a, b = (torch.randn(n, n, device=check.device, dtype=dtype, generator=gen) for _ in range(2))
    ms = bench_ms(check, lambda: a @ b)[0]
    check.matmul_tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    numel = 2**28 if check.cuda else 2**22  # 1 GiB of fp32 on the GPU
    src = torch.randn(numel, device=check.device)
    dst = torch.empty_like(src)
    ms = bench_ms(check, lambda: dst.copy_(src))[0]
    check.copy_gbps = 2 * numel * 4 / (ms * 1e-3) / 1e9  # bytes read + bytes written
    env |= {
        "matmul": f"{'bf16' if check.cuda else 'fp32'} {n}^3",
        "matmul_tflops": round(check.matmul_tflops, 1),
        "copy_gbps": round(check.copy_gbps, 1),
    }
    write_atomic(check.path("env.json"), json.dumps(env, indent=1) + "\n")
    check.sections.append("## a. Environment\n\n" + md_table([env]))
    return f"{env['device']}: matmul {env['matmul_tflops']} TFLOP/s, copy {env['copy_gbps']} GB/s"


def _git_sha() -> str:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# b. pytest -m gpu
# ----------------------------------------------------------------------------------------------------------------
def part_b(check: Check) -> str:
    # In smoke mode only the GPU test files are collected (they all skip without CUDA): the point is the plumbing.
    paths = ["tests/kernels/test_gpu.py", "tests/engine/test_gpu_step.py"] if check.smoke else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\nexit code {proc.returncode}\n"
    write_atomic(check.path("pytest_gpu.log"), log)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    check.sections.append(f"## b. pytest -m gpu\n\n`{tail[0]}` (exit code {proc.returncode}; pytest_gpu.log)\n")
    if proc.returncode not in (0, 5) or (proc.returncode == 5 and not check.smoke):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {tail[0]} (exit code {proc.returncode})")
    return tail[0]


# ----------------------------------------------------------------------------------------------------------------
# c. per-op timings with a tile sweep
# ----------------------------------------------------------------------------------------------------------------
def _traffic_module():
    """The analytic byte counter: bench/traffic.py once it moves there, repa_fast/kernels/traffic.py before."""
    try:
        import traffic
    except ImportError:
        from repa_fast.kernels import traffic
    return traffic


def _sweep(op: str):
    """(module, [(name, launch-config override or None)]) of an op: the default config, then fixed tiles."""
    from repa_fast.kernels import _dispatch, adaln, align_loss, rope

    def tiles(mod, tile_counts):
        orig = mod._launch_config

        def fixed(rows, warps):
            if mod is align_loss:
                return lambda n_rows, D, dev: (rows, orig(n_rows, D, dev)[1], warps)
            if mod is rope:

                def cfg(n_rows, Dh, dev):
                    _, bd, per_prog, _ = orig(n_rows, Dh, dev)
                    return rows, bd, _dispatch.cdiv(per_prog, rows) * rows, warps

                return cfg

            def cfg(n_rows, n_tok, D, dev, backward=False):
                _, bd, per_chunk, _ = orig(n_rows, n_tok, D, dev, backward)
                return rows, bd, _dispatch.cdiv(per_chunk, rows) * rows, warps

            return cfg

        return mod, [("default", None)] + [(f"rows{r}_w{w}", fixed(r, w)) for r, w in tile_counts]

    if op in ("adaln_modulate", "gated_residual_adaln"):
        return tiles(adaln, [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8)])
    if op == "alignment_loss":
        return tiles(align_loss, [(2, 4), (4, 4), (4, 8), (8, 8), (16, 8)])
    return tiles(rope, [(8, 4), (16, 4), (32, 4), (16, 8), (32, 8)])


def _real_inputs(meta_inputs, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for m in meta_inputs:
        t = torch.randn(m.shape, generator=gen, device=device, dtype=torch.float32).to(m.dtype)
        out.append(t.requires_grad_(m.requires_grad))
    return out


def part_c(check: Check) -> str:
    from _common import _timed_fn

    traffic = _traffic_module()
    ops = ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "rope_2d", "alignment_loss")
    hidden, heads = (1152, 16) if not check.smoke else (64, 2)
    batches = (32, 256) if not check.smoke else (1,)
    dtype = torch.bfloat16 if check.cuda else torch.float32
    modes = ("fwd", "full")
    torch._functorch.config.donated_buffer = False  # the bwd replay of _timed_fn retains the graph
    rows = []
    for op in ops:
        mod, sweep = _sweep(op)
        if check.smoke:  # the interpreter's cost is per program: the default and the largest fixed tile only
            sweep = [sweep[0], sweep[-1]]
        for batch in batches:
            ref, fused, meta = traffic.CASES[op](batch, hidden, heads, dtype)
            nbytes = {p: traffic.measure(f, meta) for p, f in (("ref", ref), ("fused", fused))}
            inputs = _real_inputs(meta, check.device, seed=batch)
            providers = [("ref", ref, None, "ref"), ("compile(ref)", None, None, "ref")]
            providers += [(f"triton:{name}", fused, cfg, "fused") for name, cfg in sweep]
            for provider, fn, cfg, kind in providers:
                row = {"op": op, "batch": batch, "D": hidden, "dtype": str(dtype)[6:], "provider": provider}
                saved = mod._launch_config
                try:
                    if cfg is not None:
                        mod._launch_config = cfg
                    if provider == "compile(ref)":
                        torch._dynamo.reset()
                        fn = torch.compile(ref, backend=check.compile_backend, dynamic=False)
                        t0 = time.perf_counter()
                        _timed_fn(fn, inputs, "full")()
                        check.sync()
                        row["compile_s"] = round(time.perf_counter() - t0, 2)
                    for mode in modes:
                        p50, p20, p80 = bench_ms(check, _timed_fn(fn, inputs, mode))
                        b = getattr(nbytes[kind], mode)
                        gbps = b / (p50 * 1e-3) / 1e9
                        rows.append(
                            row
                            | {
                                "mode": mode,
                                "ms_p50": round(p50, 4),
                                "ms_p20": round(p20, 4),
                                "ms_p80": round(p80, 4),
                                "bytes": b,
                                "GB_per_s": round(gbps, 1),
                                "frac_copy_bw": round(gbps / check.copy_gbps, 3) if check.copy_gbps else "",
                            }
                        )
                except Exception as e:  # one provider failing (compile error, OOM) must not hide the others
                    rows.append(row | {"mode": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                finally:
                    mod._launch_config = saved
                    for t in inputs:
                        t.grad = None
    write_csv(check.path("ops.csv"), rows)
    best = _best_per_op(rows)
    check.sections.append(
        "## c. Per-op timings (ops.csv)\n\n'bytes': analytic (compile(ref) charged the unfused bytes, an upper "
        "bound); frac_copy_bw: against part a's copy.\n\n" + md_table(best)
    )
    errors = sum(r["mode"] == "error" for r in rows)
    if errors:
        raise RuntimeError(f"{errors} of {len(rows)} per-op rows failed (ops.csv)")
    return f"{len(rows)} timings; fastest triton tile per op in report.md"


def _best_per_op(rows: list[dict]) -> list[dict]:
    """Per (op, batch, mode): ref, compile(ref) and the fastest triton configuration."""
    out = {}
    for r in rows:
        if r["mode"] == "error":
            continue
        key = (r["op"], r["batch"], r["mode"])
        slot = out.setdefault(key, {"op": r["op"], "batch": r["batch"], "mode": r["mode"]})
        if r["provider"].startswith("triton:"):
            if "triton_ms" not in slot or r["ms_p50"] < slot["triton_ms"]:
                slot |= {"triton_ms": r["ms_p50"], "best_tile": r["provider"][7:], "frac_copy_bw": r["frac_copy_bw"]}
        else:
            slot[f"{r['provider']}_ms"] = r["ms_p50"]
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------------
# d. whole-step throughput, e. profile
# ----------------------------------------------------------------------------------------------------------------
def _step_args(check: Check, batch: int):
    import throughput

    if check.smoke:
        argv = ["--model", "SiT-T/2", "--enc-type", "dinov2-vit-t", "--resolution", "32", "--encoder-depth", "2"]
        argv += ["--mixed-precision", "no", "--steps", "2", "--warmup", "1"]
    else:
        argv = ["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--resolution", "256", "--encoder-depth", "8"]
        argv += ["--mixed-precision", "bf16", "--steps", "10", "--warmup", "3"]
    return throughput.parse_args([*argv, "--batch-size", str(batch)])


def _build_step(check: Check, provider: str, args):
    import throughput

    if provider == "reference":
        return throughput.ReferenceStep(args, check.device)
    step = throughput.RepaFastStep(args, check.device)
    if provider == "repa_fast compile":
        backend = check.compile_backend if check.cuda else "eager"
        for block in step.state.model.blocks:
            block.compile(backend=backend, dynamic=False)
    return step


def sdpa_kernel(check: Check) -> str:
    """Which kernel torch's SDPA runs at SiT-XL/2's attention shape (read off a profile of one call)."""
    if not check.cuda:
        return "cpu"
    q = torch.randn(32, 16, 256, 72, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for family in ("flash", "cudnn", "efficient", "fmha"):
        if family in names:
            return {"fmha": "efficient"}.get(family, family)
    return "math"


def part_d(check: Check) -> str:
    import throughput

    from repa_fast.kernels.attention import select_backend

    batches = check.step_batches if not check.smoke else (2,)
    providers = ("reference", "repa_fast eager", "repa_fast compile")
    probe = torch.empty(1, 1, 1, 8, device=check.device, dtype=torch.bfloat16)
    attn = f"repa_fast {select_backend(probe)}; SDPA kernel {sdpa_kernel(check)}"
    rows = []
    for batch in batches:
        args = _step_args(check, batch)
        flops = throughput.step_flops_per_image(args) * batch
        for provider in providers:
            row = {"model": args.model, "encoder": args.enc_type, "batch": batch, "provider": provider}
            step = None
            try:
                torch._dynamo.reset()
                if check.cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                torch.manual_seed(0)
                data = throughput.synthetic_batch(args, check.device)
                step = _build_step(check, provider, args)
                sec, first = throughput.time_provider(step, data, args, check.device)
                tflops = flops / sec / 1e12
                row |= {
                    "ms_per_step": round(sec * 1e3, 2),
                    "img_per_s": round(batch / sec, 1),
                    "tflops": round(tflops, 1),
                    "mfu_measured": round(tflops / check.matmul_tflops, 3) if check.matmul_tflops else "",
                    "mfu_989": round(tflops / H100_BF16_PEAK, 3),
                    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if check.cuda else "",
                    "first_step_s": round(first, 1),
                    "compile_s": round(max(0.0, first - sec), 1),
                    "attention": attn if provider != "reference" else "math (explicit softmax)",
                }
            except torch.cuda.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                del step
            rows.append(row)
            print(f"  step {row}", flush=True)
    write_csv(check.path("step.csv"), rows)
    by = {(r["batch"], r["provider"]): r for r in rows if "img_per_s" in r}
    for r in rows:
        ref = by.get((r["batch"], "reference"))
        if "img_per_s" in r and ref:
            r["x_reference"] = round(r["img_per_s"] / ref["img_per_s"], 2)
    check.sections.append("## d. Whole step (step.csv)\n\n" + md_table(rows))
    failed = [r for r in rows if r.get("error") and r["error"] != "OOM"]
    if failed:
        raise RuntimeError(f"{len(failed)} step rows failed: {failed[0]['error']}")
    head = by.get((batches[0], "repa_fast compile"))
    return f"repa_fast compile, batch {batches[0]}: {head['img_per_s']} img/s" if head else "no compiled row"


KERNEL_GROUPS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("fused (repa_fast)", ("_adaln_", "_cos_rows_", "_norm_rope_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    (
        "GEMM",
        ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "matmul", "mm_", "aten::mm", "addmm", "bmm"),
    ),
    ("optimizer/EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("reduction", ("triton_red", "triton_per", "reduce", "norm")),
    ("elementwise", ("triton_poi", "elementwise", "vectorized", "unrolled", "fill")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def part_e(check: Check) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    args = _step_args(check, 32 if not check.smoke else 2)
    torch._dynamo.reset()
    torch.manual_seed(0)
    data = __import__("throughput").synthetic_batch(args, check.device)
    step = _build_step(check, "repa_fast compile", args)
    # Profiler ranges around the encoders, the optimizer and the EMA update: their share of the step's GPU time.
    for enc in step.encoders:
        enc.forward = _ranged(record_function, "encoder forward", enc.forward)
    step.backend.clip_and_step = _ranged(record_function, "clip + optimizer", step.backend.clip_and_step)
    step.backend.update_ema = _ranged(record_function, "EMA update", step.backend.update_ema)
    for _ in range(3):
        step(data)
    check.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    n_steps = 3
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step(data)
        check.sync()
    events = prof.key_averages()
    dev = "device_time_total" if check.cuda else "cpu_time_total"
    attr = "self_device_time_total" if check.cuda else "self_cpu_time_total"
    wall_ms = (time.perf_counter() - t0) * 1e3 / n_steps  # profiler overhead included
    ranges = ("encoder forward", "clip + optimizer", "EMA update")
    kernels = [
        e
        for e in events
        if getattr(e, attr, 0) > 0 and e.key not in ranges and (not check.cuda or e.device_type.name == "CUDA")
    ]
    total = sum(getattr(e, attr) for e in kernels) or 1.0
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    groups: dict[str, float] = {}
    for e in kernels:
        groups[kernel_group(e.key)] = groups.get(kernel_group(e.key), 0.0) + getattr(e, attr)
    in_range = {r: max((getattr(e, dev, 0) for e in events if e.key == r), default=0.0) for r in ranges}
    top = [
        {
            "kernel": e.key[:90].replace("|", "/"),
            "group": kernel_group(e.key),
            "calls": e.count,
            "ms_per_step": round(getattr(e, attr) / 1e3 / n_steps, 3),
            "share": f"{100 * getattr(e, attr) / total:.1f}%",
        }
        for e in kernels[:25]
    ]
    grouped = [
        {"group": g, "ms_per_step": round(us / 1e3 / n_steps, 3), "share": f"{100 * us / total:.1f}%"}
        for g, us in sorted(groups.items(), key=lambda kv: -kv[1])
    ]
    by_range = [
        {"range": r, "ms_per_step": round(us / 1e3 / n_steps, 3), "share": f"{100 * us / total:.1f}%"}
        for r, us in in_range.items()
    ]
    kind = "CUDA kernels" if check.cuda else "CPU ops (smoke: no GPU)"
    text = (
        f"# Profile of the compiled repa_fast step ({args.model} + {args.enc_type}, batch {args.batch_size})\n\n"
        f"{n_steps} steps of {wall_ms:.1f} ms wall (under the profiler), {total / 1e3 / n_steps:.2f} ms of {kind} "
        "per step; shares below are of the latter.\n\n## By kernel group\n\n"
        + md_table(grouped)
        + "\n## By step phase (profiler ranges; their kernels are also counted in the groups above)\n\n"
        + md_table(by_range)
        + f"\n## Top 25 {kind}\n\n"
        + md_table(top)
    )
    write_atomic(check.path("profile.md"), text)
    check.sections.append("## e. Profile (profile.md)\n\n" + md_table(grouped) + "\n" + md_table(by_range))
    return f"top group: {grouped[0]['group']} {grouped[0]['share']}" if grouped else "empty profile"


def _ranged(record_function, name: str, fn):
    """``fn`` wrapped in a profiler range ``name``."""

    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# f. the trainer, straight and resumed
# ----------------------------------------------------------------------------------------------------------------
def make_ref_layout_dataset(root: str, n: int, resolution: int, num_classes: int = 10, seed: int = 0) -> None:
    """n random images and SD-VAE moments in REPA's preprocessing layout (images/, vae-sd/, dataset.json)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    lat = resolution // 8
    labels = {"images": [], "vae-sd": []}
    for i in range(n):
        s = f"{i:08d}"
        names = {"images": f"{s[:5]}/img{s}.png", "vae-sd": f"{s[:5]}/img-mean-std-{s}.npy"}
        for sub, name in names.items():
            os.makedirs(os.path.join(root, sub, os.path.dirname(name)), exist_ok=True)
        image = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, "images", names["images"]), compress_level=1)
        moments = np.concatenate([rng.standard_normal((4, lat, lat)), 0.1 * rng.random((4, lat, lat))])
        np.save(os.path.join(root, "vae-sd", names["vae-sd"]), moments.astype(np.float32))
        label = int(rng.integers(0, num_classes))
        for sub in labels:
            labels[sub].append([names[sub], label])
    for sub, rows in labels.items():
        with open(os.path.join(root, sub, "dataset.json"), "w") as f:
            json.dump({"labels": rows}, f)


def _train(check: Check, argv: list, log: list) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log.append(f"$ {' '.join(cmd)}\n[exit {proc.returncode}, {time.perf_counter() - t0:.0f} s]\n")
    log.append(proc.stderr[-6000:] + proc.stdout[-2000:] + "\n")
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")


def part_f(check: Check) -> str:
    from safetensors.torch import load_file

    from repa_fast.engine import checkpoint as ckpt

    steps, every = (30, 15) if not check.smoke else (4, 2)
    log: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_f_") as tmp:
            data, run = os.path.join(tmp, "data"), os.path.join(tmp, "runs", "run")
            res = 256 if not check.smoke else 32
            make_ref_layout_dataset(data, 64 if not check.smoke else 16, res)
            argv = ["--data-dir", data, "--resolution", str(res), "--output-dir", os.path.join(tmp, "runs")]
            argv += ["--exp-name", "run", "--max-train-steps", str(steps), "--checkpointing-steps", str(every)]
            argv += ["--no-encoder-pretrained", "--report-to", "none", "--sampling-steps", "0", "--log-every", "1"]
            argv += ["--num-classes", "10", "--num-workers", "2" if not check.smoke else "0", "--compile"]
            argv += ["--learning-rate", str(TRAIN_LR)]
            if check.smoke:
                argv += ["--model", "SiT-T/2", "--enc-type", "dinov2-vit-t", "--encoder-depth", "2"]
                argv += ["--batch-size", "4", "--mixed-precision", "no", "--compile-backend", "eager"]
                argv += ["--device", "cpu"]
            else:
                argv += ["--model", "SiT-B/2", "--enc-type", "dinov2-vit-b", "--encoder-depth", "4"]
                argv += ["--batch-size", "32", "--mixed-precision", "bf16", "--device", "cuda"]
            _train(check, argv, log)
            final = ckpt.step_dir(run, steps)
            straight = {f: load_file(os.path.join(final, f)) for f in ("model.safetensors", "ema.safetensors")}
            shutil.rmtree(final)  # the second process resumes from the latest remaining checkpoint: `every`
            _train(check, [*argv, "--resume"], log)
            resumed = {f: load_file(os.path.join(final, f)) for f in straight}
            losses = [json.loads(ln)["loss"] for ln in open(os.path.join(run, "log.jsonl")) if '"loss"' in ln]
            result = _compare(straight, resumed, losses, log, resumed_from=every, steps=steps)
    finally:
        write_atomic(check.path("train_check.log"), "".join(log) or "(part f did not start)\n")
    check.sections.append("## f. Trainer: straight vs resumed (train_check.log)\n\n" + md_table([result]))
    if not result["losses_finite"] or not result["resume_matches"]:
        raise RuntimeError(f"trainer check failed: {result}")
    return f"resumed == straight ({result['max_abs_diff']}), {result['log_rows']} finite losses"


TRAIN_LR = 1e-4  # the reference's --learning-rate default, passed explicitly: the resume tolerance depends on it


def _compare(straight: dict, resumed: dict, losses: list, log: list, resumed_from: int, steps: int) -> dict:
    diff, bitwise = 0.0, True
    for f, tensors in straight.items():
        for k, a in tensors.items():
            b = resumed[f][k]
            bitwise &= torch.equal(a, b)
            diff = max(diff, (a.double() - b.double()).abs().max().item())
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    # CUDA kernels may be nondeterministic (atomics in cuBLAS / attention backward). An Adam step moves each weight by
    # at most about lr, so two runs that differ only by rounding stay within 2 * lr per resumed step.
    matches = bitwise or diff <= 2 * TRAIN_LR * (steps - resumed_from)
    log.append(f"losses: {losses}\nbitwise equal: {bitwise}; largest |straight - resumed|: {diff:.3e}\n")
    return {
        "steps": steps,
        "resumed_from": resumed_from,
        "log_rows": len(losses),
        "losses_finite": finite,
        "bitwise": bitwise,
        "max_abs_diff": f"{diff:.3e}",
        "resume_matches": matches,
    }


# ----------------------------------------------------------------------------------------------------------------
# g. driver
# ----------------------------------------------------------------------------------------------------------------
PART_FNS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f}
PART_FILES = {"a": "env.json", "b": "pytest_gpu.log", "c": "ops.csv", "d": "step.csv", "e": "profile.md"}
PART_FILES["f"] = "train_check.log"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for env.json, pytest_gpu.log, ops.csv, ... report.md")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,e,f (g always runs)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), ~1 min")
    p.add_argument("--step-batches", default="32,64,128", help="per-GPU batch sizes of part d (OOM is reported)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PART_FNS]
    if bad:
        p.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    try:
        args.step_batches = tuple(int(b) for b in args.step_batches.split(",") if b.strip())
    except ValueError:
        p.error(f"--step-batches: comma-separated integers, e.g. 32,64; got {args.step_batches!r}")
    return args, parts


def main(argv=None) -> int:
    args, parts = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before their import
    os.makedirs(args.out, exist_ok=True)
    check = Check(args.out, args.smoke)
    check.step_batches = args.step_batches
    if "a" not in parts and any(p in parts for p in "cd"):
        parts.insert(0, "a")  # per-op GB/s and MFU need this run's ceilings
    for part in parts:
        t0 = time.perf_counter()
        print(f"== part {part} ==", flush=True)
        try:
            headline, status = PART_FNS[part](check), "ok"
        except Exception as e:
            headline, status = f"{type(e).__name__}: {str(e)[:200]}", "FAIL"
            check.sections.append(f"## {part}. FAILED\n\n```\n{traceback.format_exc()[-3000:]}```\n")
            traceback.print_exc()
        check.summary.append((part, status, time.perf_counter() - t0, headline))
        print(f"   part {part}: {status} in {time.perf_counter() - t0:.0f} s: {headline}", flush=True)
    for part, name in PART_FILES.items():  # every file exists, saying why when its part did not run
        if not os.path.exists(check.path(name)):
            write_atomic(check.path(name), f"part {part} was not run (--parts {args.parts})\n")
    summary = [{"part": p, "status": s, "seconds": round(t), "result": h} for p, s, t, h in check.summary]
    report = f"# gpu_check ({'smoke, CPU' if args.smoke else 'device'})\n\n" + md_table(summary) + "\n"
    write_atomic(check.path("report.md"), report + "\n".join(check.sections))
    print("\n" + md_table(summary), flush=True)
    return 0 if all(s == "ok" for _, s, _, _ in check.summary) else 1


if __name__ == "__main__":
    sys.exit(main())
