"""``repa_fast.load_weights``: the one public loader of SiT weights, for every format the adapters read.

    model = repa_fast.load_weights(path, model, which="ema")

``path``: a repa_fast run directory (its latest checkpoint), a checkpoint directory or its ``ema`` / ``model``
.safetensors file; or a .pt file of REPA's, ERW's, REG's or iREPA's train.py (``{"model", "ema", "opt", "args",
"steps"}``, the pickled flag Namespace read safely, ``adapters.base.load_pickle_safely``), REPA's released
``last.pt`` or an exported ``{"ema": ...}`` file. Each foreign format's keys are mapped by its adapter
(``repa_fast.engine.adapters``, found by ``checkpoint.load_run``); the weights are then loaded with ``strict=True`` into
``model``, which is returned. A file that does not fit raises CheckpointError naming the keys (missing, unexpected,
shape mismatch), and the projector when a projector's shape differs (e.g. an iREPA conv kernel size other than the
model's, docs/methods.md §iREPA).
"""

import logging

import torch

from repa_fast.engine.adapters import check_fits
from repa_fast.engine.checkpoint import WHICH, load_run
from repa_fast.errors import CheckpointError

logger = logging.getLogger("repa_fast")


def load_weights(path: str, model: torch.nn.Module, which: str = "ema") -> torch.nn.Module:
    """Load the ``which`` ("ema" or "model") weights of ``path`` strictly into ``model``; returns ``model``."""
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
