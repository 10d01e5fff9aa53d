"""Weight files of the MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoders: where, which layouts, loading.

Where (first existing wins; the chosen path is logged):
  1. ``checkpoint_dir`` itself when it is a file (one encoder only);
  2. inside ``checkpoint_dir``: the reference's file name (``mocov3_vitb.pth``, ``mocov3_vitl.pth``,
     ``mae_vitl.pth``, ``ijepa_vith.pth``, ``dinov1_vitb.pth``, ``ViT-L-14.pt``) or the original release's
     (``mae_pretrain_vit_large.pth``, ``IN1K-vit.h.14-300e.pth.tar``, ``dino_vitbase16_pretrain.pth``), the same
     under ``ckpts/``, and timm's layout ``<timm name>/model.safetensors``, ``<timm name>.safetensors`` or the
     Hugging Face cache layout ``models--timm--<timm name>/snapshots/*/model.safetensors``;
  3. ``./ckpts/<file>`` (where the reference's README puts them; relative to the working directory);
  4. CLIP only: ``~/.cache/clip/ViT-L-14.pt`` (where ``clip.load`` caches the OpenAI file);
  5. the Hugging Face hub cache for the timm names.

Layouts accepted (key handling as the reference's utils.py ``load_encoders`` / ``fix_mocov3_state_dict``):
  - MoCo v3 (RCG / moco-v3 release): ``["state_dict"]``, keys ``module.base_encoder.*`` kept and stripped,
    ``head``/``fc`` and the momentum encoder / predictor dropped, RCG ViT-L's ``blocks.13.norm13`` /
    ``blocks.13.mlp.fc13`` / ``blocks.14.norm14`` / ``blocks.14.mlp.fc14`` renamed to ``norm1`` / ``fc1`` /
    ``norm2`` / ``fc2``; or an already-stripped timm state dict;
  - MAE: ``["model"]`` (decoder keys, if any, dropped) or timm's ``vit_large_patch16_224.mae``;
  - I-JEPA: ``["encoder"]`` with ``module.`` stripped (the online encoder, as the reference) or timm's layout;
  - DINO v1: the flat ``dino_vitbase16_pretrain.pth`` / timm ``vit_base_patch16_224.dino``, or a full training
    checkpoint's ``["teacher"]`` ``backbone.*`` keys;
  - CLIP: OpenAI's fp16 TorchScript ``ViT-L-14.pt`` (read by ``repa_fast.utils.torchscript_reader``, no code run)
    or a plain state dict in OpenAI names (``visual.*``), or timm's ``vit_large_patch14_clip_224.openai``
    safetensors (the quickgelu model's weights); the text tower, ``visual.proj`` and timm's ``head`` are dropped.
The absolute position table is resampled once to 16x16 (bicubic, antialias; reference utils.py applies timm's
``resample_abs_pos_embed``) when the file's grid differs (MoCo v3, MAE, DINO v1: 14x14 -> 16x16).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import zipfile
from pathlib import Path

import torch

from .dinov2 import resample_pos_embed
from .encoders import _hf_cache_dir, freeze
from .vit_encoders import GRID, SPECS, TimmViTEncoder, ViTEncoderSpec, check_resolution

logger = logging.getLogger("repa_fast.models.vit_encoder_files")

MOCOV3_PREFIX = "module.base_encoder."
MOCOV3_RENAMES = (  # RCG ViT-L naming bug (reference utils.py fix_mocov3_state_dict)
    ("blocks.13.norm13.", "blocks.13.norm1."),
    ("blocks.13.mlp.fc13.", "blocks.13.mlp.fc1."),
    ("blocks.14.norm14.", "blocks.14.norm2."),
    ("blocks.14.mlp.fc14.", "blocks.14.mlp.fc2."),
)
CLIP_BLOCK_RENAMES = (  # OpenAI ResidualAttentionBlock -> timm Block
    ("ln_1.", "norm1."),
    ("attn.in_proj_weight", "attn.qkv.weight"),
    ("attn.in_proj_bias", "attn.qkv.bias"),
    ("attn.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
CLIP_CACHE = Path("~/.cache/clip")


def _timm_places(spec: ViTEncoderSpec, d: Path) -> list[str]:
    """timm's layouts of the same weights under folder ``d``: plain files and the Hugging Face cache layout."""
    out = []
    for hub in spec.timm_hub:
        out += [str(d / hub / "model.safetensors"), str(d / f"{hub}.safetensors")]
        out += [str(d / f"models--timm--{hub}" / "snapshots" / "*" / "model.safetensors")]
    return out


def candidate_paths(spec: ViTEncoderSpec, checkpoint_dir: str | os.PathLike | None) -> list[str]:
    """Every place a weight file is looked for, in order (globs unexpanded, for the error message)."""
    out: list[str] = []
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        out += [str(d / f) for f in spec.files] + [str(d / "ckpts" / f) for f in spec.files] + _timm_places(spec, d)
    out += [str(Path("ckpts") / f) for f in spec.files]  # the reference's README: ./ckpts/<file>
    if spec.layout == "clip":
        out += [str(CLIP_CACHE.expanduser() / f) for f in spec.files]
    return out + [p for p in _timm_places(spec, _hf_cache_dir()) if "models--timm--" in p]


