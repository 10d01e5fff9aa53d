"""Atomic, portable checkpoints.

Layout of one checkpoint, ``<run_dir>/checkpoints/<step:07d>/``:
    model.safetensors   trainable model weights (full, unsharded, fp32)
    ema.safetensors     EMA weights
    state.pt            optimizer, grad scaler, step, data position, config: plain containers of tensors and numbers,
                        loadable with ``torch.load(weights_only=True)`` (no pickled classes; the reference pickles
                        its parsed command line, a Namespace that needs ``weights_only=False``)
    rng/rank<r>.pt      RNG states of process r (python, numpy, torch CPU, CUDA)
Everything is written into ``.tmp-<step>-<pid>/`` (repa_fast.io.atomic_path), fsynced, then renamed: a crash or a
full disk mid-save leaves the previous checkpoint intact, and a failed save removes its partial files and says so.
Older checkpoints beyond ``keep`` are deleted only after the new one is in place.
"""

import logging
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from repa_fast.config import weight_options
from repa_fast.errors import CheckpointError, WriteError
from repa_fast.io import TMP_PREFIX, atomic_path, fsync_dir

logger = logging.getLogger("repa_fast")

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^\d{7,}$")


class CheckpointWriteError(WriteError, CheckpointError):
    """Writing a checkpoint failed (exit code of WriteError); the message names what is still intact."""

    exit_code = WriteError.exit_code


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[int]:
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if _STEP_DIR.match(d))


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(run_dir), f"{step:07d}")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def write_checkpoint(
    run_dir: str,
    step: int,
    *,
    model_sd: dict,
    ema_sd: dict,
    state: dict,
    rng: dict[int, dict] | None = None,
    keep: int = 0,
) -> str:
    """Write checkpoint ``step`` atomically (rank 0 calls this with everything gathered). Returns its path."""
    final = step_dir(run_dir, step)

    def intact() -> str:
        previous = [s for s in list_checkpoints(run_dir) if s != step]
        if previous:
            return f"The previous checkpoint {step_dir(run_dir, previous[-1])} is intact (continue with --resume)."
        return "No earlier checkpoint exists."

    size = _nbytes(model_sd) + _nbytes(ema_sd) + _nbytes(state)
    try:
        with atomic_path(final, directory=True, size_hint=size, intact=intact) as tmp:
            os.makedirs(os.path.join(tmp, "rng"))
            save_file(_contiguous(model_sd), os.path.join(tmp, "model.safetensors"))
            save_file(_contiguous(ema_sd), os.path.join(tmp, "ema.safetensors"))
            torch.save({**state, "step": step, "format_version": FORMAT_VERSION}, os.path.join(tmp, "state.pt"))
            for rank, r in (rng or {}).items():
                torch.save(r, os.path.join(tmp, "rng", f"rank{rank}.pt"))
        fsync_dir(checkpoint_root(run_dir))
    except WriteError as e:
        raise CheckpointWriteError(f"checkpoint {step}: {e}") from e.__cause__
    if keep > 0:  # the one just written always stays, whatever newer steps an abandoned timeline left behind
        others = [s for s in list_checkpoints(run_dir) if s != step]
        for old_step in others[: max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(step_dir(run_dir, old_step), ignore_errors=True)
    return final


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def clean_stale_tmp(run_dir: str) -> None:
    """Remove temporaries left by a crashed save (they were never renamed, so nothing references them)."""
    root = checkpoint_root(run_dir)
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.startswith(TMP_PREFIX) or ".old-" in d:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


class Checkpointer:
    """When a save is due and how it is written (torchtitan's CheckpointManager habit): the loop only asks.

    A save is due every ``every`` steps, at ``last_step``, at the end of each recipe phase (``boundaries``: the
    warm-up's last weights are kept whatever the cadence) and when the loop stops on a signal. ``save`` gathers the
    full state through the backend on every rank (collectives), rank 0 writes it with ``write_checkpoint`` (atomic,
    then the oldest beyond ``keep`` are deleted), and every rank waits for it.
    """

    def __init__(self, run_dir: str, *, every: int, last_step: int, boundaries=(), keep: int = 0, config=None):
        self.run_dir, self.every, self.last_step, self.keep = run_dir, every, last_step, keep
        self.boundaries = frozenset(boundaries)
        self.config = config or {}  # the run's flat options, stored in state.pt for --resume's compatibility check

    def due(self, step: int, stopping: bool = False) -> bool:
        return step % self.every == 0 or step == self.last_step or step in self.boundaries or stopping

    def save(self, state, backend) -> str | None:
        """Write ``state`` (the loop's State: model, ema, scaler, sampler, step, phase, nonfinite_total) as checkpoint
        ``state.step``; returns its path on rank 0 (None elsewhere)."""
        model_sd = backend.full_state_dict(state.model)
        ema_sd = backend.full_ema_state_dict(state.ema)
        opt_sd = backend.optimizer_state_dict(state.model)
        rngs = backend.gather_objects(rng_state())
        path = None
        if backend.is_main:
            extra = {
                "optimizer": opt_sd,
                "scaler": state.scaler.state_dict() if state.scaler else None,
                "sampler": state.sampler.state_dict(),
                "config": self.config,
                "world_size": backend.world_size,
                "nonfinite_total": state.nonfinite_total,
                "phase": state.phase.name,
            }
            path = write_checkpoint(
                self.run_dir,
                state.step,
                model_sd=model_sd,
                ema_sd=ema_sd,
                state=extra,
                rng=dict(enumerate(rngs)),
                keep=self.keep,
            )
            logger.info("saved checkpoint %s", path)
        backend.barrier()
        return path


def _load_file(path: str, loader):
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint file {path} is missing; the checkpoint is incomplete, resume from another "
            "step with --resume-step or delete this directory"
        )
    try:
        return loader(path)
    except Exception as e:  # truncated or corrupt file
        raise CheckpointError(
            f"cannot read checkpoint file {path}: {e}. Resume from an earlier step "
            "(--resume-step) or delete this checkpoint."
        ) from e


