"""Whether a state dict fits a built SiT, strictly: the one check of ``repa_fast.load_weights`` (engine/weights.py),
generate's builder and training's ``--init-from`` / ``--resume-step`` (engine/compat.py).
"""

import torch

from repa_fast.errors import CheckpointError


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
