"""bench/gpu_check.py starts, parses and writes every file of a device run: ``--smoke`` on the CPU, in a subprocess."""

import csv
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_check  # noqa: E402


def _run(*args, timeout=1200):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # --smoke must set it itself
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_smoke_run_writes_every_file(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(os.listdir(out)) == sorted(gpu_check.FILES)  # and nothing else: a device call returns <= 8 files
    for name in gpu_check.FILES:
        assert (out / name).stat().st_size > 0, name
    summary = proc.stdout.strip().splitlines()[-8:]  # the summary table is printed last
    assert summary[0].startswith("| part | status") and all(f"| {p} | ok |" in "\n".join(summary) for p in "abcdef")
    env = json.loads((out / "env.json").read_text())
    assert env["smoke"] is True and env["matmul_tflops"] > 0 and env["copy_gbps"] > 0
    with open(out / "ops.csv") as f:
        ops = list(csv.DictReader(f))
    assert {r["op"] for r in ops} == {
        "adaln_modulate",
        "gated_residual_adaln",
        "qk_norm_rope",
        "rope_2d",
        "alignment_loss",
    }
    assert {r["provider"] for r in ops} >= {"ref", "compile(ref)", "triton:default"}
    assert all(float(r["ms_p50"]) > 0 and int(r["bytes"]) > 0 for r in ops)
    with open(out / "step.csv") as f:
        steps = list(csv.DictReader(f))
    assert [r["provider"] for r in steps] == ["reference", "repa_fast eager", "repa_fast compile"]
    assert all(float(r["img_per_s"]) > 0 for r in steps)
    assert (
        "## By kernel group" in (out / "profile.md").read_text()
        and "| EMA update |" in (out / "profile.md").read_text()
    )
    train_log = (out / "train_check.log").read_text()
    assert "--resume" in train_log and "bitwise equal: True" in train_log
    report = (out / "report.md").read_text()
    assert all(f"## {p}." in report for p in "acdef") and "## b. pytest -m gpu" in report


def test_bad_parts_is_a_usage_error(tmp_path):
    proc = _run("--out", str(tmp_path), "--parts", "a,x", timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['x']" in proc.stderr


def test_kernel_groups():
    assert gpu_check.kernel_group("_adaln_bwd_kernel") == "fused (repa_fast)"
    assert gpu_check.kernel_group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert gpu_check.kernel_group("flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128>>") == "attention"
    assert gpu_check.kernel_group("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == (
        "optimizer/EMA"
    )
    assert gpu_check.kernel_group("triton_poi_fused_add_mul_0") == "elementwise"
    assert gpu_check.kernel_group("some_unknown_kernel") == "other"
