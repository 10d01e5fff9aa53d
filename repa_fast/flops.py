"""Analytic FLOPs of one REPA training step (matmul and attention FLOPs, 2 per multiply-add).

Counted: every Linear/Conv (forward 2*in*out per token), attention scores and values (4*T*D per token), in the SiT,
its projectors and the frozen encoders. REG (``reg=True``, docs/methods.md §REG): the class token joins the T patch
tokens, so the blocks and projectors run over 1 + T tokens, plus ``cls_projectors2`` (z -> D) and the final layer's
``linear_cls`` (D -> z) once per image; the final ``linear`` still reads the T patch tokens. iREPA's projectors
(``projection_layer_type``): "linear" is one D -> z Linear per token, "conv" a k x k convolution over the token grid,
2 D z k^2 per token (padding included, as torch's FLOP counter and cuDNN count it). Backward = 2x forward for the
trainable SiT (activation and weight gradients); the encoders run forward only. Elementwise work (norms, GELU,
softmax, optimizer) is not counted, as in MFU conventions. The tests check these formulas against
torch.utils.flop_counter on real modules.

The matmuls are also listed one by one (``Gemm``: rows per image, out and in features, count per forward), so that the
whole-step cost model (``repa_fast.cost``) can give each GEMM its own bytes and roofline; the totals below are sums of
those lists, one source for both. Torch-free (plain arithmetic on the ``EncoderArch`` table).
"""

from dataclasses import dataclass

from repa_fast.models.encoder_archs import EncoderArch, encoder_arch


@dataclass(frozen=True)
class Gemm:
    """``count`` matmuls of (rows x k) @ (k x n) per image and forward: rows = tokens, or 1 for per-image layers
    (the adaLN modulation and the timestep MLP act on one conditioning vector per image)."""

    name: str
    rows: int
    n: int
    k: int
    count: int = 1
    bias: bool = True

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.n * self.k * self.count

    @property
    def params(self) -> int:
        """Weights (and biases) of the ``count`` layers."""
        return self.count * (self.n * self.k + (self.n if self.bias else 0))


@dataclass
class StepFlops:
    sit_forward: float
    projector_forward: float
    encoder_forward: float

    @property
    def train_step(self) -> float:
        """Per image: 3x (forward + backward) of SiT and projectors, plus the encoders' forward."""
        return 3 * (self.sit_forward + self.projector_forward) + self.encoder_forward

    @property
    def train_step_cached_targets(self) -> float:
        """Per image with ``--targets cached``: the encoders ran once, before training (tools/cache_targets.py)."""
        return 3 * (self.sit_forward + self.projector_forward)

    @property
    def encoder_share(self) -> float:
        """Fraction of a step's FLOPs that ``--targets cached`` saves."""
        return self.encoder_forward / self.train_step


def attention_flops(tokens: int, dim: int) -> float:
    """Scores q k^T and values p v of one attention layer over ``tokens`` tokens, all heads: 4 T^2 D."""
    return 4.0 * tokens * tokens * dim


def vit_block_gemms(tokens: int, dim: int, mlp_hidden: int, count: int = 1, swiglu: bool = False) -> list[Gemm]:
    """qkv, proj and the FFN of ``count`` pre-norm blocks (SwiGLU: w12 dim -> 2h, w3 h -> dim)."""
    ffn = (
        [Gemm("w12", tokens, 2 * mlp_hidden, dim, count), Gemm("w3", tokens, dim, mlp_hidden, count)]
        if swiglu
        else [Gemm("fc1", tokens, mlp_hidden, dim, count), Gemm("fc2", tokens, dim, mlp_hidden, count)]
    )
    return [Gemm("qkv", tokens, 3 * dim, dim, count), Gemm("proj", tokens, dim, dim, count), *ffn]


def vit_block_flops(tokens: int, dim: int, mlp_hidden: int) -> float:
    """One pre-norm transformer block on ``tokens`` tokens: qkv, proj, fc1, fc2 and attention."""
    return sum(g.flops for g in vit_block_gemms(tokens, dim, mlp_hidden)) + attention_flops(tokens, dim)


def sit_gemms(
    depth: int,
    dim: int,
    tokens: int,
    patch: int,
    in_channels: int = 4,
    mlp_ratio: float = 4.0,
    freq_dim: int = 256,
    cls_dim: int | None = None,
) -> list[Gemm]:
    """Every matmul of the SiT forward (projectors excluded), in execution order; the patch embedding is a
    Linear over the C p p values of each patch (a Conv2d with kernel = stride = p). ``cls_dim``: REG's class token
    of that width (the blocks see 1 + ``tokens``)."""
    pixels = in_channels * patch * patch
    seq = tokens + (cls_dim is not None)
    reg_in = [Gemm("cls_projectors2", 1, dim, cls_dim)] if cls_dim is not None else []
    reg_out = [Gemm("final.linear_cls", 1, cls_dim, dim)] if cls_dim is not None else []
    return [
        *reg_in,
        Gemm("x_embedder", tokens, dim, pixels),
        Gemm("t_embedder.fc1", 1, dim, freq_dim),
        Gemm("t_embedder.fc2", 1, dim, dim),
        Gemm("adaLN", 1, 6 * dim, dim, depth),
        *vit_block_gemms(seq, dim, int(dim * mlp_ratio), depth),
        Gemm("final.adaLN", 1, 2 * dim, dim),
        Gemm("final.linear", tokens, pixels, dim),
        *reg_out,
    ]