def load_tensors(path: str) -> dict:
    """A safetensors file's tensors, or a CheckpointError naming the file (missing, truncated or corrupt)."""
    return _load_file(path, load_file)


def read_checkpoint(path: str, rank: int | None = None) -> dict:
    """Load a checkpoint directory: weights via safetensors, the rest with weights_only=True."""
    out = {
        "model": _load_file(os.path.join(path, "model.safetensors"), load_file),
        "ema": _load_file(os.path.join(path, "ema.safetensors"), load_file),
        "state": _load_file(os.path.join(path, "state.pt"), lambda p: torch.load(p, weights_only=True)),
    }
    if out["state"].get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/state.pt has format_version {out['state'].get('format_version')}, "
            f"this repa_fast reads {FORMAT_VERSION}"
        )
    rng_path = os.path.join(path, "rng", f"rank{rank}.pt")
    if rank is not None and os.path.isfile(rng_path):
        out["rng"] = _load_file(rng_path, lambda p: torch.load(p, weights_only=True))
    return out


def resolve_resume(run_dir: str, resume: bool, resume_step: int) -> str | None:
    """The checkpoint directory to resume from, or None for a fresh run."""
    if resume_step:
        path = step_dir(run_dir, resume_step)
        if not os.path.isdir(path):
            have = list_checkpoints(run_dir)
            raise CheckpointError(
                f"--resume-step {resume_step}: {path} does not exist; available steps: {have or 'none'}"
            )
        return path
    if resume:
        steps = list_checkpoints(run_dir)
        if not steps:
            logger.warning("--resume: no checkpoint in %s, starting a fresh run", checkpoint_root(run_dir))
        return step_dir(run_dir, steps[-1]) if steps else None
    return None


def check_compatible(path: str, saved_config: dict, config: dict) -> None:
    """Refuse to continue a run whose weight-defining options (config field metadata ``weights``) differ."""
    diff = [k for k in weight_options() if k in saved_config and saved_config[k] != config.get(k)]
    if diff:
        pairs = ", ".join(f"--{k.replace('_', '-')} {saved_config[k]} (this run: {config.get(k)})" for k in diff)
        raise CheckpointError(
            f"{path} was trained with {pairs}; resume with the same options, or start a new run with another --exp-name"
        )
