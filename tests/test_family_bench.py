"""bench/family_demo.py's aggregation: final FD-digits, steps to threshold, the table (no training here)."""

from __future__ import annotations

import importlib.util
import math
import os
import random

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("family_demo", os.path.join(ROOT, "bench", "family_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(method, seed, fds, cknna=0.1, block=2):
    return {
        "method": method,
        "seed": seed,
        "curve": [[50 * (i + 1), fd] for i, fd in enumerate(fds)],
        "aligned_block": block,
        "cknna": cknna,
        "minutes": 1.0,
    }


def test_steps_to_threshold(bench):
    curve = [[50, 40.0], [100, 30.0], [150, 25.0], [200, 26.0]]
    assert bench.steps_to_threshold(curve, 30.0) == 100  # at or below counts
    assert bench.steps_to_threshold(curve, 29.9) == 150
    assert bench.steps_to_threshold(curve, 10.0) is None


def test_summarize_on_random_curves(bench):
    rng = random.Random(7)
    curves = {(m, s): [rng.uniform(20, 60) for _ in range(4)] for m in ("vanilla", "reg") for s in range(3)}
    results = [_result(m, s, fds, cknna=rng.random()) for (m, s), fds in curves.items()]
    threshold, rows = bench.summarize(results, ["vanilla", "reg", "irepa"])
    vanilla_final = [curves[("vanilla", s)][-1] for s in range(3)]
    assert threshold == pytest.approx(sum(vanilla_final) / 3)
    assert [r["method"] for r in rows] == ["vanilla", "reg"]  # a method without runs is left out
    reg = rows[1]
    reg_final = [curves[("reg", s)][-1] for s in range(3)]
    mean = sum(reg_final) / 3
    assert reg["fd_mean"] == pytest.approx(mean)
    assert reg["fd_sd"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in reg_final) / 2))
    reach = [next((50 * (i + 1) for i, fd in enumerate(curves[("reg", s)]) if fd <= threshold), None) for s in range(3)]
    hit = [r for r in reach if r is not None]
    assert reg["reached"] == len(hit)
    assert reg["steps_to_threshold"] == (pytest.approx(sum(hit) / len(hit)) if hit else None)
    assert reg["cknna"] == pytest.approx(sum(r["cknna"] for r in results if r["method"] == "reg") / 3)


def test_summarize_explicit_threshold_and_no_vanilla(bench):
    results = [_result("repa", 0, [50.0, 20.0])]
    threshold, rows = bench.summarize(results, ["repa"], threshold=30.0)
    assert threshold == 30.0 and rows[0]["steps_to_threshold"] == 100 and math.isnan(rows[0]["fd_sd"])
    with pytest.raises(ValueError, match="vanilla"):
        bench.summarize(results, ["repa"])


def test_markdown_table(bench):
    results = [_result("vanilla", s, [40.0, 30.0 + s]) for s in range(2)] + [_result("repa", 0, [25.0, 20.0])]
    threshold, rows = bench.summarize(results, ["vanilla", "repa"])
    args = bench.parse_args(["--steps", "100"])
    text = bench.markdown(rows, threshold, args, "python bench/family_demo.py", "test")
    assert "| vanilla | 30.50 ± 0.71 | 100 (1/2) |" in text
    assert "| repa | 20.00 | 50 (1/1) |" in text
    assert "FD-digits 30.500 (vanilla's mean at the last step)" in text


def test_method_argv_names_the_presets(bench):
    args = bench.parse_args(["--steps", "200"])
    assert bench.method_argv("reg", 1, args, "ref.npz")[:2] == ["--preset", "reg-demo"]
    erw = bench.method_argv("erw", 0, args, "ref.npz")
    assert erw[erw.index("--warmup-steps") + 1] == "50"
    assert "--proj-coeff" in bench.method_argv("vanilla", 0, args, "ref.npz")