def find_checkpoint(spec: ViTEncoderSpec, checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``spec``'s weight file; FileNotFoundError naming the file, every place searched and the download
    page named in the reference's README."""
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():
        return Path(checkpoint_dir)
    searched = candidate_paths(spec, checkpoint_dir)
    for pattern in searched:
        hits = sorted(glob.glob(pattern)) if "*" in pattern else ([pattern] if Path(pattern).is_file() else [])
        if hits:
            return Path(hits[-1])
    timm_hint = f" (or timm's {spec.timm_hub[0]}/model.safetensors)" if spec.timm_hub else ""
    raise FileNotFoundError(
        f"weights for encoder {spec.name!r} not found: expected {spec.files[0]!r}{timm_hint}. Looked in:\n  "
        + "\n  ".join(searched)
        + f"\nDownload it from {spec.download} and place it as ./ckpts/{spec.files[0]} "
        "(as the reference's README says), or pass --encoder-checkpoint-dir <folder or file>."
    )


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The file's object: safetensors, a TorchScript archive (tensors only, no code run) or torch.save
    (``weights_only=True``; memory-mapped where the format allows, so optimizer states are never read)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            from repa_fast.utils.torchscript_reader import read_torchscript_tensors

            return read_torchscript_tensors(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zip) files cannot be memory-mapped: read them whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / pickled objects: say which file
        raise RuntimeError(f"could not read encoder weights from {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict / state dict")
    return obj


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(re.fullmatch(r"[^/]+/code/.*\.py", n) for n in z.namelist())


def _strip(sd: dict, prefix: str, keep_others: bool = False) -> dict:
    return {
        k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items() if keep_others or k.startswith(prefix)
    }


def _mocov3(obj: dict) -> dict:
    sd = obj.get("state_dict", obj)
    if not any(k.startswith(MOCOV3_PREFIX) for k in sd):  # already stripped (timm names)
        return {k: v for k, v in sd.items() if not k.startswith("head.")}
    out = {}
    for k, v in _strip(sd, MOCOV3_PREFIX).items():
        for old, new in MOCOV3_RENAMES:
            k = k.replace(old, new)
        if "head" not in k and k.split(".")[0] != "fc":
            out[k] = v
    return out


def _mae(obj: dict) -> dict:
    sd = obj.get("model", obj)
    return {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}


def _jepa(obj: dict) -> dict:
    return _strip(obj["encoder"], "module.", keep_others=True) if "encoder" in obj else obj


def _dinov1(obj: dict) -> dict:
    if "teacher" in obj:  # DINO's full training checkpoint: the teacher's backbone is the released network
        return _strip(_strip(obj["teacher"], "module.", keep_others=True), "backbone.")
    return obj


def _clip(obj: dict) -> dict:
    sd = obj.get("state_dict", obj)
    if "visual.conv1.weight" not in sd:  # timm layout: drop the projection head
        return {k: v for k, v in sd.items() if not k.startswith("head.")}
    out = {}
    for k, v in _strip(sd, "visual.").items():
        if k == "proj":  # projection to the joint text-image space: not part of the targets
            continue
        if k == "class_embedding":
            k, v = "cls_token", v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            k, v = "pos_embed", v.unsqueeze(0)
        elif k == "conv1.weight":
            k = "patch_embed.proj.weight"
        elif k.startswith("ln_pre."):
            k = "norm_pre." + k[len("ln_pre.") :]
        elif k.startswith("ln_post."):
            k = "norm." + k[len("ln_post.") :]
        elif k.startswith("transformer.resblocks."):
            k = "blocks." + k[len("transformer.resblocks.") :]
            for old, new in CLIP_BLOCK_RENAMES:
                k = k.replace(old, new)
        out[k] = v
    return out


CONVERTERS = {"mocov3": _mocov3, "mae": _mae, "jepa": _jepa, "dinov1": _dinov1, "clip": _clip}


def to_timm_layout(spec: ViTEncoderSpec, obj: dict) -> dict[str, torch.Tensor]:
    """A file's object in any accepted layout -> timm key names, pos_embed resampled to the 16x16 grid."""
    sd = CONVERTERS[spec.layout](obj)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict of {spec.name}: non-tensor entries {bad[:6]}")
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        prefix = 1 if spec.class_token else 0
        side = math.isqrt(pos.shape[1] - prefix)
        if side * side == pos.shape[1] - prefix and side != GRID:
            sd["pos_embed"] = resample_pos_embed(pos, GRID, num_prefix_tokens=prefix)
    return sd


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
    sd = to_timm_layout(model.spec, source if isinstance(source, dict) else read_checkpoint(source))
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
    """One frozen MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoder by ``--enc-type`` name."""
    spec = SPECS[name]
    kw = dict(grid=grid, attn_backend=attn_backend, enc_name=name)
    if not pretrained:
        model = TimmViTEncoder(spec, resolution, **kw)
        return freeze(model.to(device) if device is not None else model)
    check_resolution(spec, resolution, grid)  # before any file is searched for
    path = find_checkpoint(spec, checkpoint_dir)  # fail before building a large model
    with torch.device("meta"):  # no random init of a 632M-parameter ViT-H; weights land on `device` directly
        model = TimmViTEncoder(spec, resolution, **kw)
    model = model.to_empty(device=device if device is not None else "cpu")
    logger.info("encoder %s: loading %s", name, path)
    return freeze(load_vit_encoder_weights(model, path))
