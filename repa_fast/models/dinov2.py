"""DINOv2 ViT/14 (Oquab et al. 2023; "reg" variants: Darcet et al. 2023) as REPA's frozen target encoder.

The architecture and parameter names follow facebookresearch/dinov2 (``DinoVisionTransformer`` built by its
torch.hub entry points, ``block_chunks=0``), so the official ``dinov2_vit*14[_reg4]_pretrain.pth`` files load
by name (``encoders.py`` does the file handling). Differences from the hub model, all deliberate:

- no ``mask_token`` parameter (masking is a pre-training feature; the loader drops the key) and no head;
- ``pos_embed`` holds the *target* grid (16x16 at 256 px), resampled once at load like REPA's ``load_encoders``
  (docs/objective.md §Alignment targets), so the forward never interpolates;
- attention goes through ``repa_fast.kernels.attention.attention`` (SDPA / FlashAttention), layout (B, N, H, Dh);
- preprocessing (docs/objective.md §Alignment targets) happens inside ``forward``, which maps uint8 images
  (B, 3, R, R) to the REPA targets ``x_norm_patchtokens`` (B, grid*grid, D).

Block: x = x + ls1 * Attn(LN1(x)); x = x + ls2 * FFN(LN2(x)); LN eps 1e-6 with affine; FFN = fc1-GELU(exact)-fc2,
or for ViT-g the SwiGLU w12 -> silu(x1) * x2 -> w3 of the official ``SwiGLUFFNFused``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.kernels.attention import BACKENDS, attention

from .encoder_archs import ENCODER_ARCHS, EncoderArch

logger = logging.getLogger("repa_fast.models.dinov2")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm IMAGENET_DEFAULT_MEAN, used by the reference (train.py:48-51)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_GRID = 37  # the released pos_embed covers 518 px / 14 = 37 x 37 patches (+1 class position)


# The shapes are the DINOv2 rows of the one encoder table, encoder_archs.ENCODER_ARCHS.
# size letter -> architecture without registers; "t" is a random-init-only toy (no official weights exist).
ARCHS = {name.rsplit("-", 1)[1]: arch for name, arch in ENCODER_ARCHS.items() if name.startswith("dinov2-vit-")}


def dinov2_arch(size: str, registers: bool = False) -> EncoderArch:
    if size not in ARCHS:
        raise ValueError(f"unknown DINOv2 size {size!r}; valid sizes: {sorted(ARCHS)}")
    return ENCODER_ARCHS[f"{'dinov2reg' if registers else 'dinov2'}-vit-{size}"]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a square absolute position embedding (1, P + g*g, D) to (1, P + new_grid**2, D).

    Bicubic with antialias, align_corners False, computed in fp32, prefix (class) positions passed through:
    the same numbers as ``timm.layers.pos_embed.resample_abs_pos_embed(pos, [g, g], num_prefix_tokens=P)``,
    which REPA applies once to the hub model (utils.py ``load_encoders``; docs/objective.md §Alignment targets).
    """
    prefix, grid_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid_pos.shape[1])
    if old_grid * old_grid != grid_pos.shape[1]:
        raise ValueError(
            f"pos_embed has {grid_pos.shape[1]} non-prefix positions, not a square grid "
            f"(shape {tuple(pos_embed.shape)}, {num_prefix_tokens} prefix token(s))"
        )
    if old_grid == new_grid:
        return pos_embed.clone()
    dim = grid_pos.shape[-1]
    grid_pos = grid_pos.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_pos = F.interpolate(grid_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid_pos], dim=1)


