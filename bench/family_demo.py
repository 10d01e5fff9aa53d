"""The REPA family on the embedded demo: vanilla, REPA, ERW, REG and iREPA, same data, steps, batch and seeds.

    python bench/family_demo.py                              # 5 methods x 3 seeds x 200 steps (about 1 h on 2 cores)
    python bench/family_demo.py --methods vanilla,reg --seeds 0 --steps 100   # a shortened run

Methods (the demo preset otherwise: SiT-T/2 on 16x16 digits, batch 64, the ``digits-ssl`` target):
- ``vanilla``: ``--preset demo --proj-coeff 0`` (no alignment);
- ``repa``: ``--preset demo`` (REPA at block 2);
- ``erw``: ``--preset erw-demo`` (warm-up of blocks 1-2 on alignment alone for 1/4 of the steps, then full training
  with the decaying weight; aligned at block 3 as the preset says);
- ``reg``: ``--preset reg-demo`` (REG: digits-ssl's pooled global feature, its SimCLR representation, is the class
  token, noised and denoised beside the patch tokens);
- ``irepa``: ``--preset irepa-demo`` (iREPA: conv projector, spatially z-scored targets).
Every ``--eval-every`` steps the training loop's own evaluation samples ``--eval-samples`` class-balanced images
from the EMA (Euler, 50 steps, no guidance) and logs FD-digits: the Fréchet distance between the features of a
separate digits *classifier* (repa_fast/eval/digits.py, trained with labels, so the measure is not the target
encoder) of the samples and of all 1,797 digits. After training, CKNNA (k = 10) between the run's aligned block
(patch tokens averaged; REG's class token left out) and the trained ``digits-ssl`` over 512 digits.

Steps to threshold: the first evaluation step at which a run's FD-digits is at or below the threshold, by default
vanilla's mean FD-digits at the last step (how many steps each method needs to match vanilla's final quality).
Each finished run writes ``<work>/<method>-s<seed>/family_result.json``; a rerun skips finished runs, so an
interrupted bench resumes with the same command; ``--report-only`` writes the table from the finished runs alone
(the table says how many seeds each method has). Writes bench/results/family_demo.{csv,md,png}.
It is an illustration at toy scale (a 6-block SiT on 16x16 digits), not a reproduction of any paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = {
    "vanilla": ["--preset", "demo", "--proj-coeff", "0"],
    "repa": ["--preset", "demo"],
    "erw": ["--preset", "erw-demo"],
    "reg": ["--preset", "reg-demo"],
    "irepa": ["--preset", "irepa-demo"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--threshold", type=float, default=None, help="FD-digits threshold (default: vanilla's final)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the table and plot from the runs already finished under --work",
    )
    p.add_argument("--work", default=os.path.join(REPO, "demo_out", "bench_family"))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    return p.parse_args(argv)


def method_argv(method: str, seed: int, args, ref: str) -> list[str]:
    """The train.py command line of one run (ERW's warm-up scaled to a quarter of the steps)."""
    argv = [*METHODS[method], "--seed", str(seed), "--max-train-steps", str(args.steps), "--output-dir", args.work]
    argv += ["--exp-name", f"{method}-s{seed}", "--sampling-steps", "0", "--checkpointing-steps", str(args.steps)]
    argv += ["--report-to", "none", "--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples)]
    argv += ["--fid-reference", ref, "--eval-feature-net", "digits", "--eval-cache-dir", args.work]
    if method == "erw":
        argv += ["--warmup-steps", str(max(1, args.steps // 4))]
    return argv


def reference_npz(work: str) -> str:
    import numpy as np

    from repa_fast.eval.digits import digits_images
    from repa_fast.io import atomic_path

    path = os.path.join(work, "digits_ref.npz")
    if not os.path.isfile(path):
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, digits_images(16)[0].permute(0, 2, 3, 1).numpy())
    return path


def run_one(method: str, seed: int, args, ref: str) -> dict:
    """Train one run (or read its finished result) -> {"method", "seed", "curve": [[step, fd]], "cknna", ...}."""
    from repa_fast.io import write_text

    done = os.path.join(args.work, f"{method}-s{seed}", "family_result.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    from repa_fast.cli import resolve_config
    from repa_fast.engine.trainer import train

    t0 = time.time()
    cfg, _ = resolve_config(method_argv(method, seed, args, ref))
    run = train(cfg)["run_dir"]
    key = f"FD-digits-{args.eval_samples}"
    with open(os.path.join(run, "log.jsonl")) as f:
        curve = [[r["step"], r[key]] for r in map(json.loads, f) if key in r]
    depth = cfg.model.encoder_depth
    result = {
        "method": method,
        "seed": seed,
        "curve": curve,
        "aligned_block": depth,
        "cknna": cknna_at_block(run, depth),
        "minutes": (time.time() - t0) / 60,
    }
    write_text(done, json.dumps(result, indent=1) + "\n")
    return result


def cknna_at_block(run_dir: str, depth: int) -> float:
    from repa_fast.eval.cknna import cknna
    from repa_fast.eval.layer_features import collect_layer_features
    from repa_fast.options import LayerFeatureOptions

    opts = LayerFeatureOptions(ckpt=run_dir, weights="ema", t=0.5, num_images=512, batch_size=128, seed=0)
    feats = collect_layer_features(opts, need_target=True)
    return cknna(feats.layers[depth - 1], feats.target, k=10)


def steps_to_threshold(curve: list, threshold: float) -> int | None:
    """The first evaluation step whose FD-digits is <= threshold; None when never reached."""
    return next((int(step) for step, fd in curve if fd <= threshold), None)


def summarize(results: list[dict], methods: list[str], threshold: float | None = None) -> tuple[float, list[dict]]:
    """Per method: FD-digits at the last step (mean, sd), steps to threshold (mean over the seeds that reach it,
    and how many do), CKNNA (mean). The threshold defaults to vanilla's mean final FD-digits."""
    final = {m: [r["curve"][-1][1] for r in results if r["method"] == m] for m in methods}
    if threshold is None:
        if not final.get("vanilla"):
            raise ValueError("no threshold given and no vanilla run to take it from")
        threshold = statistics.mean(final["vanilla"])
    rows = []
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        if not runs:
            continue
        reach = [s for s in (steps_to_threshold(r["curve"], threshold) for r in runs) if s is not None]
        fds = final[m]
        rows.append(
            {
                "method": m,
                "seeds": len(runs),
                "fd_mean": statistics.mean(fds),
                "fd_sd": statistics.stdev(fds) if len(fds) > 1 else math.nan,
                "steps_to_threshold": statistics.mean(reach) if reach else None,
                "reached": len(reach),
                "cknna": statistics.mean(r["cknna"] for r in runs),
                "aligned_block": runs[0]["aligned_block"],
                "minutes": statistics.mean(r["minutes"] for r in runs),
            }
        )
    return threshold, rows


def markdown(rows: list[dict], threshold: float, args, command: str, head: str) -> str:
    steps = args.steps
    lines = [
        f"# The REPA family on the embedded demo ({head})",
        "",
        f"`{command}`",
        "",
        f"Threshold for steps-to-threshold: FD-digits {threshold:.3f}"
        + (" (vanilla's mean at the last step)" if args.threshold is None else ""),
        "",
        f"| method | FD-digits at step {steps} (mean ± sd) | steps to threshold (seeds reaching it) | CKNNA at the "
        "aligned block vs digits-ssl | aligned block | min/run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = "" if math.isnan(r["fd_sd"]) else f" ± {r['fd_sd']:.2f}"
        reach = "not reached" if r["steps_to_threshold"] is None else f"{r['steps_to_threshold']:.0f}"
        lines.append(
            f"| {r['method']} | {r['fd_mean']:.2f}{sd} | {reach} ({r['reached']}/{r['seeds']}) | {r['cknna']:.3f} "
            f"| {r['aligned_block']} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def git_head() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    import torch

    return f"git {sha}, torch {torch.__version__}, CPU"


def write_results(results, rows, threshold, args, command) -> None:
    from repa_fast.io import write_text

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "family_demo")
    lines = ["method,seed,step,fd_digits"]
    lines += [f"{r['method']},{r['seed']},{s},{fd:.6f}" for r in results for s, fd in r["curve"]]
    write_text(base + ".csv", "\n".join(lines) + "\n")
    text = markdown(rows, threshold, args, command, git_head())
    write_text(base + ".md", text)
    plot(results, [r["method"] for r in rows], threshold, base + ".png")
    print(text)


def plot(results, methods, threshold, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repa_fast.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for m in methods:
        curves = [r["curve"] for r in results if r["method"] == m]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", ms=3, label=m)
        if len(curves) > 1:
            sd = [statistics.stdev(c[i][1] for c in curves) for i in range(len(steps))]
            ax.fill_between(steps, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], alpha=0.15)
    ax.axhline(threshold, color="gray", ls="--", lw=1, label="threshold")
    ax.set(xlabel="training step", ylabel="FD-digits (lower is better)", yscale="log", title="REPA family, digits demo")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    ref = reference_npz(args.work)
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for m in methods:
            if args.report_only:
                done = os.path.join(args.work, f"{m}-s{seed}", "family_result.json")
                if os.path.isfile(done):
                    results.append(run_one(m, seed, args, ref))  # read back, nothing trained
                continue
            results.append(run_one(m, seed, args, ref))
            r = results[-1]
            print(f"{m} seed {seed}: FD-digits {r['curve'][-1][1]:.3f}, CKNNA {r['cknna']:.3f}", flush=True)
    threshold, rows = summarize(results, methods, args.threshold)
    if not results:
        raise SystemExit(f"--report-only: no finished run under {args.work}")
    keys = ("methods", "seeds", "steps", "eval_every", "eval_samples")
    command = "python bench/family_demo.py " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys)
    write_results(results, rows, threshold, args, command)


if __name__ == "__main__":
    main()
