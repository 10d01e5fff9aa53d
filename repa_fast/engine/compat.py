"""Training from checkpoints users already have: ``--resume-step N`` on the reference's / ERW's files, ``--init-from``.

Which files exist and how each format's keys map to ours: ``repa_fast.engine.adapters`` (one adapter per format,
its detection beside it); this module is what the trainer does with them.
Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with the reference's pickled argument
namespace as the only admitted class (``adapters.base.SavedArgs``). The reference's AdamW state is keyed by parameter
index (over ``model.parameters()``, frozen ``pos_embed`` included; ERW filters to trainable ones): it is mapped back
to names through the file's own key order. Where these formats are documented: docs/compatibility.md
§Checkpoints you already have.
"""

import glob
import logging
import os

import torch

from repa_fast.engine import adapters
from repa_fast.engine.adapters import (  # noqa: F401 (the names this module has always offered)
    arch_from_keys,
    complete_warmup,
    is_state_dict,
    is_warmup_state,
    legacy_remap,
    load_pickle_safely,
)
from repa_fast.engine.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_run,
    resolve_resume,
    step_dir,
)

logger = logging.getLogger("repa_fast")


def read_foreign(path: str) -> dict:
    """A reference/ERW/REPA .pt file as {"kind", "model", "ema", "opt", "args", "step", "adapter"} (missing parts
    None); kind: the adapter's name ("reference", "erw", "erw-warmup", "state-dict")."""
    return adapters.read_foreign(path).as_dict()


def clean_state_dict(sd: dict, adapter: adapters.StateDictAdapter | None = None) -> tuple[dict, list[str]]:
    """``adapter``'s key mapping (default: the reference's: drop a DDP ``module.`` prefix and RoPE tables, rebuilt
    from the configuration); returns (sd, dropped keys)."""
    return (adapter or adapters.REPATrain()).to_ours(sd)


def weights_for(path: str, model: torch.nn.Module, which: str = "model", f: dict | None = None) -> dict:
    """A full state dict for ``model`` from a foreign .pt file (``which`` = model or ema weights), strictly checked.

    ``f`` is the file as ``read_foreign`` returned it (read here when not given).
    """
    f = f if f is not None else read_foreign(path)
    sd = f[which] if f[which] is not None else (f["ema"] if f["ema"] is not None else f["model"])
    sd, dropped = clean_state_dict(sd, f.get("adapter"))
    if dropped:
        logger.info("%s: RoPE tables %s are rebuilt from the configuration, not read", path, dropped[:2])
    if f["kind"] == "erw-warmup":
        sd, filled = complete_warmup(sd, model)
        logger.info(
            "%s is an ERW warm-up checkpoint: %d tensors (later blocks, final layer) keep their init", path, len(filled)
        )
    adapters.check_fits(path, sd, model)  # strict: the keys that do not fit are named (repa_fast.load_weights's)
    return sd


def map_optimizer(opt: dict, key_order: list[str], model: torch.nn.Module) -> tuple[dict, list[str]]:
    """The reference's index-keyed AdamW state as ours (keyed by parameter name); returns (state, not restored).

    Indices run over the reference model's ``parameters()`` in registration order, which is the file's state-dict
    key order: all of them (REPA, frozen pos_embed included) or the trainable ones only (ERW's filter).
    """
    params = dict(model.named_parameters())
    order = [k for k in key_order if k in params]
    saved = opt.get("state", {})
    ids = [i for g in opt.get("param_groups", []) for i in g.get("params", [])]
    for names in (order, [k for k in order if k != "pos_embed"]):
        if len(ids) == len(names):
            break
    else:
        return {"state": {}, "param_groups": []}, [f"optimizer state ({len(ids)} entries for {len(order)} parameters)"]
    state, skipped = {}, []
    for i, name in zip(ids, names):
        if i not in saved:
            continue
        if not params[name].requires_grad:
            skipped.append(f"optimizer state of frozen {name}")
            continue
        state[name] = {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in saved[i].items()}
    # Hyper-parameters come from this run's flags (param_groups left empty): the reference's groups carry
    # implementation switches (fused/foreach) that must not override ours.
    return {"state": state, "param_groups": []}, skipped


def find_foreign_resume(run_dir: str, step: int) -> str | None:
    """``checkpoints/<N:07d>.pt`` (reference, ERW full phase), then ERW's warm-up files of that step."""
    root = os.path.join(run_dir, "checkpoints")
    for name in (f"{step:07d}.pt", f"warmup_{step:07d}.pt"):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    # ERW's warm-up files under any other name (warmup_final.pt, a renamed release), recognised by their keys and
    # saved step; read only when no name matched.
    others = sorted(n for n in os.listdir(root) if n.endswith(".pt")) if os.path.isdir(root) else []
    for name in sorted(others, key=lambda n: n != "warmup_final.pt"):
        f = read_foreign(os.path.join(root, name))
        if f["kind"] == "erw-warmup" and f["step"] == step:
            return os.path.join(root, name)
    return None


