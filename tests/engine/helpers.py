"""Tiny training configurations and subprocess runs for the trainer tests."""

import os
import subprocess
import sys

from repa_fast.cli import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "train.py")
FAULT_ENTRY = os.path.join(REPO, "tests", "engine", "faults.py")  # train.py with REPA_FAST_FAULT's kill installed

# The demo preset shrunk to 16x16 digits (4x4 token grid), batch 8: a step takes a few tens of milliseconds.
TINY_DEMO = [
    "--preset",
    "demo",
    "--model",
    "SiT-T/4",
    "--resolution",
    "16",
    "--encoder-grid",
    "4",
    "--batch-size",
    "8",
    "--log-every",
    "1",
    "--sampling-steps",
    "0",
    "--report-to",
    "none",
    "--num-workers",
    "0",
]


def tiny_args(out, *extra, steps=4, ckpt_every=2):
    return [
        *TINY_DEMO,
        "--output-dir",
        str(out),
        "--exp-name",
        "run",
        "--max-train-steps",
        str(steps),
        "--checkpointing-steps",
        str(ckpt_every),
        *map(str, extra),
    ]


def tiny_cfg(out, *extra, **kw):
    cfg, _ = resolve_config(tiny_args(out, *extra, **kw))
    return cfg


def run_train(args, env_extra=None, timeout=300, script=TRAIN):
    """``python train.py ARGS`` (or ``script``) in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class StepRig:
    """One-process training state for step-level tests: model, encoders, optimizer, EMA, a fixed batch."""

    def __init__(self, cfg, device: str = "cpu"):
        import torch

        from repa_fast import build as B
        from repa_fast.data import ResumableDistributedSampler
        from repa_fast.engine import trainer as T
        from repa_fast.engine.ema import EMA
        from repa_fast.engine.metrics import LossMeter
        from repa_fast.engine.parallel import Backend
        from repa_fast.recipe import build_recipe

        self.T, self.cfg, self.device = T, cfg, torch.device(device)
        dataset = B.build_dataset(cfg)
        self.model, self.encoders = B.build_models(cfg, dataset, self.device)
        self.backend = Backend(device)
        opt = B.build_optimizer(cfg, self.model)
        fp16 = cfg.run.mixed_precision == "fp16"
        scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        sampler = ResumableDistributedSampler(len(dataset), cfg.optim.batch_size)
        recipe = build_recipe(cfg)
        self.state = T.State(
            self.model, self.backend.wrap(self.model, opt), EMA(self.model), opt, scaler, sampler, recipe=recipe
        )
        self.state.phase = recipe.phase(0)
        self.state.fixed = frozenset(n for n, p in self.model.named_parameters() if not p.requires_grad)
        self.meter = LossMeter(self.device)
        items = [dataset[i] for i in range(cfg.optim.batch_size)]
        self.batch = tuple(torch.stack([it[k] for it in items]).to(self.device) for k in range(3))
        self.amp = B.AMP_DTYPES[cfg.run.mixed_precision]

    def enter(self, phase):
        """Rebuild optimizer and EMA for ``phase`` as the trainer does at a phase boundary."""
        self.T.change_phase(self.cfg, self.state, self.backend, phase)

    def micro_step(self):
        return self.T.micro_step(self.cfg, self.state, self.backend, self.batch, self.encoders, self.amp, last=True)

    def step(self):
        self.meter.add_losses(self.micro_step())
        self.T.optimizer_step(self.cfg, self.state, self.backend, self.meter)
