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

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from repa_fast.config import TrainConfig, field_specs, weight_options
from repa_fast.errors import CheckpointError, ConfigError, WriteError
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


# ---------------------------------------------------------------------------------------------------------------
# Reading a run: one way for generate, export, layer features and --init-from (the writing side is above).


def find_checkpoint_dir(path: str, step: int = 0) -> str:
    """A checkpoint directory from itself, or from a run directory (latest, or ``step``)."""
    if os.path.isfile(os.path.join(path, "ema.safetensors")):
        return path
    steps = list_checkpoints(path)
    if not steps:
        raise CheckpointError(
            f"{path}: neither a checkpoint directory (no ema.safetensors) nor a run directory "
            "with checkpoints/<step>/; pass <output-dir>/<exp-name>"
        )
    if step and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint for step {step}; available: {steps}")
    return step_dir(path, step or steps[-1])


@dataclass
class Run:
    """What ``load_run`` found: the checkpoint it read, the run's options and the requested weights (our key names).

    ``config`` holds the options the source states (``stated``: the run's config.json "trainer" section, or the
    foreign file's saved flags that are repa_fast options) and the defaults for the rest. ``format`` is
    "repa_fast" or the foreign format's adapter name (``repa_fast.engine.adapters``).
    """

    path: str  # the checkpoint directory, or the file, that was read
    config: TrainConfig
    weights: dict
    stated: frozenset = frozenset()
    format: str = "repa_fast"
    config_path: str | None = None
    step: int | None = None
    dropped: list = field(default_factory=list)  # keys of the file the adapter dropped (rebuilt RoPE tables)

    @property
    def foreign(self) -> bool:
        return self.format != "repa_fast"


WHICH = ("ema", "model")


def load_run(path: str, which: str = "ema", step: int = 0) -> Run:
    """Find and read a run: a run directory (its latest checkpoint, or ``step``), a checkpoint directory, one of its
    ``ema`` / ``model`` .safetensors files, or a foreign .pt file (the reference's, ERW's, REPA's released
    ``last.pt``, an exported ``{'ema': ...}`` file). ``which``: the EMA or the raw model weights. A CheckpointError
    names ``path`` and what it expected when the path is none of these or lacks the weights."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if os.path.isdir(path):
        return _load_own(path, find_checkpoint_dir(path, step), which)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: no such file or directory: neither a checkpoint directory nor a run directory "
            "(<output-dir>/<exp-name>) nor a checkpoint file (.pt)"
        )
    if step:
        raise CheckpointError(f"{path} is a file: a step ({step}) only picks a checkpoint of a run directory")
    name = os.path.basename(path)
    if name in (f"{w}.safetensors" for w in WHICH):
        if name != f"{which}.safetensors":
            other = name.removesuffix(".safetensors")
            raise CheckpointError(f"{path} holds the {other} weights, not the {which} weights; ask for {other!r}")
        return _load_own(path, os.path.dirname(os.path.abspath(path)), which)
    return _load_foreign(path, which)


def _load_own(path: str, ckpt: str, which: str) -> Run:
    weights = load_tensors(os.path.join(ckpt, f"{which}.safetensors"))
    candidates = (os.path.join(ckpt, "..", "..", "config.json"), os.path.join(path, "config.json"))
    config_path = next((os.path.normpath(c) for c in candidates if os.path.isfile(c)), None)
    cfg, stated = read_run_config(config_path) if config_path else (TrainConfig(), frozenset())
    base = os.path.basename(os.path.normpath(ckpt))
    step = int(base) if _STEP_DIR.match(base) else None
    return Run(ckpt, cfg, weights, stated, "repa_fast", config_path, step)


def read_run_config(path: str) -> tuple[TrainConfig, frozenset]:
    """A run's config.json as (TrainConfig, the options it states). Options this version does not know (an older or
    newer repa_fast wrote them) are skipped with a warning; a known option with a bad value is an error."""
    try:
        with open(path) as f:
            trainer = json.load(f).get("trainer", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's configuration ({e}); restore the file") from e
    known = {name for name, _ in field_specs()}
    unknown = sorted(set(trainer) - known)
    if unknown:
        logger.warning("%s: options %s are not known to this repa_fast; ignored", path, unknown)
    values = {k: v for k, v in trainer.items() if k in known}
    cfg = TrainConfig()
    cfg.update(values, source=path)
    return cfg, frozenset(values)


def _load_foreign(path: str, which: str) -> Run:
    from repa_fast.engine.adapters import read_foreign

    f = read_foreign(path)
    sd = getattr(f, which)
    if sd is None:
        other = WHICH[1 - WHICH.index(which)]
        raise CheckpointError(
            f"{path}: no {which!r} weights (expected the reference layout {{'ema': state_dict}}, or a bare state "
            f"dict as REPA's last.pt); read the {other!r} weights instead (--weights {other})"
        )
    weights, dropped = f.adapter.to_ours(sd)
    cfg, stated = TrainConfig(), set()
    for key, value in f.adapter.config(f.args).items():
        try:
            cfg.update({key: value}, source=f"{path} (saved args)")
            stated.add(key)
        except ConfigError:  # e.g. the reference's --model None: not stated, the caller asks for it
            logger.debug("%s: saved %s=%r is not a valid repa_fast option value; not used", path, key, value)
    return Run(path, cfg, weights, frozenset(stated), f.kind, None, f.step, dropped)
