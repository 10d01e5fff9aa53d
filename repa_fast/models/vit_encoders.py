"""REPA's non-DINOv2 target encoders on timm's VisionTransformer: MoCo v3, MAE, I-JEPA, CLIP and DINO v1.

Each ``--enc-type`` name of the reference (utils.py ``load_encoders``) maps to one row of ``SPECS``: the timm
network that is numerically the reference's, the file the reference's README tells users to download, its
preprocessing (reference train.py ``preprocess_raw_image``) and which tokens become targets (train.py
``forward_features`` and the ``z[:, 1:]`` of MoCo v3). All give 256 targets per image at 256 px:

============== =============================================== ======================= ========================
name           network (timm)                                  preprocessing           targets
============== =============================================== ======================= ========================
mocov3-vit-s/b vit_{small(12 heads),base,large}_patch16_224    /255, ImageNet mean/std final norm, CLS dropped
/l             at img_size 256 (reference models/mocov3_vit.py) no resize
mae-vit-l      vit_large_patch16_224 at 256 (models/mae_vit.py) as MoCo v3             last block, NO final norm,
                                                                                       CLS dropped
dinov1-vit-b   vit_base_patch16_224 at 256 (timm ``.dino``)    as MoCo v3             final norm, CLS dropped
jepa-vit-h     vit_huge_patch14_gap_224 (models/jepa.py)       /255, ImageNet, then    final norm (no CLS)
                                                               bicubic 224
clip-vit-L     vit_large_patch14_clip_quickgelu_224            /255, bicubic 224, then after ln_pre and the
               (OpenAI CLIP's VisionTransformer, QuickGELU)    CLIP mean/std           blocks; NO ln_post, no
                                                                                       proj; CLS dropped
============== =============================================== ======================= ========================

DINO v1's reference file (models/dinov1.py) is missing, so its targets are our choice, documented here: patch
tokens after the final norm, CLS dropped, as for MoCo v3. At 512 px the reference supports DINOv2 only, and so do
we: these encoders refuse any resolution but 256.

Attention: timm's Attention modules are swapped for ``_BackendAttention`` (same ``qkv``/``proj`` parameters, so
the same state_dict) which calls ``repa_fast.kernels.attention.attention`` with the encoder's ``attn_backend``.
File handling (which files, which layouts, key renames) lives in ``vit_encoder_files.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.kernels.attention import BACKENDS, attention
from repa_fast.models.encoder_archs import ENCODER_ARCHS, EncoderArch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN (reference train.py imports it)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # reference train.py CLIP_DEFAULT_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRID = 16  # every encoder here: 16 x 16 = 256 target tokens at 256 px
RESOLUTION = 256


@dataclass(frozen=True)
class ViTEncoderSpec:
    """One target encoder: network, preprocessing, targets and where its weights come from.

    ``timm_model`` is built with the shape ``arch`` (by default the encoder's row of
    ``models/encoder_archs.ENCODER_ARCHS``, the one table of encoder shapes that ``repa_fast.flops`` reads too) at
    ``input_size`` px. ``resize``: "none" (feed the 256-px image),
    "before_normalize" (CLIP: /255, bicubic to ``input_size``, mean/std) or "after_normalize" (I-JEPA: /255,
    mean/std, bicubic). ``layout`` names the file converter in ``vit_encoder_files``. ``files``: the file names of
    the reference's README first, then the original release's; ``timm_hub``: Hugging Face repos holding timm's
    layout of the same weights; ``download``: the page the reference's README names.
    """

    name: str
    timm_model: str
    layout: str
    files: tuple
    download: str
    input_size: int = RESOLUTION
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resize: str = "none"
    final_norm: bool = True
    timm_hub: tuple = ()
    arch: EncoderArch | None = None

    def __post_init__(self):
        if self.arch is None:
            object.__setattr__(self, "arch", ENCODER_ARCHS[self.name])

    embed_dim = property(lambda self: self.arch.embed_dim)
    depth = property(lambda self: self.arch.depth)
    num_heads = property(lambda self: self.arch.num_heads)
    patch_size = property(lambda self: self.arch.patch_size)
    class_token = property(lambda self: self.arch.class_token)


RCG = "https://github.com/LTH14/rcg"
SPECS: dict[str, ViTEncoderSpec] = {
    s.name: s
    for s in (
        ViTEncoderSpec("mocov3-vit-s", "vit_small_patch16_224", "mocov3", ("mocov3_vits.pth",),
                       "https://github.com/facebookresearch/moco-v3"),
        ViTEncoderSpec("mocov3-vit-b", "vit_base_patch16_224", "mocov3", ("mocov3_vitb.pth",), RCG),
        ViTEncoderSpec("mocov3-vit-l", "vit_large_patch16_224", "mocov3", ("mocov3_vitl.pth",), RCG),
        ViTEncoderSpec("mae-vit-l", "vit_large_patch16_224", "mae",
                       ("mae_vitl.pth", "mae_pretrain_vit_large.pth"), "https://github.com/facebookresearch/mae",
                       final_norm=False, timm_hub=("vit_large_patch16_224.mae",)),
        ViTEncoderSpec("dinov1-vit-b", "vit_base_patch16_224", "dinov1",
                       ("dinov1_vitb.pth", "dino_vitbase16_pretrain.pth"), "https://github.com/facebookresearch/dino",
                       timm_hub=("vit_base_patch16_224.dino",)),
        ViTEncoderSpec("jepa-vit-h", "vit_huge_patch14_gap_224", "jepa",
                       ("ijepa_vith.pth", "IN1K-vit.h.14-300e.pth.tar"), "https://github.com/facebookresearch/ijepa",
                       input_size=224, resize="after_normalize"),
        ViTEncoderSpec("clip-vit-L", "vit_large_patch14_clip_quickgelu_224", "clip", ("ViT-L-14.pt",),
                       "https://github.com/openai/CLIP (clip.load('ViT-L/14') caches it in ~/.cache/clip)",
                       input_size=224, mean=CLIP_MEAN, std=CLIP_STD, resize="before_normalize",
                       final_norm=False,
                       timm_hub=("vit_large_patch14_clip_224.openai", "vit_large_patch14_clip_quickgelu_224.openai")),
    )
}  # fmt: skip


def import_timm():
    """timm, or an error naming the pip extra (the non-DINOv2 encoders are built on timm's modules)."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            "the MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoders need timm: pip install 'repa_fast[encoders]'"
        ) from e
    return timm


