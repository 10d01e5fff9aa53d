"""Atomic, portable checkpoints.

Layout of one checkpoint, ``<run_dir>/checkpoints/<step:07d>/``:
    model.safetensors   trainable model weights (full, unsharded, fp32)
    ema.safetensors     EMA weights
    state.pt            optimizer, grad scaler, step, data position, config: plain containers of tensors and numbers,
                        loadable with ``torch.load(weights_only=True)`` (no pickled classes; the reference pickles
                        its parsed command line, a Namespace that needs ``weights_only=False``)
    rng/rank<r>.pt      RNG states of process r (python, numpy, torch CPU, CUDA)
    manifest.json       written last: every other file's SHA-256 and size (docs/run_directories.md §Manifest)
Everything is written into ``.tmp-<step>-<pid>/`` (repa_fast.io.atomic_path), fsynced, then renamed: a crash or a
full disk mid-save leaves the previous checkpoint intact, and a failed save removes its partial files and says so.
A checkpoint is complete when its manifest is there and every file matches it (``verify_checkpoint``); one without a
manifest is incomplete, except one written by a repa_fast older than the manifest (state.pt format_version 1), read
with a warning. Weights, EMA and optimizer state are checked finite when written and when read. Older checkpoints
beyond ``keep`` are deleted only after the new one is in place, and only intact ones count towards ``keep``.
"""

import hashlib
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

from repa_fast.config import TrainConfig, field_specs
from repa_fast.errors import CheckpointError, ConfigError, TrainingDiverged, WriteError
from repa_fast.io import TMP_PREFIX, atomic_path, fsync_dir, write_json

logger = logging.getLogger("repa_fast")

FORMAT_VERSION = 2  # 2: a manifest.json lists every file's SHA-256; 1: no manifest (older repa_fast, still read)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "state.pt")
_STEP_DIR = re.compile(r"^\d{7,}$")


class CheckpointWriteError(WriteError, CheckpointError):
    """Writing a checkpoint failed (exit code of WriteError); the message names what is still intact."""

    exit_code = WriteError.exit_code


class CheckpointDamaged(CheckpointError):
    """A checkpoint is incomplete or its files differ from its manifest (``reason`` says which file and how)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is damaged or incomplete: {reason}")
        self.path, self.reason = path, reason


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
    """Write checkpoint ``step`` atomically (rank 0 calls this with everything gathered). Returns its path.

    Refused (``TrainingDiverged``, nothing written) when a weight, EMA or optimizer tensor is non-finite; the
    manifest is written last, so the published directory is complete or absent."""
    final = step_dir(run_dir, step)
    for name, tree in (("model.safetensors", model_sd), ("ema.safetensors", ema_sd), ("state.pt", state)):
        bad = first_nonfinite(tree)
        if bad is not None:
            good = newest_intact(run_dir)
            where = f"the newest intact checkpoint is {step_dir(run_dir, good)}" if good else "no intact checkpoint"
            raise TrainingDiverged(
                f"step {step}: {name} tensor {bad} is non-finite, so checkpoint {step} was not written ({where}); "
                "the run diverged: lower --learning-rate or --max-grad-norm and resume from that checkpoint"
            )

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
            write_manifest(tmp, step)  # last: a directory with a manifest is complete
        fsync_dir(checkpoint_root(run_dir))
    except WriteError as e:
        raise CheckpointWriteError(f"checkpoint {step}: {e}") from e.__cause__
    _VERIFIED[final] = _manifest_stamp(final)
    if keep > 0:
        rotate(run_dir, step, keep)
    return final


def rotate(run_dir: str, step: int, keep: int) -> None:
    """Keep checkpoint ``step`` and the newest ``keep - 1`` other intact ones; delete older intact ones. A checkpoint
    that does not verify neither counts towards ``keep`` nor is deleted (the newest intact one is never rotated out
    because of a damaged newer one); whatever newer steps an abandoned timeline left behind count as others."""
    others = [s for s in list_checkpoints(run_dir) if s != step]
    kept = 0
    for s in reversed(others):
        path = step_dir(run_dir, s)
        try:
            verify_checkpoint(path, quiet=True, cached=True)
        except CheckpointError as e:
            logger.warning("not counted towards --checkpoints-total-limit and kept for inspection: %s", e)
            continue
        if kept < keep - 1:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)
            _VERIFIED.pop(path, None)


# ---------------------------------------------------------------------------------------------------------------
# Manifest and verification (docs/run_directories.md §Manifest).

_VERIFIED: dict[str, tuple] = {}  # checkpoint path -> manifest stamp, for checkpoints this process wrote or verified


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_of(path: str) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != MANIFEST and not name.startswith(TMP_PREFIX):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(path: str, step: int) -> str:
    """Hash every file of checkpoint directory ``path`` (as written on disk) into ``path/manifest.json``."""
    files = {}
    for rel in _files_of(path):
        full = os.path.join(path, rel)
        files[rel] = {"sha256": file_sha256(full), "bytes": os.path.getsize(full)}
    return write_json(os.path.join(path, MANIFEST), {"format_version": FORMAT_VERSION, "step": step, "files": files})


def _manifest_stamp(path: str) -> tuple:
    """Size, mtime and inode of every file of the checkpoint: any rewrite since the last verification changes it."""
    out = []
    for rel in (*_files_of(path), MANIFEST):
        st = os.stat(os.path.join(path, rel))
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def read_manifest(path: str) -> dict | None:
    """The manifest of checkpoint ``path``, None when it has none; CheckpointDamaged when it is unreadable."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
        assert isinstance(files, dict) and all("sha256" in v and "bytes" in v for v in files.values())
    except PermissionError as e:
        raise CheckpointError(f"{mpath}: permission denied ({e.strerror}); make it readable") from e
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointDamaged(path, f"{MANIFEST} is not a valid manifest ({type(e).__name__})") from e
    return manifest


