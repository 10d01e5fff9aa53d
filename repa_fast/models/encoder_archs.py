"""Shapes of the target encoders: one table, by ``--enc-type`` name, read by the encoders, flops.py and bench/.

A row is an ``EncoderArch``; adding an encoder family adds its rows here (and its module and loader in
``encoders.py``). The table is plain data (no torch import) so that FLOP counts and benchmarks can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class EncoderArch:
    """Shape of one ViT target encoder.

    ``ffn`` is "mlp" (fc1-GELU-fc2, hidden ``mlp_ratio * embed_dim``) or "swiglu" (DINOv2 ViT-g's fused SwiGLU:
    w12 -> silu(x1) * x2 -> w3). ``num_register_tokens`` extra tokens follow the class token (Darcet et al. 2023).
    """

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str = "mlp"
    num_register_tokens: int = 0
    patch_size: int = 14
    mlp_ratio: float = 4.0
    class_token: bool = True

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the FFN; for SwiGLU the official ``SwiGLUFFNFused`` sizing (4 * 1536 -> 4096)."""
        hidden = int(self.embed_dim * self.mlp_ratio)
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else hidden


DINOV2_REGISTERS = 4  # the "_reg4" releases
# DINOv2 ViT/14 (Oquab et al. 2023, Table 17 / the official hub builders). "-t" is a repa_fast toy (random init only,
# no official weights) for the embedded demo and tests.
_DINOV2 = {
    "s": EncoderArch(384, 12, 6),
    "b": EncoderArch(768, 12, 12),
    "l": EncoderArch(1024, 24, 16),
    "g": EncoderArch(1536, 40, 24, ffn="swiglu"),
    "t": EncoderArch(192, 4, 3),
}

# The timm-based encoders of models/vit_encoders.py (its SPECS rows read their shape here). MoCo v3 ViT-S has 12
# heads (reference models/mocov3_vit.py vit_small; timm's vit_small has 6); I-JEPA's ViT-H/14 has no class token.
_VIT = {
    "mocov3-vit-s": EncoderArch(384, 12, 12, patch_size=16),
    "mocov3-vit-b": EncoderArch(768, 12, 12, patch_size=16),
    "mocov3-vit-l": EncoderArch(1024, 24, 16, patch_size=16),
    "mae-vit-l": EncoderArch(1024, 24, 16, patch_size=16),
    "dinov1-vit-b": EncoderArch(768, 12, 12, patch_size=16),
    "jepa-vit-h": EncoderArch(1280, 32, 16, patch_size=14, class_token=False),
    "clip-vit-L": EncoderArch(1024, 24, 16, patch_size=14),
}

# --enc-type name -> shape. A new encoder family adds its rows here.
ENCODER_ARCHS: dict[str, EncoderArch] = {
    **{f"dinov2-vit-{size}": arch for size, arch in _DINOV2.items()},
    **{f"dinov2reg-vit-{size}": replace(arch, num_register_tokens=DINOV2_REGISTERS) for size, arch in _DINOV2.items()},
    **_VIT,
}


def encoder_arch(name: str) -> EncoderArch:
    """The row of ``ENCODER_ARCHS`` for an ``--enc-type`` name; ValueError listing the known names."""
    try:
        return ENCODER_ARCHS[name.strip()]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODER_ARCHS)}") from None