def sit_forward_flops(
    depth: int,
    dim: int,
    tokens: int,
    patch: int,
    in_channels: int = 4,
    mlp_ratio: float = 4.0,
    freq_dim: int = 256,
    cls_dim: int | None = None,
) -> float:
    """SiT forward per image, projectors excluded (``cls_dim``: REG, 1 + ``tokens`` through the blocks)."""
    gemms = sit_gemms(depth, dim, tokens, patch, in_channels, mlp_ratio, freq_dim, cls_dim)
    return sum(g.flops for g in gemms) + depth * attention_flops(tokens + (cls_dim is not None), dim)


PROJECTION_LAYER_TYPES = ("mlp", "linear", "conv")  # models/projectors.py


def projector_gemms(
    tokens: int, dim: int, projector_dim: int, z_dims, kind: str = "mlp", kernel_size: int = 3
) -> list[Gemm]:
    """The alignment projectors, one per target encoder, over ``tokens`` tokens: REPA's MLP (dim -> projector_dim
    -> projector_dim -> z), iREPA's "linear" (dim -> z) or "conv" (a kernel_size^2 convolution, dim -> z)."""
    if kind not in PROJECTION_LAYER_TYPES:
        raise ValueError(f"projection layer type {kind!r}; choose one of {PROJECTION_LAYER_TYPES}")
    out = []
    for z in z_dims:
        if kind == "linear":
            out.append(Gemm("proj.linear", tokens, z, dim))
        elif kind == "conv":
            out.append(Gemm("proj.conv", tokens, z, dim * kernel_size * kernel_size))
        else:
            out += [Gemm("proj.0", tokens, projector_dim, dim), Gemm("proj.2", tokens, projector_dim, projector_dim)]
            out.append(Gemm("proj.4", tokens, z, projector_dim))
    return out


def projector_flops(tokens: int, dim: int, projector_dim: int, z_dims, kind: str = "mlp", kernel_size: int = 3):
    return sum(g.flops for g in projector_gemms(tokens, dim, projector_dim, z_dims, kind, kernel_size))


def encoder_tokens(arch: EncoderArch, grid: int) -> int:
    """Tokens a ViT encoder's blocks see: the grid's patches + the class token and registers."""
    return grid * grid + int(arch.class_token) + arch.num_register_tokens


def encoder_gemms(arch: EncoderArch, grid: int) -> list[Gemm]:
    """Every matmul of a ViT target encoder's forward per image on a grid x grid patch grid."""
    tokens = encoder_tokens(arch, grid)
    patch = Gemm("patch_embed", grid * grid, arch.embed_dim, 3 * arch.patch_size**2)
    return [patch, *vit_block_gemms(tokens, arch.embed_dim, arch.ffn_hidden, arch.depth, arch.ffn == "swiglu")]


def encoder_forward_flops(arch: EncoderArch, grid: int) -> float:
    """A ViT target encoder's forward per image on a grid x grid patch grid (+ the class token and registers).
    MAE and CLIP skip the final norm and I-JEPA has no class token; norms are not counted anyway."""
    tokens = encoder_tokens(arch, grid)
    attention = arch.depth * attention_flops(tokens, arch.embed_dim)
    return sum(g.flops for g in encoder_gemms(arch, grid)) + attention


def repa_step_flops(
    depth: int,
    dim: int,
    tokens: int,
    patch: int,
    z_dims=(768,),
    projector_dim: int = 2048,
    encoders=("dinov2-vit-b",),
    encoder_grid: int = 16,
    in_channels: int = 4,
    reg: bool = False,
    projection_layer_type: str = "mlp",
    proj_kernel_size: int = 3,
) -> StepFlops:
    """Per-image FLOPs of one step; ``encoders`` are ``--enc-type`` names (rows of ``ENCODER_ARCHS``); ``reg``: REG's
    class token (width z_dims[0]); ``projection_layer_type`` / ``proj_kernel_size``: iREPA's projectors."""
    enc = sum(encoder_forward_flops(encoder_arch(e), encoder_grid) for e in encoders)
    cls_dim = z_dims[0] if reg else None
    seq = tokens + int(reg)
    return StepFlops(
        sit_forward_flops(depth, dim, tokens, patch, in_channels, cls_dim=cls_dim),
        projector_flops(seq, dim, projector_dim, z_dims, projection_layer_type, proj_kernel_size),
        enc,
    )
