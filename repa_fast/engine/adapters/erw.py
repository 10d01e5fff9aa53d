"""ERW's files (LINs-lab/ERW): the reference's container with ERW's flags, and the warm-up checkpoints.

    ERW train.py     the reference's keys (``model``, ``ema``, ``opt``, ``args``, ``steps``) and ERW's flags
                     ``--warmup-steps``, ``--l2r-depth``, ``--use_rope``                 (ERW train.py:47-84, 243-256)
    ERW warm-up      the same container (or a bare state dict) holding only blocks < l2r-depth, the embedders and
                     the projectors, no final layer, whatever the file's name    (ERW models/sit.py:301-307; the
                     released 100K file ``0100000.pt``)
ERW's RoPE module keeps its cos/sin tables as persistent buffers; our SiT rebuilds them, so they are dropped
(``StateDictAdapter.to_ours``). A warm-up file is completed with the model's own initial weights for what it lacks
(``complete_warmup``), as ERW's full phase loads it with ``strict=False`` (ERW train.py:637).
"""

import torch

from repa_fast.errors import CheckpointError

from .base import StateDictAdapter, is_train_layout, main_weights, saved_args
from .repa import REPA_ARCH_KEYS

ERW_FLAGS = ("warmup_steps", "l2r_depth", "use_rope")  # ERW train.py:47, 84, 54; none of them is REPA's


def is_warmup_state(sd: dict) -> bool:
    """ERW warm-up weights: SiT blocks and projectors but no final layer (ERW models/sit.py:301-307)."""
    return any(k.startswith("blocks.") for k in sd) and not any(k.startswith("final_layer.") for k in sd)


class ERWWarmup(StateDictAdapter):
    """An ERW warm-up checkpoint, recognised by its keys (no final layer), in the train layout or bare."""

    name = "erw-warmup"
    layout = "LINs-lab/ERW train.py:243-256, models/sit.py:301-307"
    config_keys = REPA_ARCH_KEYS + ERW_FLAGS

    def detect(self, obj) -> bool:
        weights = main_weights(obj)
        return weights is not None and is_warmup_state(weights)


class ERWTrain(StateDictAdapter):
    """A full-phase ERW train.py checkpoint: the reference's container, told apart by ERW's saved flags."""

    name = "erw"
    layout = "LINs-lab/ERW train.py:243-256"
    config_keys = REPA_ARCH_KEYS + ERW_FLAGS

    def detect(self, obj) -> bool:
        return is_train_layout(obj) and bool(set(ERW_FLAGS) & set(saved_args(obj)))


def complete_warmup(sd: dict, model: torch.nn.Module) -> tuple[dict, list[str]]:
    """ERW warm-up weights completed with ``model``'s own (fresh) tensors for what the warm-up model lacks."""
    own = model.state_dict()
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise CheckpointError(f"warm-up checkpoint has keys this model lacks: {unknown[:4]}; check --model/--l2r-depth")
    filled = [k for k in own if k not in sd]
    return {**{k: v for k, v in own.items() if k in filled}, **sd}, filled
