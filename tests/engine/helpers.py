"""Tiny training configurations and subprocess runs for the trainer tests."""

import os
import subprocess
import sys

from repa_fast.cli import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The demo preset shrunk to 16x16 digits (4x4 token grid), batch 8: a step takes a few tens of milliseconds.
TINY_DEMO = ["--preset", "demo", "--model", "SiT-T/4", "--resolution", "16", "--encoder-grid", "4", "--batch-size", "8",
             "--log-every", "1", "--sampling-steps", "0", "--report-to", "none", "--num-workers", "0"]


def tiny_args(out, *extra, steps=4, ckpt_every=2):
    return [*TINY_DEMO, "--output-dir", str(out), "--exp-name", "run", "--max-train-steps", str(steps),
            "--checkpointing-steps", str(ckpt_every), *map(str, extra)]


def tiny_cfg(out, *extra, **kw):
    cfg, _ = resolve_config(tiny_args(out, *extra, **kw))
    return cfg


def run_train(args, env_extra=None, timeout=300):
    """``python train.py ARGS`` in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
