"""The MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoders from their weight files: a file's tensors, in timm's
names (``weight_files.to_timm_layout``), checked against and loaded into ``vit_encoders.TimmViTEncoder``.

Where the files are looked for and which layouts are accepted: ``weight_files.py``. ``encoders.build_encoder``
(the dispatch by ``--enc-type`` name) freezes what ``build_vit_encoder`` returns.
"""

from __future__ import annotations

import logging
import os

import torch

from .vit_encoders import SPECS, TimmViTEncoder, check_resolution
from .weight_files import find_vit_file, read_weight_file, to_timm_layout

logger = logging.getLogger("repa_fast.models.vit_encoder_files")


def check_state_dict(model: TimmViTEncoder, sd: dict[str, torch.Tensor], where: str) -> None:
    """ValueError naming the keys and shapes that disagree (another architecture or size)."""
    own = model.vit.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        spec = model.spec
        raise ValueError(
            f"{where} does not hold {spec.name} weights ({spec.timm_model}: depth {spec.depth}, width "
            f"{spec.embed_dim}, patch {spec.patch_size}); another architecture or size? "
            f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''} ({len(unexpected)}), "
            f"shape mismatches {shapes[:4]}{'...' if len(shapes) > 4 else ''} ({len(shapes)})"
        )


def load_vit_encoder_weights(model: TimmViTEncoder, source: str | os.PathLike | dict) -> TimmViTEncoder:
    where = "state dict" if isinstance(source, dict) else str(source)
    sd = to_timm_layout(model.spec, source if isinstance(source, dict) else read_weight_file(source))
    check_state_dict(model, sd, where)
    model.vit.load_state_dict(sd, strict=True)  # copies (and upcasts CLIP's fp16) into the fp32 parameters
    return model


def build_vit_encoder(
    name: str,
    resolution: int = 256,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    grid: int | None = None,
    pretrained: bool = True,
    attn_backend: str = "auto",
    device: torch.device | str | None = None,
) -> TimmViTEncoder:
    """One MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoder by ``--enc-type`` name (not yet frozen:
    ``encoders.build_encoder`` freezes it)."""
    spec = SPECS[name]
    kw = dict(grid=grid, attn_backend=attn_backend, enc_name=name)
    if not pretrained:
        model = TimmViTEncoder(spec, resolution, **kw)
        return model.to(device) if device is not None else model
    check_resolution(spec, resolution, grid)  # before any file is searched for
    path = find_vit_file(spec, checkpoint_dir)  # fail before building a large model
    with torch.device("meta"):  # no random init of a 632M-parameter ViT-H; weights land on `device` directly
        model = TimmViTEncoder(spec, resolution, **kw)
    model = model.to_empty(device=device if device is not None else "cpu")
    logger.info("encoder %s: loading %s", name, path)
    return load_vit_encoder_weights(model, path)