class _BackendAttention(nn.Module):
    """timm's ``Attention`` (qkv with bias, no q/k norm) computed by ``repa_fast.kernels.attention``."""

    def __init__(self, timm_attn: nn.Module, backend: str):
        super().__init__()
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(timm_attn, part, nn.Identity()), nn.Identity):
                raise ValueError(f"timm attention with a non-identity {part} is not supported here")
        self.num_heads, self.backend = timm_attn.num_heads, backend
        self.qkv, self.proj = timm_attn.qkv, timm_attn.proj  # same parameter names as timm's module

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:  # timm's Block passes these through; encoders attend to all tokens
            raise ValueError("target encoders use full (unmasked, non-causal) attention")
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, Dh)
        return self.proj(attention(q, k, v, attn_backend=self.backend).reshape(B, N, C))


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_resolution(spec: ViTEncoderSpec, resolution: int, grid: int | None = None) -> None:
    """The reference supports these encoders at 256 px only (utils.py: 512 px is DINOv2-only)."""
    if resolution != RESOLUTION:
        raise ValueError(
            f"encoder {spec.name!r} supports 256x256 images only (as in the reference, 512 px training is "
            f"DINOv2-only); got resolution {resolution}. Use --enc-type dinov2-vit-* at {resolution} px."
        )
    if grid not in (None, GRID):
        raise ValueError(f"encoder {spec.name!r} gives a fixed {GRID}x{GRID} token grid; got grid={grid}")


