"""The environment (recorded first: device and versions label every other line; nothing is timed) and, after the
measurements, the two ceilings and ``pytest -m gpu``.

ceilings: bf16 8192^3 matmul TFLOP/s on random data; device-to-device copy GB/s counting bytes read + written.
pytest:   ``pytest -m gpu -q`` in a subprocess (compiled kernels vs float64, compiled block == eager, no host sync in
          a training step), its timeout the part's deadline; never through the Triton interpreter on the device.
"""

from __future__ import annotations

import platform
import sys

import torch

from .core import Check, DeadlineReached, bench_ms, git_sha, md_table, run, subprocess_env, write_atomic


def record_env(check: Check) -> dict:
    import triton

    env = {
        "device": torch.cuda.get_device_name() if check.cuda else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "smoke": check.smoke,
        "budget_s": check.budget_s,
        "git": git_sha(),
    }
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        env |= {"sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    check.sections.append("## Environment\n\n" + md_table([env]))
    return check.record("env", **env)


def part_ceilings(check: Check) -> str:
    n, dtype = (8192, torch.bfloat16) if check.cuda else (256, torch.float32)
    gen = torch.Generator(device=check.device).manual_seed(0)
    a = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    ms = bench_ms(check, lambda: a @ b)[0]
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    check.record("ceiling", what=f"{'bf16' if check.cuda else 'fp32'} matmul {n}^3", tflops=round(tflops, 1))
    numel = 2**28 if check.cuda else 2**22  # 1 GiB of fp32 on the GPU
    src = torch.randn(numel, device=check.device)
    dst = torch.empty_like(src)
    ms = bench_ms(check, lambda: dst.copy_(src))[0]
    gbps = 2 * numel * 4 / (ms * 1e-3) / 1e9  # bytes read + bytes written
    check.record("ceiling", what="device copy", gbps=round(gbps, 1))
    check.keep["copy_gbps"], check.matmul_tflops = gbps, tflops
    row = {"matmul_tflops": round(tflops, 1), "copy_gbps": round(gbps, 1)}
    check.sections.append("## 3. Ceilings\n\n" + md_table([row]))
    return f"matmul {row['matmul_tflops']} TFLOP/s, copy {row['copy_gbps']} GB/s"


def part_pytest(check: Check) -> str:
    # In smoke mode only the GPU test files are collected (they all skip without CUDA): the point is the plumbing.
    paths = ["tests/kernels/test_gpu.py", "tests/engine/test_gpu_step.py"] if check.smoke else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *paths]
    env = subprocess_env()
    code, out = run(check, cmd, check.left(), env)
    log = f"$ {' '.join(cmd)}\n(TRITON_INTERPRET={env.get('TRITON_INTERPRET', 'unset')})\n{out}\nexit code {code}\n"
    write_atomic(check.path("pytest_gpu.log"), log)
    tail = [ln for ln in out.strip().splitlines() if ln.strip() and not ln.startswith("[killed")][-1:] or ["-"]
    check.record("pytest", exit_code=code, tail=tail[0], timed_out=code is None)
    check.sections.append(f"## 4. pytest -m gpu\n\n`{tail[0]}` (exit code {code}; pytest_gpu.log)\n")
    if code is None:
        check.deadline_hit("pytest -m gpu (killed)", ["the rest of the suite"])
        raise DeadlineReached(f"pytest -m gpu killed at the part's deadline: {tail[0]}")
    if code not in (0, 5) or (code == 5 and not check.smoke):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {tail[0]} (exit code {code})")
    return tail[0]
