"""Model shapes for the cost model, torch-free: the SiT sizes and the parameter tensors of a SiT.

``SIT_SIZES`` mirrors ``repa_fast.models.sit.SIT_SIZES`` (tests/test_cost.py checks they agree; the model module
imports torch, which this package must not). ``sit_params`` lists every parameter tensor of ``models.sit.SiT`` in
registration order (``named_parameters``), which the optimizer and EMA accounting iterate over; the same test checks
it against a real model's ``named_parameters()``, with REG's class token (``reg``: 1 + T tokens in the blocks,
``cls_projectors2``, ``wg_norm``, ``final_layer.linear_cls``) and iREPA's projectors (``projection_layer_type``
"linear" or "conv", models/projectors.py).
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
    reg: bool = False  # REG's class token (models/sit.py reg=True): 1 + T tokens through the blocks and projectors
    projection_layer_type: str = "mlp"  # models/projectors.py: "mlp" (REPA) | "linear" | "conv" (iREPA)
    proj_kernel_size: int = 3  # iREPA's conv projector kernel

    @property
    def grid(self) -> int:
        return self.latent // self.patch

    @property
    def tokens(self) -> int:
        """Patch tokens T (the latent grid)."""
        return self.grid * self.grid

    @property
    def seq(self) -> int:
        """Tokens the blocks see: T, or 1 + T with REG's class token first."""
        return self.tokens + int(self.reg)

    @property
    def cls_dim(self) -> int:
        """REG's class-token width: the first encoder's (models/sit.py ``cls_dim = z_dims[0]``)."""
        return self.z_dims[0]

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
    """``"SiT-XL/2"`` at ``resolution`` px (SD-VAE latents: resolution / 8); ``kw``: the other SiTShape fields."""
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
    params = [("pos_embed", (1, s.seq, D), False)] + [(n, shape, True) for n, shape in out]
    for i in range(s.depth):
        block = _linear("attn.qkv", 3 * D, D) + _linear("attn.proj", D, D)
        block += _linear("mlp.fc1", s.hidden, D) + _linear("mlp.fc2", D, s.hidden)
        block += _linear("adaLN_modulation.1", 6 * D, D)
        params += [(f"blocks.{i}.{n}", shape, True) for n, shape in block]
    for j, z in enumerate(s.z_dims):
        params += [(f"projectors.{j}.{n}", shape, True) for n, shape in _projector(s, z)]
    final = _linear("linear", s.pixels, D) + (_linear("linear_cls", s.cls_dim, D) if s.reg else [])
    final += _linear("adaLN_modulation.1", 2 * D, D)
    params += [(f"final_layer.{n}", shape, True) for n, shape in final]
    if s.reg:
        params += [(n, shape, True) for n, shape in _linear("cls_projectors2", D, s.cls_dim)]
        params += [("wg_norm.weight", (D,), True), ("wg_norm.bias", (D,), True)]
    return params


def _projector(s: SiTShape, z: int) -> list:
    """models/projectors.py: REPA's MLP (keys 0, 2, 4), or iREPA's layer at ``projection_layer``."""
    if s.projection_layer_type == "mlp":
        proj = _linear("0", s.projector_dim, s.dim) + _linear("2", s.projector_dim, s.projector_dim)
        return proj + _linear("4", z, s.projector_dim)
    if s.projection_layer_type == "linear":
        return _linear("projection_layer", z, s.dim)
    k = s.proj_kernel_size
    return [("projection_layer.weight", (z, s.dim, k, k)), ("projection_layer.bias", (z,))]


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


@dataclass(frozen=True)
class Config:
    """What is trained, at which per-GPU batch and on how many GPUs (the structure says how)."""

    model: str = "SiT-XL/2"
    enc_types: tuple = ("dinov2-vit-b",)
    resolution: int = 256
    batch: int = 32  # per GPU
    world: int = 1
    encoder_depth: int = 8
    projector_dim: int = 2048
    cached_bytes: int = 2  # bytes per stored target value under --targets cached (fp16)
    reg: bool = False  # REG's class token (docs/methods.md §REG): 1 + T tokens through the blocks
    projection_layer_type: str = "mlp"  # --projection-layer-type: mlp (REPA) | linear | conv (iREPA)
    proj_kernel_size: int = 3  # --proj-kernel-size (conv)

    def shape(self):
        z = tuple(encoder_arch(e).embed_dim for e in self.enc_types)
        return sit_shape(
            self.model,
            self.resolution,
            z,
            self.encoder_depth,
            projector_dim=self.projector_dim,
            reg=self.reg,
            projection_layer_type=self.projection_layer_type,
            proj_kernel_size=self.proj_kernel_size,
        )

    @property
    def encoder_grid(self) -> int:
        return self.resolution // 16


def param_counts(cfg: Config) -> tuple[float, int, float]:
    """(trainable elements, trainable tensors, frozen elements) of the SiT."""
    params = sit_params(cfg.shape())
    trainable = [numel(s) for _, s, t in params if t]
    return float(sum(trainable)), len(trainable), float(sum(numel(s) for _, s, t in params if not t))
