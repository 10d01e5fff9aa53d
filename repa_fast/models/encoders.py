"""REPA target encoders: names, ``build_encoder`` / ``load_encoders`` (docs/objective.md §Alignment targets; reference
utils.py:52-160). Their shapes are rows of ``encoder_archs.ENCODER_ARCHS``.

Names mirror the reference ``--enc-type`` strings (``type-arch-config``, comma-separated for several encoders):
``dinov2-vit-{s,b,l,g}`` and ``dinov2reg-vit-{s,b,l,g}`` (4 registers). ``dinov2-vit-t`` / ``dinov2reg-vit-t`` is
a toy DINOv2-architecture encoder (D 192, depth 4, 3 heads, patch 14) for the embedded demo and tests: no
official weights exist for it, so it only works with ``pretrained=False``. The other reference encoders
(``mocov3-vit-{s,b,l}``, ``mae-vit-l``, ``jepa-vit-h``, ``clip-vit-L``, ``dinov1-vit-b``) are built on timm by
``vit_encoders.py`` / ``vit_encoder_files.py``; ``build_encoder`` dispatches on ``VIT_SPECS``.

Where the weight files are looked for, which layouts are read and how (hub, timm, TorchScript, safetensors):
``weight_files.py``, which imports no builder. Every encoder built here is frozen (``freeze``): targets are constants.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .dinov2 import ARCHS, DINOv2ViT, dinov2_arch, resample_pos_embed
from .vit_encoders import SPECS as VIT_SPECS
from .vit_encoders import check_resolution
from .weight_files import find_dinov2_file, find_vit_file, read_state_dict, to_hub_layout

logger = logging.getLogger("repa_fast.models.encoders")

TOY_SIZES = ("t",)  # random-init only
DEMO_ENCODERS = ("digits-ssl",)  # the embedded demo's self-supervised digits CNN (models/digits_encoder.py)
# Reference families we do not implement (reference utils.py load_encoders raises NotImplementedError too).
UNSUPPORTED = {"mocov3-resnet": "MoCo v3 ResNet targets are not implemented (nor in the reference)"}
FAMILIES = {"dinov2": False, "dinov2reg": True}  # type -> has registers


def valid_encoder_names() -> list[str]:
    return [f"{fam}-vit-{size}" for fam in FAMILIES for size in ARCHS] + list(VIT_SPECS)


def parse_encoder_name(name: str) -> tuple[str, bool]:
    """``"dinov2reg-vit-b"`` -> ("b", True); a timm-based encoder -> (its name, False) (the key of
    ``repa_fast.flops.encoder_forward_flops``). Clear errors for unsupported families and unknown names."""
    parts = name.strip().split("-")
    if name.strip() in VIT_SPECS:  # timm-based encoder (vit_encoders.py): its full name, no registers
        return name.strip(), False
    if name.strip() in DEMO_ENCODERS:
        return name.strip(), False
    if len(parts) == 3 and "-".join(parts[:2]) in UNSUPPORTED:
        raise NotImplementedError(
            f"encoder {name!r}: {UNSUPPORTED['-'.join(parts[:2])]}; implemented: {', '.join(valid_encoder_names())}"
        )
    if len(parts) != 3 or parts[0] not in FAMILIES or parts[1] != "vit" or parts[2] not in ARCHS:
        raise ValueError(
            f"unknown encoder {name!r}; valid --enc-type names (comma-separate several): "
            f'{", ".join(valid_encoder_names())} ("-t" is a random-init toy)'
        )
    return parts[2], FAMILIES[parts[0]]


def find_checkpoint(name: str, checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """Path of the weight file for encoder ``name`` (``weight_files``: where each encoder's files are looked for);
    FileNotFoundError naming the file, the places searched and where to download it."""
    if name.strip() in VIT_SPECS:
        return find_vit_file(VIT_SPECS[name.strip()], checkpoint_dir)
    size, registers = parse_encoder_name(name)
    if size in TOY_SIZES:
        raise ValueError(f"encoder {name!r} is a random-init toy: no official weights exist; use pretrained=False")
    return find_dinov2_file(name, size, registers, checkpoint_dir)


def load_dinov2_weights(model: DINOv2ViT, source: str | os.PathLike | dict) -> DINOv2ViT:
    """Load a hub/timm state dict (or file) into ``model``, resampling ``pos_embed`` once to ``model.grid``."""
    where = "state dict" if isinstance(source, dict) else str(source)
    sd = to_hub_layout(source if isinstance(source, dict) else read_state_dict(source), model)
    if "pos_embed" in sd:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.grid, num_prefix_tokens=1)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match {model.enc_name or 'the DINOv2 model'} "
            f"({'with' if model.num_register_tokens else 'without'} registers, depth {model.arch.depth}): "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    bad = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{where}: shapes do not match {model.enc_name or 'the model'} (another size?): {bad[:4]}")
    model.load_state_dict(sd, strict=True)
    return model


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Targets are constants: eval mode (no dropout exists anyway) and no parameter takes gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def build_encoder(
    name: str,
    resolution: int = 256,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    grid: int | None = None,
    pretrained: bool = True,
    attn_backend: str = "auto",
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """One frozen target encoder by ``--enc-type`` name (see ``load_encoders``)."""
    if name.strip() in VIT_SPECS:
        from .vit_encoder_files import build_vit_encoder  # lazy: the base module never imports implementations

        kw = dict(grid=grid, pretrained=pretrained, attn_backend=attn_backend, device=device)
        return freeze(build_vit_encoder(name.strip(), resolution, checkpoint_dir, **kw))
    if name.strip() in DEMO_ENCODERS:
        from .digits_encoder import build_digits_encoder  # lazy: the base module never imports implementations

        kw = dict(grid=grid, pretrained=pretrained, device=device)
        return freeze(build_digits_encoder(name.strip(), resolution, checkpoint_dir, **kw))
    size, registers = parse_encoder_name(name)
    if pretrained and size in TOY_SIZES:
        raise ValueError(f"encoder {name!r} is a random-init toy: no official weights exist; use pretrained=False")
    path = find_checkpoint(name, checkpoint_dir) if pretrained else None  # fail before building a large model
    arch = dinov2_arch(size, registers)
    kw = dict(attn_backend=attn_backend, enc_name=name)
    if path is None:
        model = DINOv2ViT(arch, resolution, grid, **kw)
        return freeze(model.to(device) if device is not None else model)
    # Pretrained: build on the meta device and allocate on the target device, so that no random init runs
    # (seconds for ViT-g on CPU) and the weights are copied straight to where they will be used.
    with torch.device("meta"):
        model = DINOv2ViT(arch, resolution, grid, **kw)
    model = model.to_empty(device=device if device is not None else "cpu")
    logger.info("encoder %s: loading %s (pos_embed resampled to %dx%d)", name, path, model.grid, model.grid)
    return freeze(load_dinov2_weights(model, path))


def load_encoders(
    enc_type: str,
    resolution: int = 256,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    grid: int | None = None,
    pretrained: bool = True,
    attn_backend: str = "auto",
    device: torch.device | str | None = None,
) -> list[torch.nn.Module]:
    """Frozen target encoders for a comma-separated ``--enc-type`` string, e.g. "dinov2-vit-b,dinov2reg-vit-l".

    Each returned module maps uint8 images (B, 3, R, R), R = ``resolution``, to targets (B, grid*grid, D) with
    D = ``module.embed_dim``; grid defaults to R // 16. ``pretrained=False`` gives DINOv2-style random weights.
    ``attn_backend`` picks the encoders' attention (``repa_fast.kernels.attention.BACKENDS``).
    Unlike the reference (which returns (encoders, types, architectures)), this returns the list of modules;
    ``module.enc_name`` holds each name.
    """
    names = [n.strip() for n in enc_type.split(",")]
    if not enc_type.strip() or any(not n for n in names):
        raise ValueError(f"empty encoder name in enc_type {enc_type!r}; valid: {', '.join(valid_encoder_names())}")
    for n in names:
        parse_encoder_name(n)  # every name is checked before any weights are read
        if n in VIT_SPECS:
            check_resolution(VIT_SPECS[n], resolution, grid)  # 256 px only: fail before loading any encoder
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file() and len(names) > 1:
        raise ValueError(
            f"checkpoint_dir={str(checkpoint_dir)!r} is a single file but {len(names)} encoders were requested; "
            "pass a folder holding one file per encoder"
        )
    kw = dict(grid=grid, pretrained=pretrained, attn_backend=attn_backend, device=device)
    return [build_encoder(n, resolution, checkpoint_dir, **kw) for n in names]
