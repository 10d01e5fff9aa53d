"""Checkpoints users already have: the reference REPA train.py's, REPA's released ``last.pt`` and ERW's, read safely.

Layouts (README §Checkpoints you already have):
    reference train.py   ``{"model", "ema", "opt", "args": argparse.Namespace, "steps"}``     (REPA train.py:328-339)
    REPA release         a bare SiT state dict, or ``{"ema": ...}`` as generate.py reads it     (REPA generate.py:78)
    ERW train.py         the reference's keys; warm-up files hold only blocks < l2r-depth, the embedders and
                         the projectors (no final layer), whatever their name          (LINs-lab/ERW train.py:228-244)
Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with ``argparse.Namespace`` as the only
admitted class. Anything else pickled in the file is refused before any of it runs.
The reference's AdamW state is keyed by parameter index (over ``model.parameters()``, frozen ``pos_embed``
included; ERW filters to trainable ones): it is mapped back to names through the file's own key order.
"""

import argparse
import logging
import os
import pickle
import re

import torch

from repa_fast.engine.checkpoint import CheckpointError, list_checkpoints, resolve_resume, step_dir

logger = logging.getLogger("repa_fast")

# Non-persistent in our SiT, persistent in ERW's RoPE module (LightningDiT models/pos_embed.py): rebuilt, never read.
_ROPE_TABLE = re.compile(r"(^|\.)(freqs_cos|freqs_sin|rope_cos|rope_sin)$")


def load_pickle_safely(path: str):
    """``torch.load`` of a .pt file with no class admitted but argparse.Namespace; a refusal is a CheckpointError."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it pickles objects other than tensors, containers and argparse.Namespace "
            f"({first}). Nothing in it was run. If you trust the file, re-save its state dicts with plain "
            "torch.save({'model': ..., 'ema': ...}) and pass that file."
        ) from e


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def is_warmup_state(sd: dict) -> bool:
    """ERW warm-up weights: SiT blocks and projectors but no final layer (ERW models/sit.py:301-307)."""
    return any(k.startswith("blocks.") for k in sd) and not any(k.startswith("final_layer.") for k in sd)


def read_foreign(path: str) -> dict:
    """A reference/ERW/REPA .pt file as {"kind", "model", "ema", "opt", "args", "step"} (missing parts are None).

    kind: "reference" (train.py layout), "erw-warmup" (its weights have no final layer), "state-dict" (bare).
    """
    obj = load_pickle_safely(path)
    if is_state_dict(obj):
        out = {"model": None, "ema": obj, "opt": None, "args": {}, "step": None}
    elif isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        args = obj.get("args")
        out = {
            "model": obj.get("model"),
            "ema": obj.get("ema"),
            "opt": obj.get("opt"),
            "args": vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}),
            "step": int(obj["steps"]) if "steps" in obj else None,
        }
    else:
        kinds = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: not a SiT checkpoint (expected a state dict or the keys 'model'/'ema'/'opt'/'args', got {kinds})"
        )
    weights = out["model"] if out["model"] is not None else out["ema"]
    out["kind"] = (
        "erw-warmup" if is_warmup_state(weights) else ("reference" if out["model"] is not None else "state-dict")
    )
    return out


def clean_state_dict(sd: dict) -> tuple[dict, list[str]]:
    """Drop a DDP ``module.`` prefix and RoPE tables (rebuilt from the configuration); returns (sd, dropped keys)."""
    out, dropped = {}, []
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if _ROPE_TABLE.search(k):
            dropped.append(k)
            continue
        out[k] = v
    return out, dropped


def legacy_remap(sd: dict, encoder_depth: int) -> dict:
    """The reference's ``--legacy``: ``decoder_blocks.i.*`` -> ``blocks.(i + encoder_depth).*``.

    As REPA's ``load_legacy_checkpoints`` (utils.py:203-215), used by its generate.py.
    """
    if not any(k.startswith("decoder_blocks.") for k in sd):
        raise CheckpointError(
            "--legacy remaps decoder_blocks.* keys, but this checkpoint has none: it is in the current layout; "
            "drop --legacy"
        )
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder_blocks."):
            _, idx, rest = k.split(".", 2)
            k = f"blocks.{int(idx) + encoder_depth}.{rest}"
        out[k] = v
    return out


def arch_from_keys(sd: dict) -> dict:
    """What a SiT state dict's keys and shapes tell: projector widths, depth, qk-norm, channels, classes, tokens."""
    z_dims = []
    while f"projectors.{len(z_dims)}.4.weight" in sd:
        z_dims.append(sd[f"projectors.{len(z_dims)}.4.weight"].shape[0])
    return {
        "z_dims": z_dims,
        "projector_dim": sd["projectors.0.0.weight"].shape[0] if z_dims else 2048,
        "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
        "in_channels": sd["x_embedder.proj.weight"].shape[1],
        "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "num_patches": sd["pos_embed"].shape[1],
        "hidden_size": sd["pos_embed"].shape[2],
    }


def complete_warmup(sd: dict, model: torch.nn.Module) -> tuple[dict, list[str]]:
    """ERW warm-up weights completed with ``model``'s own (fresh) tensors for what the warm-up model lacks."""
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise CheckpointError(f"warm-up checkpoint has keys this model lacks: {unknown[:4]}; check --model/--l2r-depth")
    filled = [k for k in own if k not in sd]
    return {**{k: v for k, v in own.items() if k in filled}, **sd}, filled


def weights_for(path: str, model: torch.nn.Module, which: str = "model", f: dict | None = None) -> dict:
    """A full state dict for ``model`` from a foreign .pt file (``which`` = model or ema weights), strictly checked.

    ``f`` is the file as ``read_foreign`` returned it (read here when not given).
    """
    f = f if f is not None else read_foreign(path)
    sd = f[which] if f[which] is not None else (f["ema"] if f["ema"] is not None else f["model"])
    sd, dropped = clean_state_dict(sd)
    if dropped:
        logger.info("%s: RoPE tables %s are rebuilt from the configuration, not read", path, dropped[:2])
    if f["kind"] == "erw-warmup":
        sd, filled = complete_warmup(sd, model)
        logger.info(
            "%s is an ERW warm-up checkpoint: %d tensors (later blocks, final layer) keep their init", path, len(filled)
        )
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        hint = (
            " (old decoder_blocks.* layout: REPA's --legacy)"
            if any(k.startswith("decoder_blocks.") for k in sd)
            else ""
        )
        raise CheckpointError(
            f"{path} does not fit this model{hint}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape mismatch {bad[:3]}; check --model, --enc-type, --encoder-depth, --qk-norm, --projector-dim"
        )
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
        opt, skipped = map_optimizer(f["opt"], list(raw), model)
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


def init_weights(path: str, model: torch.nn.Module) -> dict:
    """``--init-from``: the raw (non-EMA) weights of a repa_fast run/checkpoint directory or a foreign .pt file."""
    if os.path.isdir(path):
        from safetensors.torch import load_file

        from repa_fast.export import find_checkpoint_dir

        sd = load_file(os.path.join(find_checkpoint_dir(path), "model.safetensors"))
        own = model.state_dict()
        if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in sd):
            raise CheckpointError(
                f"--init-from {path}: its weights do not fit this model; check --model and the encoders"
            )
        return sd
    if not os.path.isfile(path):
        raise CheckpointError(f"--init-from {path}: no such file or directory")
    return weights_for(path, model, "model")
