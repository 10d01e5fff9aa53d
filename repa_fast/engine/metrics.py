"""On-device loss accumulation (no per-step host sync) and the log sinks: JSON lines, TensorBoard, wandb."""

import json
import logging
import os
import sys
import time

import torch

from repa_fast.errors import require

logger = logging.getLogger("repa_fast")

_KEYS = ("loss", "denoising", "alignment", "cls", "grad_norm")  # "cls": REG's class-token term (0 without REG)
_LOSSES = len(_KEYS) - 1


class LossMeter:
    """Sums of the step losses kept on device; read (one sync) every --log-every steps."""

    def __init__(self, device: torch.device, max_skipped: int = 0):
        self.sums = torch.zeros(len(_KEYS), device=device, dtype=torch.float64)
        self.counts = torch.zeros(3, device=device, dtype=torch.float64)  # micro-batches, non-finite losses, skipped
        self.steps = 0
        self.stop_agreed = False  # some process asked to stop (set by read; engine/stop.py)
        # Consecutive skipped steps, on device (--max-skipped-steps): the current streak, the step it started at,
        # and the start of the first streak that reached ``max_skipped`` (-1: none); read with the losses.
        self.max_skipped = int(max_skipped)
        self.streak = torch.zeros(3, device=device, dtype=torch.float64)
        self.streak[2] = -1
        self.diverged_at = -1  # host copy of streak[2] after the last read

    def add_losses(self, losses: dict) -> None:
        vals = torch.stack([losses[k].detach().double() if k in losses else self.sums[0] * 0 for k in _KEYS[:_LOSSES]])
        finite = torch.isfinite(vals[0])
        self.sums[:_LOSSES] += torch.where(finite, vals, torch.zeros_like(vals))
        self.counts[0] += finite.double()
        self.counts[1] += (~finite).double()

    def add_step(self, grad_norm: torch.Tensor, skipped: torch.Tensor, step: int | None = None) -> None:
        self.sums[_LOSSES] += torch.where(torch.isfinite(grad_norm), grad_norm.double(), 0.0)
        self.counts[2] += skipped.double()
        self.steps += 1
        if step is not None and self.max_skipped:
            s = skipped.to(torch.bool)
            run = torch.where(s, self.streak[0] + 1, 0.0)
            start = torch.where(s & (run == 1), float(step), self.streak[1])
            hit = (self.streak[2] < 0) & (run >= self.max_skipped)
            self.streak.copy_(torch.stack([run, start, torch.where(hit, start, self.streak[2])]))

    def pending_divergence(self, backend) -> int:
        """The step where a streak of ``max_skipped`` skipped steps started, or -1 (a sync: call it rarely)."""
        return round(backend.all_reduce_mean(self.streak[2:3].clone()).item())

    def pending_nonfinite(self, backend) -> int:
        """Non-finite losses counted since the last read, over all ranks (a sync: call it rarely)."""
        return round(backend.all_reduce_mean(self.counts[1:2].clone()).item() * backend.world_size)

    def read(self, backend, stop: bool = False) -> dict:
        """Mean over the interval across ranks, and the interval's non-finite / skipped counts. Resets.

        ``stop`` (this process got a signal) rides along in the same all-reduce; ``stop_agreed`` is then True on
        every process if any asked, so all stop after the same step without another collective.
        """
        flag = torch.full((1,), float(stop), device=self.sums.device, dtype=self.sums.dtype)
        packed = backend.all_reduce_mean(torch.cat([self.sums, self.counts, self.streak, flag])).tolist()  # one sync
        self.stop_agreed = self.stop_agreed or packed.pop() > 0
        self.diverged_at = round(packed.pop())  # identical on every rank (every rank skips the same steps)
        packed = packed[:-2]
        sums, counts = packed[: len(_KEYS)], packed[len(_KEYS) :]
        nan = float("nan")  # an interval whose every micro-batch was non-finite has no loss: NaN, never 0.0
        out = {k: sums[i] / counts[0] if counts[0] else nan for i, k in enumerate(_KEYS[:_LOSSES])}  # ratio of means
        all_skipped = self.steps and round(counts[2]) >= self.steps
        out["grad_norm"] = nan if all_skipped else sums[_LOSSES] / max(self.steps, 1)  # identical on every rank
        out["nonfinite_losses"] = round(counts[1] * backend.world_size)
        out["skipped_steps"] = round(counts[2])  # every rank skips the same steps
        self.sums.zero_(), self.counts.zero_()
        self.steps = 0
        return out


# --report-to value -> (module, pip extra, package): the one place that knows what each sink needs.
_SINKS = {
    "tensorboard": ("torch.utils.tensorboard", "logging", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
}


def import_sink(report_to: str):
    """The module behind a --report-to sink (None for "none"), or a MissingDependency naming the pip extra."""
    if report_to not in _SINKS:
        return None
    module, extra, package = _SINKS[report_to]
    return require(module, extra, f"--report-to {report_to} (or --report-to none)", package)


class LogSinks:
    """log.jsonl (always), TensorBoard or wandb (when asked for; a missing package is an error naming the extra)."""

    def __init__(self, run_dir: str, report_to: str, config: dict, enabled: bool = True):
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        self.path = os.path.join(run_dir, "log.jsonl")
        self.file = open(self.path, "a", buffering=1)
        module = import_sink(report_to)
        if report_to == "tensorboard":
            self.tb = module.SummaryWriter(os.path.join(run_dir, config.get("logging_dir") or "tensorboard"))
        elif report_to == "wandb":
            self.wandb = module.init(
                project="repa_fast", name=config.get("exp_name"), config=config, dir=run_dir, resume="allow"
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def add_image(self, tag: str, path: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            import numpy as np
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def setup_logging(is_main: bool, run_dir: str | None = None) -> None:
    """Human-readable log to stderr (rank 0 at INFO, others at WARNING) and to <run_dir>/train.log on rank 0."""
    root = logging.getLogger("repa_fast")
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    root.handlers.clear()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    root.addHandler(h)
    if is_main and run_dir:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False