def _check_attn_backend(attn_backend: str) -> None:
    if attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch size (bias), flattened to tokens in row-major patch order."""

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention, qkv Linear with bias, scale Dh^-0.5 (inside the attention backend)."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Official layout: qkv.reshape(B, N, 3, H, Dh) then unbind the "3" axis.
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # (B, N, H, Dh)
        out = attention(q, k, v, attn_backend=self.attn_backend)  # (B, N, H, Dh)
        return self.proj(out.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the official nn.GELU default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g FFN: hidden = silu(x1) * x2 with [x1, x2] = w12(x).chunk(2); out = w3(hidden) (official names).
    ``hidden`` is ``EncoderArch.ffn_hidden`` (the official SwiGLUFFNFused sizing: 4 * 1536 -> 4096)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, arch: EncoderArch, attn_backend: str = "auto"):
        super().__init__()
        dim, hidden = arch.embed_dim, arch.ffn_hidden
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, arch.num_heads, attn_backend)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFN(dim, hidden) if arch.ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _resolve_grid(resolution: int, grid: int | None) -> int:
    if grid is None:
        if resolution % 16:
            raise ValueError(
                f"resolution {resolution} is not a multiple of 16; pass grid= explicitly (the SiT token grid, "
                f"R // 16 for SiT-*/2 on R/8 latents)"
            )
        grid = resolution // 16
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return grid


class DINOv2ViT(nn.Module):
    """DINOv2 ViT/14 target encoder: uint8 images (B, 3, R, R) -> patch tokens (B, grid*grid, D).

    Args:
        arch: an ``EncoderArch`` (``dinov2_arch("b", registers=False)`` ...).
        resolution: R, the side of the uint8 images ``forward`` accepts (256 or 512 for REPA).
        grid: side of the patch grid (default R // 16: 16 at 256 px, 32 at 512 px). The image is resized to
            14 * grid pixels and ``pos_embed`` holds grid*grid positions.
        attn_backend: backend of ``repa_fast.kernels.attention.attention`` ("auto": FlashAttention 3/2 or xformers
            for fp16/bf16 CUDA inputs when installed, else SDPA; "sdpa"; "math" for the explicit softmax of the
            reference's hub model without xformers; ...). The encoder has no Triton op, so it takes no ``impl``.
        enc_name: the ``--enc-type`` string this module answers to (informational).
    """

    def __init__(
        self,
        arch: EncoderArch,
        resolution: int = 256,
        grid: int | None = None,
        attn_backend: str = "auto",
        enc_name: str | None = None,
    ):
        super().__init__()
        _check_attn_backend(attn_backend)
        self.arch, self.attn_backend, self.enc_name = arch, attn_backend, enc_name
        self.resolution, self.grid = resolution, _resolve_grid(resolution, grid)
        self.input_size = arch.patch_size * self.grid  # 224 at 256 px, 448 at 512 px
        self.embed_dim = self.num_features = arch.embed_dim
        self.num_register_tokens = arch.num_register_tokens
        self.num_patches = self.grid * self.grid

        dim = arch.embed_dim
        self.patch_embed = PatchEmbed(dim, arch.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))  # class position first
        n_reg = arch.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, n_reg, dim)) if n_reg else None  # inserted after cls
        self.blocks = nn.ModuleList(Block(arch, attn_backend) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # Normalisation constants live outside the module's buffers so that `.to(torch.bfloat16)` on the
        # encoder cannot round them (0.485 -> 0.484375): preprocessing stays in fp32 whatever the weights' dtype.
        self._pixel_stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, layerscale: float = 1.0) -> None:
        """DINOv2's init (trunc-normal 0.02 Linear weights and pos_embed, 1e-6 tokens); LayerScale at the hub
        builders' ``init_values=1.0`` so a random encoder still mixes tokens (the demo uses it as a target)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.gamma.fill_(layerscale)

    def set_attn_backend(self, attn_backend: str) -> None:
        _check_attn_backend(attn_backend)
        self.attn_backend = attn_backend
        for blk in self.blocks:
            blk.attn.attn_backend = attn_backend

    @property
    def preprocessing(self) -> dict:
        """What ``preprocess`` does (recorded by the target cache, which refuses a cache made otherwise)."""
        return {
            "scale": "x / 255",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "resize": f"bicubic, align_corners False, no antialias, to {self.input_size}x{self.input_size}",
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """docs/objective.md §Alignment targets / reference train.py:48-51: x / 255 -> (x - mean) / std -> bicubic
        resize to 14 * grid (align_corners False, no antialias). uint8 (B, 3, R, R) -> float32 (B, 3, 14g, 14g)."""
        self._check_images(images)
        x = images / 255.0  # float32 for uint8 input, as `raw_image / 255.` in the reference
        mean, std = self._stats(x)
        x = (x - mean) / std  # torchvision Normalize: sub_(mean).div_(std)
        size = (self.input_size, self.input_size)
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, 1, 1) mean and std made from the Python constants in x's dtype (as torchvision's Normalize)."""
        key = (x.device, x.dtype)
        if key not in self._pixel_stats:
            self._pixel_stats[key] = tuple(
                torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)
            )
        return self._pixel_stats[key]

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.resolution,) * 2:
            raise ValueError(
                f"{self.enc_name or 'DINOv2'} expects images of shape (B, 3, {self.resolution}, {self.resolution}) "
                f"(uint8 pixels, as the resolution it was built for), got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 (0..255) or float in 0..255, got dtype {images.dtype}")

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 14g, 14g) -> (B, 1 + n_reg + g*g, D): [cls, registers, patches], registers without position
        (official ``prepare_tokens_with_masks``: the class position is added before registers are inserted)."""
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"expected preprocessed input of side {self.input_size}, got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, g*g, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed input (B, 3, 14g, 14g) -> the official output dict (``x_norm_patchtokens`` is REPA's target)."""
        x = self.prepare_tokens(x.to(self.patch_embed.proj.weight.dtype))
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor, with_cls: bool = False):
        """uint8 images (B, 3, R, R) -> targets (B, grid*grid, D): final-LayerNorm patch tokens, CLS and registers
        dropped (docs/objective.md §Alignment targets). Runs without autograd: targets are constants of the image.

        ``with_cls``: (patch tokens, class token (B, D)), the class token after the final LayerNorm
        (``x_norm_clstoken``), as REG's train.py:305-307 takes it for its class-token target (docs/methods.md §REG).
        """
        feats = self.forward_features(self.preprocess(images))
        if with_cls:
            return feats["x_norm_patchtokens"], feats["x_norm_clstoken"]
        return feats["x_norm_patchtokens"]

    def extra_repr(self) -> str:
        return (
            f"enc_name={self.enc_name!r}, resolution={self.resolution}, grid={self.grid}, "
            f"input_size={self.input_size}, registers={self.num_register_tokens}, attn_backend={self.attn_backend!r}"
        )
