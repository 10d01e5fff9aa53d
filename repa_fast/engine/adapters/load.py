"""``repa_fast.load_weights``: the one public loader of SiT weights, for every format the adapters read.

    model = repa_fast.load_weights(path, model, which="ema")

``path``: a repa_fast run directory (its latest checkpoint), a checkpoint directory or its ``ema`` / ``model``
.safetensors file; or a .pt file of REPA's, ERW's, REG's or iREPA's train.py (``{"model", "ema", "opt", "args",
"steps"}``, the pickled argparse Namespace read safely, ``base.load_pickle_safely``), REPA's released ``last.pt`` or an
exported ``{"ema": ...}`` file. Each foreign format's keys are mapped by its adapter (this package); the weights are
then loaded with ``strict=True`` into ``model``, which is returned. A file that does not fit raises CheckpointError
naming the keys (missing, unexpected, shape mismatch), and the projector when a projector's shape differs (e.g. an
iREPA conv kernel size other than the model's, docs/methods.md §iREPA).
"""

import logging

import torch

from repa_fast.errors import CheckpointError

logger = logging.getLogger("repa_fast")

WHICH = ("ema", "model")


def check_fits(path: str, sd: dict, model: torch.nn.Module) -> None:
    """A CheckpointError naming the keys of ``sd`` that do not fit ``model`` (strict: same keys, same shapes)."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or bad):
        return
    projector = [k for k in bad if k.startswith("projectors.")]
    if projector:
        k = projector[0]
        raise CheckpointError(
            f"{path}: projector {k.split('.')[1]} ({k}) has shape {tuple(sd[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model: build it with the file's projector (--projection-layer-type, "
            "--proj-kwargs-kernel-size as the file's args; iREPA's train.py defaults the kernel size to 1) or "
            "--projector-dim / --enc-type of the file"
        )
    hint = " (old decoder_blocks.* layout: REPA's --legacy)" if any(k.startswith("decoder_blocks.") for k in sd) else ""
    reg = "cls_projectors2.weight"
    if (reg in sd) != (reg in own):
        hint += " (REG class-token weights in one of them only: build the model with reg=True exactly for REG files)"
    raise CheckpointError(
        f"{path} does not fit this model{hint}: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, "
        f"shape mismatch {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:3]]}; check --model, "
        "--enc-type, --encoder-depth, --qk-norm, --projector-dim, --reg, --projection-layer-type"
    )


def load_weights(path: str, model: torch.nn.Module, which: str = "ema") -> torch.nn.Module:
    """Load the ``which`` ("ema" or "model") weights of ``path`` strictly into ``model``; returns ``model``."""
    from repa_fast.engine.checkpoint import load_run

    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    run = load_run(path, which=which)
    if run.format == "erw-warmup":
        raise CheckpointError(
            f"{path} is an ERW warm-up checkpoint (blocks 1..l2r-depth, embedders and projectors; no final layer): "
            "it does not load strictly into a SiT; train the full phase from it (train.py --init-from, or "
            "--resume-step N --warmup-steps N)"
        )
    sd = run.weights
    if run.dropped:
        logger.info("%s: RoPE tables %s are rebuilt by the model, not read", path, run.dropped[:2])
    check_fits(path, sd, model)
    model.load_state_dict(sd, strict=True)
    return model
