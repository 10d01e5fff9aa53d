"""torch.profiler of the compiled repa_fast step ("ours triton" of the headline, reused: no second compile): the 25
most expensive GPU kernels with their share of the step, grouped (GEMM, attention, fused kernels, elementwise,
reduction, optimizer/EMA, copy, other), and the shares of the encoder forward, the optimizer step and the EMA update
(profiler ranges around them). Writes profile.md and one JSON line per group and per range."""

from __future__ import annotations

import time

from .core import Check, md_table, write_atomic

KERNEL_GROUPS = (  # first match wins; lower-case substrings of CUDA kernel names
    ("fused (repa_fast)", ("_adaln_", "_cos_rows_", "_norm_rope_", "_bias_gelu_", "_ema_")),
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
RANGES = ("encoder forward", "clip + optimizer", "EMA update")


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def _ranged(record_function, name: str, fn):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def part_profile(check: Check) -> str:
    from torch.profiler import ProfilerActivity, profile, record_function

    step, data = check.keep.get("profile_step"), check.keep.get("profile_data")
    if step is None:
        raise RuntimeError("the headline built no 'ours triton' step to profile")
    for enc in step.encoders:
        enc.forward = _ranged(record_function, RANGES[0], enc.forward)
    step.backend.clip_and_step = _ranged(record_function, RANGES[1], step.backend.clip_and_step)
    step.backend.update_ema = _ranged(record_function, RANGES[2], step.backend.update_ema)
    step(data)
    check.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.cuda else [])
    n_steps = 3
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step(data)
        check.sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / n_steps  # profiler overhead included
    events = prof.key_averages()
    dev = "device_time_total" if check.cuda else "cpu_time_total"
    attr = "self_device_time_total" if check.cuda else "self_cpu_time_total"
    kernels = [
        e
        for e in events
        if getattr(e, attr, 0) > 0 and e.key not in RANGES and (not check.cuda or e.device_type.name == "CUDA")
    ]
    total = sum(getattr(e, attr) for e in kernels) or 1.0
    kernels.sort(key=lambda e: getattr(e, attr), reverse=True)
    groups: dict[str, float] = {}
    for e in kernels:
        groups[kernel_group(e.key)] = groups.get(kernel_group(e.key), 0.0) + getattr(e, attr)
    in_range = {r: max((getattr(e, dev, 0) for e in events if e.key == r), default=0.0) for r in RANGES}

    def share(us):
        return {"ms_per_step": round(us / 1e3 / n_steps, 3), "share": f"{100 * us / total:.1f}%"}

    top = [
        {
            "kernel": e.key[:90].replace("|", "/"),
            "group": kernel_group(e.key),
            "calls": e.count,
            **share(getattr(e, attr)),
        }
        for e in kernels[:25]
    ]
    grouped = [{"group": g, **share(us)} for g, us in sorted(groups.items(), key=lambda kv: -kv[1])]
    by_range = [{"range": r, **share(us)} for r, us in in_range.items()]
    for row in grouped + by_range:
        check.record("profile", **row)
    kind = "CUDA kernels" if check.cuda else "CPU ops (smoke: no GPU)"
    cfg = step.cfg
    text = (
        f"# Profile of the compiled repa_fast step ({cfg.model.model} + {cfg.target.enc_type}, batch "
        f"{cfg.optim.batch_size})\n\n{n_steps} steps of {wall_ms:.1f} ms wall (under the profiler), "
        f"{total / 1e3 / n_steps:.2f} ms of {kind} per step; shares below are of the latter.\n\n## By kernel group\n\n"
        + md_table(grouped)
        + "\n## By step phase (profiler ranges; their kernels are also counted in the groups above)\n\n"
        + md_table(by_range)
        + f"\n## Top 25 {kind}\n\n"
        + md_table(top)
    )
    write_atomic(check.path("profile.md"), text)
    check.sections.append("## 5. Profile (profile.md)\n\n" + md_table(grouped) + "\n" + md_table(by_range))
    return f"top group: {grouped[0]['group']} {grouped[0]['share']}" if grouped else "empty profile"
