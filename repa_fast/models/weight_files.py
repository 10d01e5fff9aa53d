"""Target-encoder weight files: where they are looked for, how they are read, how their layouts map to our modules.

Building the encoders lives apart (``encoders.py`` for DINOv2 and the dispatch by ``--enc-type`` name,
``vit_encoder_files.py`` for the timm-based encoders); this module knows files only and imports no builder.

DINOv2 (``dinov2-vit-*``, ``dinov2reg-vit-*``), looked for in this order (the first that exists wins):
  1. ``checkpoint_dir`` itself when it is a file (one encoder only);
  2. inside ``checkpoint_dir``: the torch.hub file ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``, the same under
     ``checkpoints/``, timm's ``<timm name>/model.safetensors`` or ``<timm name>.safetensors``, and the Hugging
     Face cache layout ``models--timm--<timm name>/snapshots/*/model.safetensors``;
  3. the torch.hub cache, ``torch.hub.get_dir()/checkpoints/<hub file>`` (where ``torch.hub.load`` puts it);
  4. the Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
Both layouts give the same module: the hub layout has ``mask_token`` (dropped), ``register_tokens`` and a class
position in ``pos_embed`` (1, 1370, D); timm's layout (``timm/vit_*_patch14[_reg4]_dinov2.lvd142m``) has no
``mask_token``, calls the registers ``reg_token``, and for the reg variants folds the class position into
``cls_token`` and stores only the 1369 patch positions (timm ``_convert_dinov2``); ViT-g's ``mlp.w12/w3`` are timm's
``mlp.fc1/fc2``.

MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 (``vit_encoders.SPECS``), looked for in this order:
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

Files are read with safetensors, ``torch.load(weights_only=True)`` or, for TorchScript archives, without running
their code; nothing else is unpickled.
"""

from __future__ import annotations

import glob
import math
import os
import re
import zipfile
from pathlib import Path

import torch

from .dinov2 import DINOv2ViT, resample_pos_embed
from .vit_encoders import GRID, ViTEncoderSpec

HUB_URL = "https://dl.fbaipublicfiles.com/dinov2"
TIMM_SIZE = {"s": "small", "b": "base", "l": "large", "g": "giant"}
CLIP_CACHE = Path("~/.cache/clip")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def first_existing(patterns: list[str]) -> Path | None:
    """The first of ``patterns`` naming an existing file (a glob pattern: its last match), or None."""
    for pattern in patterns:
        hits = sorted(glob.glob(pattern)) if "*" in pattern else ([pattern] if Path(pattern).is_file() else [])
        if hits:
            return Path(hits[-1])
    return None


# ---------------------------------------------------------------------------------------------------------------
# DINOv2: torch.hub and timm names


def hub_filename(size: str, registers: bool) -> str:
    return f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"


def hub_url(size: str, registers: bool) -> str:
    return f"{HUB_URL}/dinov2_vit{size}14/{hub_filename(size, registers)}"


def timm_model_name(size: str, registers: bool) -> str:
    return f"vit_{TIMM_SIZE[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


def dinov2_candidate_paths(size: str, registers: bool, checkpoint_dir: str | os.PathLike | None) -> list[str]:
    """Every place a DINOv2 weight file is looked for, in order (globs unexpanded, for the error message)."""
    hub, timm_name = hub_filename(size, registers), timm_model_name(size, registers)
    hf_snapshots = f"models--timm--{timm_name}/snapshots/*/model.safetensors"
    out = []
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        out += [str(d / hub), str(d / "checkpoints" / hub), str(d / timm_name / "model.safetensors")]
        out += [str(d / f"{timm_name}.safetensors"), str(d / hf_snapshots)]
    out += [str(Path(torch.hub.get_dir()) / "checkpoints" / hub), str(hf_cache_dir() / hf_snapshots)]
    return out