def resolve_any_resume(run_dir: str, resume: bool, resume_step: int) -> tuple[str | None, bool]:
    """(path, foreign): our checkpoints/<N:07d>/ first, then the reference's and ERW's files for ``--resume-step``."""
    if resume_step and not os.path.isdir(step_dir(run_dir, resume_step)):
        path = find_foreign_resume(run_dir, resume_step)
        if path is None:
            raise CheckpointError(
                f"--resume-step {resume_step}: neither {step_dir(run_dir, resume_step)} nor a reference/ERW file "
                f"({resume_step:07d}.pt, warmup_{resume_step:07d}.pt, warmup_final.pt) is in "
                f"{os.path.join(run_dir, 'checkpoints')}; available steps: {list_checkpoints(run_dir) or 'none'}"
            )
        return path, True
    return resolve_resume(run_dir, resume, resume_step), False


def read_as_saved(path: str, model: torch.nn.Module, step: int, phase_of) -> dict:
    """A foreign file in ``checkpoint.read_checkpoint``'s shape, for the trainer's resume path.

    ``phase_of(step)`` names the recipe's phase at a step; an ERW warm-up file is tagged "warmup", so resuming it at
    the end of the warm-up starts the full phase from its weights (ERW README: --resume-step 100000).
    """
    f = read_foreign(path)
    step = f["step"] if f["step"] is not None else step
    model_sd = weights_for(path, model, "model", f)
    ema_sd = weights_for(path, model, "ema", f)
    lost = ["data position", "RNG streams"]  # the reference never saved them
    opt = {"state": {}, "param_groups": []}
    if f["opt"] is not None:
        raw = f["model"] if f["model"] is not None else f["ema"]
        key_order = list(clean_state_dict(raw, f["adapter"])[0])  # our names, in the file's order
        opt, skipped = map_optimizer(f["opt"], key_order, model)
        lost += skipped
    else:
        lost.append("optimizer state (none in the file)")
    phase = "warmup" if f["kind"] == "erw-warmup" else phase_of(step)
    logger.warning("resuming the %s file %s at step %d; not restored: %s", f["kind"], path, step, ", ".join(lost))
    state = {"step": step, "optimizer": opt, "config": _arch_args(f["args"]), "phase": phase, "foreign": lost}
    return {"model": model_sd, "ema": ema_sd, "state": state}


def _arch_args(args: dict) -> dict:
    """The reference/ERW args that name architecture options of ours (checked against this run's)."""
    keys = ("model", "enc_type", "qk_norm", "use_rope", "num_classes", "resolution")
    return {k: args[k] for k in keys if k in args}


def init_ema_weights(path: str, model: torch.nn.Module, choice: str = "file-ema") -> tuple[dict | None, str]:
    """``--init-from``'s EMA: (the file's EMA state dict, "the file's EMA") when it has one and ``choice`` is
    file-ema (REPA's train.py keeps an EMA beside the weights), else (None, why) and the EMA starts from the weights.
    Raw weights and EMA come from one file; both are strictly checked against ``model``."""
    if choice == "weights":
        return None, "--init-ema-from weights"
    if os.path.isdir(path):
        try:
            sd = load_run(path, which="ema").weights
        except CheckpointError:
            if glob.glob(os.path.join(glob.escape(path), "**", "ema.safetensors"), recursive=True):
                raise  # an EMA file that does not load (damaged, unverified) is refused, never replaced in silence
            return None, f"{path} has no EMA weights"
        own = model.state_dict()
        if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in sd):
            raise CheckpointError(
                f"--init-from {path}: its EMA does not fit this model; check --model and the encoders"
            )
        return sd, "the file's EMA"
    f = read_foreign(path)
    if f["ema"] is None or f["model"] is None:  # one set of weights only: the EMA starts from it
        return None, f"{path} holds one set of weights only"
    return weights_for(path, model, "ema", f), "the file's EMA"


def init_weights(path: str, model: torch.nn.Module) -> dict:
    """``--init-from``: the raw (non-EMA) weights of a repa_fast run/checkpoint directory or a foreign .pt file."""
    if os.path.isdir(path):
        sd = load_run(path, which="model").weights
        adapters.check_fits(f"--init-from {path}", sd, model)
        return sd
    if not os.path.isfile(path):
        raise CheckpointError(f"--init-from {path}: no such file or directory")
    return weights_for(path, model, "model")