class TimmViTEncoder(nn.Module):
    """Frozen-target wrapper: uint8 images (B, 3, 256, 256) -> targets (B, 256, D), preprocessing inside.

    Args:
        spec: a row of ``SPECS``.
        resolution: must be 256 (see ``check_resolution``).
        attn_backend: backend for ``repa_fast.kernels.attention.attention`` ("math" = explicit softmax).
        enc_name: the ``--enc-type`` string (defaults to ``spec.name``).
    """

    def __init__(
        self,
        spec: ViTEncoderSpec,
        resolution: int = RESOLUTION,
        grid: int | None = None,
        attn_backend: str = "auto",
        enc_name: str | None = None,
    ):
        super().__init__()
        check_resolution(spec, resolution, grid)
        timm = import_timm()
        self.spec, self.enc_name = spec, enc_name or spec.name
        self.attn_backend = _resolve_backend(attn_backend)
        self.resolution, self.grid, self.input_size = resolution, GRID, spec.input_size
        self.embed_dim = self.num_features = spec.embed_dim
        self.num_patches = GRID * GRID
        shape = dict(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads)
        self.vit = timm.create_model(
            spec.timm_model, pretrained=False, num_classes=0, img_size=spec.input_size, **shape
        )
        if self.vit.patch_embed.grid_size != (GRID, GRID) or self.vit.embed_dim != spec.embed_dim:
            raise RuntimeError(f"timm {spec.timm_model} does not give a {GRID}x{GRID}x{spec.embed_dim} grid")
        for blk in self.vit.blocks:
            blk.attn = _BackendAttention(blk.attn, self.attn_backend)
        self._pixel_stats: dict = {}  # fp32 constants kept out of the buffers (see DINOv2ViT)

    def set_attn_backend(self, backend: str) -> None:
        self.attn_backend = _resolve_backend(backend)
        for blk in self.vit.blocks:
            blk.attn.backend = self.attn_backend

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        if key not in self._pixel_stats:
            self._pixel_stats[key] = tuple(
                torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                for v in (self.spec.mean, self.spec.std)
            )
        return self._pixel_stats[key]

    @property
    def preprocessing(self) -> dict:
        """What ``preprocess`` does (recorded by the target cache, which refuses a cache made otherwise)."""
        size = f"bicubic, align_corners False, no antialias, to {self.input_size}x{self.input_size}"
        resize = {"none": "none", "before_normalize": f"{size}, before mean/std", "after_normalize": f"{size}, after"}
        return {
            "scale": "x / 255",
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
            "resize": resize[self.spec.resize],
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Reference train.py ``preprocess_raw_image``: x / 255, then mean/std, with CLIP's bicubic resize to 224
        before and I-JEPA's after the normalisation (F.interpolate defaults: align_corners False, no antialias)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.resolution,) * 2:
            raise ValueError(
                f"{self.enc_name} expects images of shape (B, 3, {self.resolution}, {self.resolution}), "
                f"got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 (0..255) or float in 0..255, got dtype {images.dtype}")
        x = images / 255.0
        size = (self.input_size, self.input_size)
        if self.spec.resize == "before_normalize":
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        mean, std = self._stats(x)
        x = (x - mean) / std
        if self.spec.resize == "after_normalize":
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return x

    def forward_tokens(self, x: torch.Tensor, with_cls: bool = False):
        """Preprocessed (B, 3, S, S) -> patch tokens (B, 256, D): the last block's output, the final norm applied
        only where the reference applies it, prefix (class) tokens dropped.

        ``with_cls``: (patch tokens, class token (B, D)) for REG (docs/methods.md §REG): the class token of the same
        layer with the same norm as the patch tokens; I-JEPA has none, so its pooled global feature, the mean of
        the patch tokens (timm's ``global_pool="avg"`` of that model)."""
        x = x.to(self.vit.patch_embed.proj.weight.dtype)
        if not with_cls:
            out = self.vit.forward_intermediates(
                x, indices=1, norm=self.spec.final_norm, output_fmt="NLC", intermediates_only=True
            )
            return out[-1]
        out = self.vit.forward_intermediates(
            x, indices=1, norm=self.spec.final_norm, output_fmt="NLC", intermediates_only=True, output_dict=True,
            return_prefix_tokens=True,
        )  # fmt: skip
        patch = out["image_intermediates"][-1]
        prefix = out.get("image_intermediates_prefix")
        return patch, (prefix[-1][:, 0] if prefix is not None else patch.mean(1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, with_cls: bool = False):
        """uint8 (B, 3, 256, 256) -> targets (B, 256, D); ``with_cls``: (targets, class token (B, D))."""
        return self.forward_tokens(self.preprocess(images), with_cls)

    def extra_repr(self) -> str:
        return (
            f"enc_name={self.enc_name!r}, timm={self.spec.timm_model!r}, input_size={self.input_size}, "
            f"final_norm={self.spec.final_norm}, attn_backend={self.attn_backend!r}"
        )