def find_dinov2_file(name: str, size: str, registers: bool, checkpoint_dir: str | os.PathLike | None) -> Path:
    """Path of encoder ``name``'s DINOv2 weight file; FileNotFoundError naming the file, the places searched and
    where to download it."""
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():
        return Path(checkpoint_dir)
    searched = dinov2_candidate_paths(size, registers, checkpoint_dir)
    found = first_existing(searched)
    if found is not None:
        return found
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
    """Hub or timm key layout -> ``model``'s (hub names, no mask_token), pos_embed still at the file's grid."""
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


# ---------------------------------------------------------------------------------------------------------------
# MoCo v3 / MAE / I-JEPA / CLIP / DINO v1: the reference's and the releases' files


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


def _timm_places(spec: ViTEncoderSpec, d: Path) -> list[str]:
    """timm's layouts of the same weights under folder ``d``: plain files and the Hugging Face cache layout."""
    out = []
    for hub in spec.timm_hub:
        out += [str(d / hub / "model.safetensors"), str(d / f"{hub}.safetensors")]
        out += [str(d / f"models--timm--{hub}" / "snapshots" / "*" / "model.safetensors")]
    return out


def vit_candidate_paths(spec: ViTEncoderSpec, checkpoint_dir: str | os.PathLike | None) -> list[str]:
    """Every place ``spec``'s weight file is looked for, in order (globs unexpanded, for the error message)."""
    out: list[str] = []
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        out += [str(d / f) for f in spec.files] + [str(d / "ckpts" / f) for f in spec.files] + _timm_places(spec, d)
    out += [str(Path("ckpts") / f) for f in spec.files]  # the reference's README: ./ckpts/<file>
    if spec.layout == "clip":
        out += [str(CLIP_CACHE.expanduser() / f) for f in spec.files]
    return out + [p for p in _timm_places(spec, hf_cache_dir()) if "models--timm--" in p]


def find_vit_file(spec: ViTEncoderSpec, checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``spec``'s weight file; FileNotFoundError naming the file, every place searched and the download
    page named in the reference's README."""
    if checkpoint_dir is not None and Path(checkpoint_dir).is_file():
        return Path(checkpoint_dir)
    searched = vit_candidate_paths(spec, checkpoint_dir)
    found = first_existing(searched)
    if found is not None:
        return found
    timm_hint = f" (or timm's {spec.timm_hub[0]}/model.safetensors)" if spec.timm_hub else ""
    raise FileNotFoundError(
        f"weights for encoder {spec.name!r} not found: expected {spec.files[0]!r}{timm_hint}. Looked in:\n  "
        + "\n  ".join(searched)
        + f"\nDownload it from {spec.download} and place it as ./ckpts/{spec.files[0]} "
        "(as the reference's README says), or pass --encoder-checkpoint-dir <folder or file>."
    )


def read_weight_file(path: str | os.PathLike) -> dict:
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


def _clip_key(k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One OpenAI ``visual.*`` entry (prefix stripped) in timm's names and shapes."""
    if k == "class_embedding":
        return "cls_token", v.reshape(1, 1, -1)
    if k == "positional_embedding":
        return "pos_embed", v.unsqueeze(0)
    if k == "conv1.weight":
        return "patch_embed.proj.weight", v
    if k.startswith("ln_pre."):
        return "norm_pre." + k[len("ln_pre.") :], v
    if k.startswith("ln_post."):
        return "norm." + k[len("ln_post.") :], v
    if k.startswith("transformer.resblocks."):
        k = "blocks." + k[len("transformer.resblocks.") :]
        for old, new in CLIP_BLOCK_RENAMES:
            k = k.replace(old, new)
    return k, v


def _clip(obj: dict) -> dict:
    sd = obj.get("state_dict", obj)
    if "visual.conv1.weight" not in sd:  # timm layout: drop the projection head
        return {k: v for k, v in sd.items() if not k.startswith("head.")}
    # visual.proj projects to the joint text-image space: not part of the targets
    return dict(_clip_key(k, v) for k, v in _strip(sd, "visual.").items() if k != "proj")


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
