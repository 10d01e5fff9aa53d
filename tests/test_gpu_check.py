"""bench/gpu_check (the package behind ``python bench/gpu_check.py``): ``--smoke`` on the CPU writes every file of a
device run, in the issue's order, one JSON line per finished measurement; a forced short ``--deadline-s`` stops it
with what it measured kept; no file of the package is over ~300 lines."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
PACKAGE = os.path.join(REPO, "bench", "gpu_check")
sys.path.insert(0, os.path.join(REPO, "bench"))

import gpu_check  # noqa: E402  (the package: Python prefers it to bench/gpu_check.py)


def _run(*args, timeout=1200):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # --smoke must set it itself
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _results(out) -> list[dict]:
    with open(out / "results.jsonl") as f:
        return [json.loads(line) for line in f]  # every line is whole JSON: written and flushed one at a time


@pytest.mark.slow
def test_smoke_run_writes_every_file_in_order(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(os.listdir(out)) == sorted(gpu_check.FILES)  # and nothing else: a device call returns few files
    for name in gpu_check.FILES:
        assert (out / name).stat().st_size > 0, name
    summary = proc.stdout.strip().splitlines()[-8:]  # the summary table is printed last
    assert summary[0].startswith("| part | status")
    assert all(f"| {p} | ok |" in "\n".join(summary) for p in gpu_check.PARTS)
    rows = _results(out)
    assert rows[0]["kind"] == "env" and rows[0]["smoke"] is True
    order = list(dict.fromkeys(r["part"] for r in rows))
    assert order == ["env", *gpu_check.PARTS]  # the headline first, then the kernels, then the rest
    headline = {r["provider"]: r for r in rows if r["kind"] == "headline"}
    built = [r["provider"] for r in rows if r["kind"] == "headline_build"]
    assert built == ["reference eager", "ours triton", "reference compiled", "ours impl=ref"]  # BUILD_ORDER
    for name in ("reference eager", "reference compiled", "ours impl=ref", "ours triton"):
        assert headline[name]["status"] == "ok" and headline[name]["img_per_s"] > 0 and headline[name]["n_steps"] == 2
    assert headline["ours + fp8"]["status"] == "skipped" and "sm_89" in headline["ours + fp8"]["why"]
    assert headline["ours + cuDNN attention"]["status"] == "skipped"
    rounds = [r["provider"] for r in rows if r["kind"] == "headline_round"]
    assert rounds[:4] != rounds[4:8] and sorted(rounds[:4]) == sorted(rounds[4:8])  # interleaved, order rotated
    kernels = [r for r in rows if r["kind"] == "kernel"]
    ops = {"adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "rope_2d", "alignment_loss"}
    assert {r["op"] for r in kernels} == ops
    assert {r["provider"] for r in kernels} >= {"ref", "compile(ref)", "triton:default"}
    assert all(r["ms_p50"] > 0 and r["bytes"] > 0 for r in kernels)
    triton = [r for r in kernels if r["provider"].startswith("triton")]
    assert triton and all(r["max_abs_err_vs_ref"] < 1e-4 for r in triton)  # parity of the kernels, fp32
    assert {r["what"] for r in rows if r["kind"] == "ceiling"} == {"fp32 matmul 256^3", "device copy"}
    profile = (out / "profile.md").read_text()
    assert "## By kernel group" in profile and "| EMA update |" in profile
    train_log = (out / "train_check.log").read_text()
    assert "--resume" in train_log and "bitwise equal: True" in train_log
    assert [r["bitwise"] for r in rows if r["kind"] == "train_resume"] == [True]
    report = (out / "report.md").read_text()
    assert all(f"## {i}." in report for i in range(1, 7))


def test_forced_deadline_keeps_what_was_measured(tmp_path):
    """A 16 s budget (11 s after the 5 s margin) against 1000 timed steps per provider: the deadline ends the
    headline (in its builds on a slow machine, in its timing rounds on a fast one; the first build always starts),
    the run exits 3, what finished is in results.jsonl, and report.md says so."""
    out = tmp_path / "out"
    parts = ["--parts", "headline,ceilings,pytest", "--headline-steps", "1000"]
    proc = _run("--smoke", "--out", str(out), "--deadline-s", "16", *parts, timeout=300)
    assert proc.returncode == gpu_check.EXIT_DEADLINE, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _results(out)
    done = [r for r in rows if r["kind"] in ("headline_build", "headline_round")]
    assert done and done[0]["provider"] == "reference eager"
    assert any(r["kind"] == "deadline" and r["part"] == "headline" for r in rows)
    # Nothing ran on long past the budget: one build is not cut (minutes under load), but 1000 steps of even one
    # provider would take several minutes more.
    assert max(r["t_s"] for r in rows) < 16 + 120
    report = (out / "report.md").read_text()
    assert "| headline | deadline |" in report
    assert (out / "pytest_gpu.log").exists() and (out / "profile.md").read_text().startswith("part profile was not")


def test_bad_parts_is_a_usage_error(tmp_path):
    proc = _run("--out", str(tmp_path), "--parts", "headline,x", timeout=120)
    assert proc.returncode == 2 and "unknown part(s) ['x']" in proc.stderr


def test_parts_run_in_the_issues_order_and_share_the_budget():
    args, parts = gpu_check.parse_args(["--out", "x", "--parts", "trainer,kernels,headline"])
    assert parts == ["headline", "kernels", "trainer"] and args.deadline_s == 540
    assert max(gpu_check.WEIGHTS, key=gpu_check.WEIGHTS.get) == "headline"


def test_no_file_of_the_package_is_long():
    sizes = {f: sum(1 for _ in open(os.path.join(PACKAGE, f))) for f in os.listdir(PACKAGE) if f.endswith(".py")}
    assert sizes and max(sizes.values()) <= 300, sizes
    assert sum(1 for _ in open(SCRIPT)) <= 20  # the documented command is a thin runner


def test_kernel_groups():
    assert gpu_check.kernel_group("_adaln_bwd_kernel") == "fused (repa_fast)"
    assert gpu_check.kernel_group("_bias_gelu_fwd_kernel") == "fused (repa_fast)"
    assert gpu_check.kernel_group("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "GEMM"
    assert gpu_check.kernel_group("flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128>>") == "attention"
    assert gpu_check.kernel_group("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == (
        "optimizer/EMA"
    )
    assert gpu_check.kernel_group("triton_poi_fused_add_mul_0") == "elementwise"
    assert gpu_check.kernel_group("some_unknown_kernel") == "other"


def test_headline_predictions_come_from_the_cost_model():
    """The predicted column (bench/gpu_check/predicted.py): one structure per provider the model can price, on the
    cards it knows; the reference below ours impl=ref below ours triton (the model's own ordering at batch 32; its
    fp8 row is priced too, and at this batch it predicts the casts to cost more than the GEMMs gain)."""
    from gpu_check.predicted import card_key, predictions

    assert (card_key("NVIDIA H100 80GB HBM3"), card_key("NVIDIA H200"), card_key("cpu")) == ("h100", "h200", None)
    rows = predictions("NVIDIA H100 80GB HBM3", "SiT-XL/2", "dinov2-vit-b", 256, 32, "bf16", "cudnn_attention")
    assert "reference compiled" not in rows and len(rows) == 5
    img = {k: v["predicted_img_s"] for k, v in rows.items()}
    assert 0 < img["reference eager"] < img["ours impl=ref"] < img["ours triton"] and img["ours + fp8"] > 0
    assert img["ours + cuDNN attention"] == img["ours triton"]  # "auto" already runs cuDNN here
    assert predictions("cpu", "SiT-XL/2", "dinov2-vit-b", 256, 32, "bf16", "sdpa") == {}
