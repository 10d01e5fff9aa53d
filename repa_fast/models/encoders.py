"""REPA target encoders: names, weight files, ``load_encoders`` (docs/objective.md §Alignment targets; reference
utils.py:52-160). Their shapes are rows of ``encoder_archs.ENCODER_ARCHS``.

Names mirror the reference ``--enc-type`` strings (``type-arch-config``, comma-separated for several encoders):
``dinov2-vit-{s,b,l,g}`` and ``dinov2reg-vit-{s,b,l,g}`` (4 registers). ``dinov2-vit-t`` / ``dinov2reg-vit-t`` is
a toy DINOv2-architecture encoder (D 192, depth 4, 3 heads, patch 14) for the embedded demo and tests: no
official weights exist for it, so it only works with ``pretrained=False``. The other reference encoders
(``mocov3-vit-{s,b,l}``, ``mae-vit-l``, ``jepa-vit-h``, ``clip-vit-L``, ``dinov1-vit-b``) are built on timm by
``vit_encoders.py`` (files: ``vit_encoder_files.py``); ``build_encoder`` dispatches on ``VIT_SPECS``.

Weight files, looked for in this order (the first that exists wins; the chosen path is logged):
  1. ``checkpoint_dir`` itself when it is a file (one encoder only);
  2. inside ``checkpoint_dir``: the torch.hub file ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``, the same under
     ``checkpoints/``, timm's ``<timm name>/model.safetensors`` or ``<timm name>.safetensors``, and the Hugging
     Face cache layout ``models--timm--<timm name>/snapshots/*/model.safetensors``;
  3. the torch.hub cache, ``torch.hub.get_dir()/checkpoints/<hub file>`` (where ``torch.hub.load`` puts it);
  4. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
Files are read with ``torch.load(weights_only=True)`` or safetensors only. Both layouts give the same module:
the hub layout has ``mask_token`` (dropped), ``register_tokens`` and a class position in ``pos_embed``
(1, 1370, D); timm's layout (``timm/vit_*_patch14[_reg4]_dinov2.lvd142m``) has no ``mask_token``, calls the
registers ``reg_token``, and for the reg variants folds the class position into ``cls_token`` and stores only the
1369 patch positions (timm ``_convert_dinov2``); ViT-g's ``mlp.w12/w3`` are timm's ``mlp.fc1/fc2``.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from pathlib import Path

import torch

from .dinov2 import ARCHS, DINOv2ViT, dinov2_arch, resample_pos_embed
from .vit_encoders import SPECS as VIT_SPECS
from .vit_encoders import check_resolution

logger = logging.getLogger("repa_fast.models.encoders")

HUB_URL = "https://dl.fbaipublicfiles.com/dinov2"
TIMM_SIZE = {"s": "small", "b": "base", "l": "large", "g": "giant"}
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


def hub_filename(size: str, registers: bool) -> str:
    return f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"


def hub_url(size: str, registers: bool) -> str:
    return f"{HUB_URL}/dinov2_vit{size}14/{hub_filename(size, registers)}"


def timm_model_name(size: str, registers: bool) -> str:
    return f"vit_{TIMM_SIZE[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def candidate_paths(size: str, registers: bool, checkpoint_dir: str | os.PathLike | None) -> list[str]:
    """Every place a weight file is looked for, in order (globs unexpanded, for the error message)."""
    hub, timm_name = hub_filename(size, registers), timm_model_name(size, registers)
    hf_snapshots = f"models--timm--{timm_name}/snapshots/*/model.safetensors"
    out = []
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        out += [str(d / hub), str(d / "checkpoints" / hub), str(d / timm_name / "model.safetensors")]
        out += [str(d / f"{timm_name}.safetensors"), str(d / hf_snapshots)]
    out += [str(Path(torch.hub.get_dir()) / "checkpoints" / hub), str(_hf_cache_dir() / hf_snapshots)]
    return out


def find_checkpoint(name: str, checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """Path of the weight file for encoder ``name``; FileNotFoundError naming the file, the places searched and
    where to download it."""
    if name.strip() in VIT_SPECS:
        from .vit_encoder_files import find_checkpoint as find_vit_checkpoint

        return find_vit_checkpoint(VIT_SPECS[name.strip()], checkpoint_dir)
    size, registers = parse_encoder_name(name)
    if size in TOY_SIZES:
        raise ValueError(f"encoder {name!r} is a random-init toy: no official weights exist; use pretrained=False")
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():
        return Path(checkpoint_dir)
    searched = candidate_paths(size, registers, checkpoint_dir)
    for pattern in searched:
        hits = sorted(glob.glob(pattern)) if "*" in pattern else ([pattern] if Path(pattern).is_file() else [])
        if hits:
            return Path(hits[-1])
    hub, timm_name = hub_filename(size, registers), timm_model_name(size, registers)
    raise FileNotFoundError(
        f"weights for encoder {name!r} not found: expected the torch.hub file {hub!r} (or timm's "
        f"{timm_name}/model.safetensors). Looked in:\n  "
        + "\n  ".join(searched)
        + f"\nGet it with e.g. `wget {hub_url(size, registers)} -P {Path(torch.hub.get_dir()) / 'checkpoints'}` "
        f"(URL pattern {HUB_URL}/dinov2_vit<s|b|l|g>14/dinov2_vit<s|b|l|g>14[_reg4]_pretrain.pth), or from "
        f"https://huggingface.co/timm/{timm_name}, and pass checkpoint_dir=<folder or file>."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain ``torch.save(state_dict)`` file (weights_only=True)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / pickled objects: say which file
        raise RuntimeError(f"could not read DINOv2 weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (a DINOv2 hub .pth or safetensors file)")
    return sd


def to_hub_layout(state_dict: dict[str, torch.Tensor], model: DINOv2ViT) -> dict[str, torch.Tensor]:
    """Hub or timm key layout -> this module's (hub names, no mask_token), pos_embed still at the file's grid."""
    sd = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1] and pos.shape[1] > 1:
        # timm reg layout: no class position (it is folded into cls_token): a zero class position is exact,
        # fl(cls_folded + 0) == fl(cls + pos0) as the hub model computes it.
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    if model.arch.ffn == "swiglu":
        sd = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()}
    return sd


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
        return build_vit_encoder(name.strip(), resolution, checkpoint_dir, **kw)
    if name.strip() in DEMO_ENCODERS:
        from .digits_encoder import build_digits_encoder  # lazy: the base module never imports implementations

        return build_digits_encoder(
            name.strip(), resolution, checkpoint_dir, grid=grid, pretrained=pretrained, device=device
        )
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
