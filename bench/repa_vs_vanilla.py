"""Does alignment help on the embedded demo? Vanilla SiT vs REPA to a random encoder vs REPA to a trained one.

    python bench/repa_vs_vanilla.py                       # 3 seeds x 3 runs x 400 steps: ~1 h on 2 free CPU cores
    python bench/repa_vs_vanilla.py --seeds 0 --steps 150 # a shortened run

Runs (same data, steps, seeds and everything else; the demo preset otherwise):
- ``vanilla``: --proj-coeff 0 (no alignment);
- ``repa-random``: REPA to ``digits-ssl`` with random weights (--no-encoder-pretrained);
- ``repa-ssl``: REPA to ``digits-ssl`` trained on the digits without labels (the demo default).
Every ``--eval-every`` steps the training loop's own evaluation (``--eval-every``, repa_fast/eval/training.py)
samples ``--eval-samples`` class-balanced images from the EMA (Euler, 50 steps, no guidance) and logs FD-digits:
the Fréchet distance between features of a separate digits *classifier* (repa_fast/eval/digits.py, trained with
labels, not the target encoder, so the measure is not circular) of the samples and of all 1797 digits.
After training, CKNNA (k = 10) between each run's block ``--encoder-depth`` (patch-mean, t = 0.5, null class) and
the trained ``digits-ssl`` encoder over 512 digits. Writes bench/results/repa_vs_vanilla.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RUNS = {
    "vanilla": ["--proj-coeff", "0"],
    "repa-random": ["--no-encoder-pretrained"],
    "repa-ssl": [],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--work", default=os.path.join(REPO, "demo_out", "bench_repa_vs_vanilla"))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    return p.parse_args()


def reference_npz(work: str) -> str:
    from repa_fast.eval.digits import digits_images

    path = os.path.join(work, "digits_ref.npz")
    if not os.path.isfile(path):
        np.savez(path, digits_images(16)[0].permute(0, 2, 3, 1).numpy())
    return path


def train_one(name: str, seed: int, args, ref: str) -> str:
    from repa_fast.cli import resolve_config
    from repa_fast.engine.trainer import train

    argv = ["--preset", "demo", "--seed", str(seed), "--max-train-steps", str(args.steps), "--output-dir", args.work]
    argv += ["--exp-name", f"{name}-s{seed}", "--sampling-steps", "0", "--checkpointing-steps", str(args.steps)]
    argv += ["--report-to", "none", "--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples)]
    argv += ["--fid-reference", ref, "--eval-feature-net", "digits", "--eval-cache-dir", args.work, *RUNS[name]]
    cfg, _ = resolve_config(argv)
    return train(cfg)["run_dir"]


def cknna_at_aligned_layer(run_dir: str, depth: int) -> float:
    from repa_fast.eval.cknna import cknna
    from repa_fast.eval.digits import digits_images
    from repa_fast.eval.layer_features import collect_layer_features
    from repa_fast.models.digits_encoder import build_digits_encoder
    from repa_fast.options import LayerFeatureOptions

    opts = LayerFeatureOptions(ckpt=run_dir, weights="ema", t=0.5, num_images=512, batch_size=128, seed=0)
    feats = collect_layer_features(opts, need_target=False)
    target = build_digits_encoder("digits-ssl", 16, grid=8)(digits_images(16)[0][:512]).mean(1)
    return cknna(feats.layers[depth - 1], target, k=10)


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args()
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    ref = reference_npz(args.work)
    rows, finals = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.runs.split(","):
            t0 = time.time()
            run = train_one(name, seed, args, ref)
            with open(os.path.join(run, "log.jsonl")) as f:
                evals = [r for r in map(json.loads, f) if f"FD-digits-{args.eval_samples}" in r]
            for r in evals:
                rows.append(
                    {"run": name, "seed": seed, "step": r["step"], "fd_digits": r[f"FD-digits-{args.eval_samples}"]}
                )
            ck = cknna_at_aligned_layer(run, depth=2)
            fd = evals[-1][f"FD-digits-{args.eval_samples}"]
            minutes = (time.time() - t0) / 60
            finals.append({"run": name, "seed": seed, "fd_digits": fd, "cknna_layer2": ck, "minutes": minutes})
            print(f"{name} seed {seed}: FD-digits {finals[-1]['fd_digits']:.3f}, CKNNA(layer 2) {ck:.3f}", flush=True)
    write_results(args, rows, finals)


def write_results(args, rows, finals) -> None:
    base = os.path.join(args.out, "repa_vs_vanilla")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "seed", "step", "fd_digits"])
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# REPA vs vanilla on the embedded demo (git {git_sha()}, torch {torch.__version__}, CPU)",
        "",
        f"`python bench/repa_vs_vanilla.py --seeds {args.seeds} --steps {args.steps} --eval-every {args.eval_every} "
        f"--eval-samples {args.eval_samples}`",
        "",
        f"| run | FD-digits at step {args.steps} (mean ± sd over seeds) | CKNNA at block 2 vs digits-ssl | min/run |",
        "|---|---|---|---|",
    ]
    for name in args.runs.split(","):
        fd = [r["fd_digits"] for r in finals if r["run"] == name]
        ck = [r["cknna_layer2"] for r in finals if r["run"] == name]
        mins = [r["minutes"] for r in finals if r["run"] == name]
        sd = f" ± {statistics.stdev(fd):.3f}" if len(fd) > 1 else ""
        lines.append(
            f"| {name} | {statistics.mean(fd):.3f}{sd} | {statistics.mean(ck):.3f} | {statistics.mean(mins):.1f} |"
        )
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, base + ".png", args)
    print("\n".join(lines))


def plot(rows, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in args.runs.split(","):
        steps = sorted({r["step"] for r in rows if r["run"] == name})
        vals = [[r["fd_digits"] for r in rows if r["run"] == name and r["step"] == s] for s in steps]
        mean = [statistics.mean(v) for v in vals]
        ax.plot(steps, mean, marker="o", label=name)
        if all(len(v) > 1 for v in vals):
            sd = [statistics.stdev(v) for v in vals]
            ax.fill_between(steps, np.subtract(mean, sd), np.add(mean, sd), alpha=0.2)
    ax.set(xlabel="training step", ylabel="FD-digits (lower is better)", yscale="log", title="digits demo")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
