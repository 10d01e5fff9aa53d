"""Model shapes for the cost model, torch-free: the SiT sizes and the parameter tensors of a SiT.

``SIT_SIZES`` mirrors ``repa_fast.models.sit.SIT_SIZES`` (tests/test_cost.py checks they agree; the model module
imports torch, which this package must not). ``sit_params`` lists every parameter tensor of ``models.sit.SiT`` in
registration order (``named_parameters``), which the optimizer and EMA accounting iterate over; the same test checks
it against a real model's ``named_parameters()``.
"""

import math
from dataclasses import dataclass

from repa_fast.models.encoder_archs import EncoderArch, encoder_arch

SIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (6, 192, 3)}


@dataclass(frozen=True)
class SiTShape:
    depth: int
    dim: int
    heads: int
    patch: int
    latent: int  # latent side (resolution / 8)
    in_channels: int = 4
    num_classes: int = 1000
    z_dims: tuple = (768,)
    projector_dim: int = 2048
    encoder_depth: int = 8
    mlp_ratio: float = 4.0
    freq_dim: int = 256

    @property
    def grid(self) -> int:
        return self.latent // self.patch

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def pixels(self) -> int:
        """Values per patch: C p p, the patch embedding's input and the final layer's output width."""
        return self.in_channels * self.patch * self.patch

    @property
    def latent_numel(self) -> int:
        return self.in_channels * self.latent * self.latent


def sit_shape(model: str, resolution: int = 256, z_dims=(768,), encoder_depth: int = 8, **kw) -> SiTShape:
    """``"SiT-XL/2"`` at ``resolution`` px (SD-VAE latents: resolution / 8)."""
    try:
        size, patch = model.removeprefix("SiT-").split("/")
        depth, dim, heads = SIT_SIZES[size]
        patch = int(patch)
    except (KeyError, ValueError):
        raise ValueError(f"unknown model {model!r}; expected SiT-<{'|'.join(SIT_SIZES)}>/<patch>") from None
    return SiTShape(depth, dim, heads, patch, resolution // 8, z_dims=tuple(z_dims), encoder_depth=encoder_depth, **kw)


def _linear(prefix: str, n: int, k: int) -> list:
    return [(f"{prefix}.weight", (n, k)), (f"{prefix}.bias", (n,))]


def sit_params(s: SiTShape) -> list[tuple[str, tuple, bool]]:
    """(name, shape, trainable) of every parameter of ``models.sit.SiT``, in ``named_parameters`` order."""
    D = s.dim
    out = [("x_embedder.proj.weight", (D, s.in_channels, s.patch, s.patch)), ("x_embedder.proj.bias", (D,))]
    out += _linear("t_embedder.mlp.0", D, s.freq_dim) + _linear("t_embedder.mlp.2", D, D)
    out += [("y_embedder.embedding_table.weight", (s.num_classes + 1, D))]
    # nn.Module.named_parameters yields a module's own parameters (the frozen pos_embed) before its children's
    params = [("pos_embed", (1, s.tokens, D), False)] + [(n, shape, True) for n, shape in out]
    for i in range(s.depth):
        block = _linear("attn.qkv", 3 * D, D) + _linear("attn.proj", D, D)
        block += _linear("mlp.fc1", s.hidden, D) + _linear("mlp.fc2", D, s.hidden)
        block += _linear("adaLN_modulation.1", 6 * D, D)
        params += [(f"blocks.{i}.{n}", shape, True) for n, shape in block]
    for j, z in enumerate(s.z_dims):
        proj = _linear("0", s.projector_dim, D) + _linear("2", s.projector_dim, s.projector_dim)
        proj += _linear("4", z, s.projector_dim)
        params += [(f"projectors.{j}.{n}", shape, True) for n, shape in proj]
    final = _linear("linear", s.pixels, D) + _linear("adaLN_modulation.1", 2 * D, D)
    params += [(f"final_layer.{n}", shape, True) for n, shape in final]
    return params


def numel(shape) -> int:
    return math.prod(shape)


def encoder_params(arch: EncoderArch) -> int:
    """Parameters of a ViT target encoder (patch embedding, class/register tokens, positions, blocks, final norm);
    positions counted at the official 518 px (37 x 37) table, which the hub code interpolates per forward."""
    D, h = arch.embed_dim, arch.ffn_hidden
    ffn = D * 2 * h + 2 * h + h * D + D if arch.ffn == "swiglu" else D * h + h + h * D + D
    block = (3 * D * D + 3 * D) + (D * D + D) + ffn + 4 * D + 2 * D  # qkv, proj, FFN, two LayerNorms, 2 LayerScales
    tokens = 37 * 37 + int(arch.class_token)
    patch = D * 3 * arch.patch_size**2 + D
    return patch + (int(arch.class_token) + arch.num_register_tokens) * D + tokens * D + arch.depth * block + 2 * D


def encoder_shape(name: str) -> EncoderArch:
    return encoder_arch(name)