def _is_legacy(path: str) -> bool:
    """A checkpoint from a repa_fast older than the manifest: all files there, state.pt format_version 1."""
    if not all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED_FILES):
        return False
    try:
        return torch.load(os.path.join(path, "state.pt"), weights_only=True).get("format_version") == 1
    except Exception:  # unreadable: not a legacy checkpoint we could use
        return False


def verify_checkpoint(path: str, files=None, quiet: bool = False, cached: bool = False) -> str:
    """Check checkpoint directory ``path`` against its manifest (``files``: only those, e.g. the one a reader
    needs); returns "verified", or "legacy" for a pre-manifest checkpoint (warned about unless ``quiet``).
    Raises CheckpointDamaged naming the file (missing, wrong size, wrong SHA-256) or CheckpointError (unreadable
    for lack of permission). ``cached``: trust an earlier full verification by this process of the same manifest
    (rotation only; every read before use hashes again)."""
    manifest = read_manifest(path)
    if manifest is None:
        if _is_legacy(path):
            if not quiet:
                logger.warning("%s has no %s (an older repa_fast): its files cannot be verified", path, MANIFEST)
            return "legacy"
        raise CheckpointDamaged(path, f"no {MANIFEST} (the save did not complete, or the file was removed)")
    listed = manifest["files"]
    missing = [f for f in REQUIRED_FILES if f not in listed]
    if missing:
        raise CheckpointDamaged(path, f"{MANIFEST} does not list {missing}")
    full = files is None
    if full and cached and _VERIFIED.get(path) == _manifest_stamp(path):
        return "verified"
    for rel in listed if full else files:
        if rel not in listed:
            raise CheckpointDamaged(path, f"{rel} is not listed in {MANIFEST}")
        fpath = os.path.join(path, rel)
        if not os.path.isfile(fpath):
            lost = ""
            if rel.startswith("rng/"):
                lost = (
                    "; without it this process's random streams (time steps, noise, label dropout) cannot be "
                    "restored, so the resumed run would not be bitwise identical to an uninterrupted one"
                )
            raise CheckpointDamaged(path, f"{fpath} is missing{lost}")
        try:
            size = os.path.getsize(fpath)
            digest = file_sha256(fpath) if size == listed[rel]["bytes"] else None
        except PermissionError as e:
            raise CheckpointError(f"{fpath}: permission denied ({e.strerror}); make it readable") from e
        if size != listed[rel]["bytes"]:
            raise CheckpointDamaged(path, f"{fpath} has {size} bytes, the manifest says {listed[rel]['bytes']}")
        if digest != listed[rel]["sha256"]:
            raise CheckpointDamaged(path, f"{fpath} does not match its SHA-256 in {MANIFEST} (the file was modified)")
    if full:
        _VERIFIED[path] = _manifest_stamp(path)
    return "verified"


def newest_intact(run_dir: str, below: int | None = None) -> int | None:
    """The newest step (below ``below`` when given) whose checkpoint verifies, or None."""
    for s in reversed(list_checkpoints(run_dir)):
        if below is not None and s >= below:
            continue
        try:
            verify_checkpoint(step_dir(run_dir, s), quiet=True)
            return s
        except CheckpointError:
            continue
    return None


def refuse_damaged(run_dir: str, err: CheckpointDamaged, how: str) -> CheckpointError:
    """The error for a damaged checkpoint: the reason, the newest intact one, and ``how`` (a function of the step
    giving the exact command or option that continues from it)."""
    try:
        bad_step = int(os.path.basename(os.path.normpath(err.path)))
    except ValueError:
        bad_step = None
    good = newest_intact(run_dir, below=bad_step)
    if good is None:
        return CheckpointError(f"{err}; no intact checkpoint is left in {checkpoint_root(run_dir)}")
    return CheckpointError(f"{err}. The newest intact checkpoint is {step_dir(run_dir, good)}: {how(good)}")


def first_nonfinite(tree, prefix: str = "") -> str | None:
    """The key path of the first floating-point tensor in ``tree`` (nested dicts / lists) with a NaN or inf."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def check_finite(path: str, name: str, tree) -> None:
    """A CheckpointError naming the file and the tensor when ``tree`` holds a non-finite value."""
    bad = first_nonfinite(tree)
    if bad is not None:
        raise CheckpointError(
            f"{os.path.join(path, name)}: tensor {bad} holds NaN/inf values; these weights are unusable (the run "
            "diverged before this save, or the file was modified)"
        )


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

    def __init__(
        self, run_dir: str, *, every: int, last_step: int, boundaries=(), keep: int = 0, config=None, data=None
    ):
        self.run_dir, self.every, self.last_step, self.keep = run_dir, every, last_step, keep
        self.boundaries = frozenset(boundaries)
        self.config = config or {}  # the run's flat options, stored in state.pt for --resume's compatibility check
        self.data = data  # the dataset's size and checksum (data.sampler.dataset_fingerprint), checked on --resume

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
                "skipped_total": getattr(state, "skipped_total", 0),
                "data": self.data,
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
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: permission denied; make it readable") from e
    except Exception as e:  # truncated or corrupt file (torch's advice to unpickle it unsafely is not repeated)
        reason = str(e).split("\n")[0].split(" Re-running `torch.load`")[0][:300]
        raise CheckpointError(
            f"cannot read checkpoint file {path}: {type(e).__name__}: {reason}. The file is truncated or corrupt; "
            "resume from an earlier step (--resume-step) or delete this checkpoint."
        ) from e


def load_tensors(path: str) -> dict:
    """A safetensors file's tensors, or a CheckpointError naming the file (missing, truncated or corrupt)."""
    return _load_file(path, load_file)


def read_checkpoint(path: str, rank: int | None = None) -> dict:
    """Load a checkpoint directory: verified against its manifest first (CheckpointDamaged), weights via safetensors,
    the rest with weights_only=True; non-finite weights, EMA or optimizer state are refused naming file and tensor.
    With ``rank``, that process's RNG file must be there when the checkpoint had that many processes."""
    kind = verify_checkpoint(path)
    out = {
        "model": _load_file(os.path.join(path, "model.safetensors"), load_file),
        "ema": _load_file(os.path.join(path, "ema.safetensors"), load_file),
        "state": _load_file(os.path.join(path, "state.pt"), lambda p: torch.load(p, weights_only=True)),
    }
    if out["state"].get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}/state.pt has format_version {out['state'].get('format_version')}, "
            f"this repa_fast reads {list(READABLE_VERSIONS)}"
        )
    check_finite(path, "model.safetensors", out["model"])
    check_finite(path, "ema.safetensors", out["ema"])
    check_finite(path, "state.pt", {"optimizer": out["state"].get("optimizer"), "scaler": out["state"].get("scaler")})
    rng_path = os.path.join(path, "rng", f"rank{rank}.pt")
    if rank is not None and os.path.isfile(rng_path):
        out["rng"] = _load_file(rng_path, lambda p: torch.load(p, weights_only=True))
    elif kind == "verified" and rank is not None and rank < int(out["state"].get("world_size", 1)):
        raise CheckpointDamaged(  # listed files are verified above; this one was never written
            path,
            f"rng/rank{rank}.pt is missing; without it this process's random streams cannot be restored, so the "
            "resumed run would not be bitwise identical to an uninterrupted one",
        )
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


def resume_hint(resume_command: str):
    """``step -> text``: the exact command that resumes from ``step`` (``resume_command`` continues with --resume)."""

    def how(step: int) -> str:
        if resume_command.endswith(" --resume"):
            return f"continue from it with: {resume_command.removesuffix(' --resume')} --resume-step {step}"
        return f"continue from it with {resume_command.replace('--resume', f'--resume-step {step}')}"

    return how


def check_compatible(path: str, saved_config: dict, config: dict) -> list[str]:
    """Refuse to continue a run whose refused options (engine/resume_policy.py: the weight-defining ones, config
    field metadata ``weights``, and the objective, recipe, data and seed) differ; returns the applied options that
    differ (they take effect on the restored state)."""
    from repa_fast.engine.resume_policy import check_resume_options

    return check_resume_options(path, saved_config, config)


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
    if step:
        return step_dir(path, step)
    complete = [s for s in steps if _complete(step_dir(path, s))]  # a reader never picks a save in progress
    return step_dir(path, (complete or steps)[-1])


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST)) or _is_legacy(path)


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
    name = f"{which}.safetensors"
    try:
        verify_checkpoint(ckpt, files=[name])
    except CheckpointDamaged as e:
        loose = not _STEP_DIR.match(os.path.basename(os.path.normpath(ckpt))) and read_manifest(ckpt) is None
        if not loose:
            raise _damaged_for_reader(ckpt, e) from e
        logger.warning("%s: weights outside a run's checkpoints/<step>/ without a manifest: not verified", ckpt)
    weights = load_tensors(os.path.join(ckpt, name))
    check_finite(ckpt, name, weights)
    return _own_run(path, ckpt, weights)


def _damaged_for_reader(ckpt: str, e: CheckpointDamaged) -> CheckpointError:
    run_root = os.path.normpath(os.path.join(ckpt, "..", ".."))
    return refuse_damaged(run_root, e, lambda s: f"pass {step_dir(run_root, s)} instead")


def _own_run(path: str, ckpt: str, weights: dict) -> Run:
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
