"""SiT with adaLN-Zero and REPA projectors (docs/objective.md §Model and §Projector).

A drop-in for the reference ``models/sit.py`` of REPA: same model names, constructor keywords, forward signature
``model(x, t, y) -> (prediction, zs)`` and state-dict keys, so released REPA checkpoints load with ``strict=True``.
Differences (all fixes, docs/objective.md §Model): SiT-S works (the reference builds its final layer at width 768),
the label dropout rate is ``class_dropout_prob`` (the reference hard-codes 0.1), projectors are skipped when
``return_zs=False``, and ``encoder_depth`` outside 1..depth is a clear error instead of an UnboundLocalError.

Switches have one name each down the module tree: ``impl`` ("auto" | "triton" | "ref") picks the Triton kernels or
their PyTorch references, ``attn_backend`` the attention backend (``repa_fast.kernels.attention.BACKENDS``).
``SiT`` also takes the reference's ``fused_attn`` keyword (False = ``attn_backend="math"``, timm's explicit softmax).

The REPA family (docs/methods.md): ``reg=True`` is REG's SiT (Martinser/REG models/sit.py: the noisy encoder class
token joins the tokens, with ``cls_projectors2``, ``wg_norm``, ``final_layer.linear_cls`` and a (1, 1 + T, D)
``pos_embed``, so REG's checkpoints load with ``strict=True``); ``projection_layer_type`` / ``proj_kernel_size`` pick
iREPA's projectors (``repa_fast.models.projectors``).

Model code is single-device: compile and parallelism are applied from ``repa_fast.engine``.
"""

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.errors import ConfigError
from repa_fast.kernels import (
    adaln_modulate,
    apply_rope_2d,
    attention,
    gated_residual,
    gated_residual_adaln,
    linear_gelu,
    qk_norm_rope,
    rope_2d_cos_sin,
)
from repa_fast.kernels._dispatch import IMPLS, autocast_dtype
from repa_fast.kernels.attention import BACKENDS

from .projectors import build_mlp, build_projector, check_projector_options, project  # noqa: F401 (build_mlp: API)


class PatchEmbed(nn.Module):
    """Conv2d patchify (kernel = stride = p, with bias) -> (N, T, D) tokens in row-major order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by patch_size {patch_size}")
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The transpose alone leaves the tokens D-strided (strides (T*D, 1, T)): block 0 would read another layout
        # than blocks 1..depth-1 (a recompile of the per-block compiled module, strided loads, a copy inside every
        # LayerNorm of the reference path). One copy of the conv output gives every block the same contiguous stream;
        # the values are unchanged, bit for bit.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features of the raw t in [0, 1] (order [cos, sin]) -> Linear - SiLU - Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The reference casts the fp32 features to t's dtype before the MLP (models/sit.py:60-63).
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index num_classes) used for label dropout / classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # Always a null row (docs/objective.md §Model). The reference omits it when dropout_prob == 0, which breaks CFG
        # sampling and the "rows - 1 = classes" rule other tools use; with the reference's 0.1 the shapes are the same.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 (D -> 4D) - GELU(tanh) - fc2, as timm's Mlp in the reference; fc1's bias + GELU is one fused op
    (``kernels.linear_gelu``; with impl="ref" exactly the reference's ``gelu(fc1(x))``). A converted fc1 (another
    class than nn.Linear, e.g. fp8 training's Float8Linear) keeps its own forward: ``gelu(fc1(x))``."""

    def __init__(self, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.fc1) is nn.Linear:
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias, impl=self.impl))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head qk LayerNorm (timm keys qkv, q_norm, k_norm, proj).

    ``attn_backend="math"`` is the reference's explicit-softmax path (``--no-fused-attn``).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attn_backend: str = "auto", impl="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_backend, self.impl = attn_backend, impl

    def forward(self, x: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # each (B, N, H, Dh)
        cos, sin = rope if rope is not None else (None, None)
        if isinstance(self.q_norm, nn.LayerNorm):  # docs/objective.md §RoPE: qk-norm then RoPE, one fused op per tensor
            qn, kn = self.q_norm, self.k_norm
            q = qk_norm_rope(q, qn.weight, qn.bias, cos, sin, eps=qn.eps, impl=self.impl)
            k = qk_norm_rope(k, kn.weight, kn.bias, cos, sin, eps=kn.eps, impl=self.impl)
        elif rope is not None:
            q = apply_rope_2d(q, cos, sin, impl=self.impl)
            k = apply_rope_2d(k, cos, sin, impl=self.impl)
        x = attention(q, k, v, attn_backend=self.attn_backend)  # (B, N, H, Dh)
        return self.proj(x.reshape(B, N, D))


class SiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 * Attn(mod(LN(x), s1, c1)); x += g2 * MLP(mod(LN(x), s2, c2)).

    The LN + modulate, the gated residual + next LN + modulate and the last gated residual are single fused ops
    (repa_fast.kernels); LayerNorms have no affine and eps 1e-6, as in the reference. Under autocast the modulated
    LN outputs are written in the autocast dtype their GEMMs read; the residual stream x stays fp32.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, attn_backend="auto", impl="auto"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, attn_backend=attn_backend, impl=impl)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), impl=impl)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.impl = impl

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, D)
        amp = autocast_dtype(x)  # h feeds the qkv / fc1 GEMMs: written in the dtype they read (None: no autocast)
        h = adaln_modulate(x, shift1, scale1, impl=self.impl, y_dtype=amp)
        x, h = gated_residual_adaln(x, self.attn(h, rope), gate1, shift2, scale2, impl=self.impl, y_dtype=amp)
        return gated_residual(x, self.mlp(h), gate2, impl=self.impl)


class FinalLayer(nn.Module):
    """(shift, scale) = Linear(SiLU(c)); Linear(mod(LN(x), shift, scale)) -> p*p*C per token.

    With ``cls_dim`` (REG): ``linear_cls`` = Linear(D, cls_dim) reads the modulated class token (token 0) and
    ``linear`` the T patch tokens (Martinser/REG models/sit.py:143-163); forward then returns (patches, cls_v).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, impl="auto", cls_dim: int | None = None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if cls_dim is not None:
            self.linear_cls = nn.Linear(hidden_size, cls_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.impl = impl

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = adaln_modulate(x, shift, scale, impl=self.impl, y_dtype=autocast_dtype(x))  # (N, T, D) or (N, 1 + T, D)
        if not hasattr(self, "linear_cls"):
            return self.linear(h)
        return self.linear(h[:, 1:]), self.linear_cls(h[:, 0])  # (N, T, p*p*C), (N, cls_dim)


class SiT(nn.Module):
    """Scalable Interpolant Transformer with REPA projectors at block ``encoder_depth`` (1-indexed).

    ``reg``: REG's class token (docs/methods.md §REG); ``projection_layer_type`` ("mlp" | "linear" | "conv") and
    ``proj_kernel_size``: iREPA's projectors (§iREPA). A conv projector with ``reg=True`` is refused (ConfigError).
    """

    def __init__(
        self,
        path_type: str = "edm",  # kept for signature compatibility; the model does not use it
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        decoder_hidden_size: int | None = None,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = False,  # kept for signature compatibility; the reference model never reads it
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        fused_attn: bool = True,  # the reference's keyword: False is attn_backend="math"
        attn_backend: str = "auto",
        impl: str = "auto",
        use_rope: bool = False,
        reg: bool = False,
        projection_layer_type: str = "mlp",
        proj_kernel_size: int = 3,
    ):
        super().__init__()
        if decoder_hidden_size not in (None, hidden_size):
            raise ValueError(
                f"decoder_hidden_size={decoder_hidden_size} differs from hidden_size={hidden_size}; the final layer "
                "reads the residual stream, so they must match (the reference's SiT-S crash). Leave it unset."
            )
        z_dims = list(z_dims or [])
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth={encoder_depth} must be in 1..{depth} (the model has {depth} blocks)")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        check_projector_options(projection_layer_type, proj_kernel_size, reg)
        if reg and not z_dims:
            raise ConfigError("reg=True needs z_dims: the class token's width is z_dims[0] (the first encoder's)")
        if not fused_attn:
            if attn_backend not in ("auto", "math"):
                raise ValueError(
                    f"fused_attn=False is attn_backend='math'; it contradicts attn_backend={attn_backend!r}"
                )
            attn_backend = "math"
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes
        self.encoder_depth, self.z_dims, self.impl, self.attn_backend = encoder_depth, z_dims, impl, attn_backend

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.reg, self.projection_layer_type = reg, projection_layer_type
        self.cls_dim = z_dims[0] if reg else None  # REG's cls_token_dim = z_dims[0] (REG models/sit.py:217-218)
        # REG: one more position, the class token's, first (REG models/sit.py:208).
        self.pos_embed = nn.Parameter(torch.zeros(1, int(reg) + num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attn_backend=attn_backend, impl=impl)
            for _ in range(depth)
        )
        self.projectors = nn.ModuleList(
            build_projector(projection_layer_type, hidden_size, projector_dim, z, proj_kernel_size) for z in z_dims
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, impl=impl, cls_dim=self.cls_dim)
        if reg:  # the noisy class token's embedding: Linear(z, D) then an affine LayerNorm (REG models/sit.py:222-223)
            self.cls_projectors2 = nn.Linear(self.cls_dim, hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.use_rope = use_rope
        if use_rope:  # not persistent: checkpoints keep the reference keys
            g = self.x_embedder.grid_size
            cos, sin = rope_2d_cos_sin(hidden_size // num_heads, g, g)
            if reg:  # the class token is not rotated: an identity row first (docs/methods.md §REG with RoPE)
                cos, sin = torch.cat([torch.ones_like(cos[:1]), cos]), torch.cat([torch.zeros_like(sin[:1]), sin])
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Init of docs/objective.md §Model: xavier Linear (qkv as one matrix), zero biases, adaLN and output layers
        zeroed."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.x_embedder.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        if self.reg:  # a zero row for the class token (REG models/sit.py:237-240, MAE's cls_token=1)
            pos = np.concatenate([np.zeros([1, pos.shape[1]]), pos], axis=0)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # as a Linear on the (D, C p p) view
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        zeroed = (self.final_layer.adaLN_modulation[-1], self.final_layer.linear)
        for layer in zeroed + ((self.final_layer.linear_cls,) if self.reg else ()):  # REG models/sit.py:259-265
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W), via (N, h, w, p, p, C) as the reference (with PR #23's w*p fix)."""
        c, p, g = self.out_channels, self.patch_size, self.x_embedder.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(
        self,
        x,
        t,
        y,
        return_logvar: bool = False,
        return_zs: bool = True,
        num_blocks: int | None = None,
        align_depth: int | None = None,
        use_rope: bool | None = None,
        cls_token: torch.Tensor | None = None,
    ):
        """x (N, C, H, W) noisy input, t (N,) in [0, 1], y (N,) labels -> (velocity (N, C, H, W), zs).

        zs is one (N, T, z_dim) tensor per projector, or [] when ``return_zs`` is False (projectors skipped).
        ``num_blocks`` truncates the forward after that many blocks and returns (None, zs): ERW's warm-up phase,
        where nothing after them is computed (README §ERW). ``align_depth`` overrides the block the
        projectors read (default ``encoder_depth``) and ``use_rope=False`` turns RoPE off for this call.

        REG (``reg=True``, docs/methods.md §REG): ``cls_token`` (N, z_dims[0]) is the noisy class token; it joins the
        tokens first, each zs[k] has 1 + T tokens (class token first), and the result is (velocity, zs, cls_v)
        with cls_v (N, z_dims[0]) the class token's velocity ((None, zs, None) when truncated).
        """
        x = self._embed_tokens(x, cls_token)  # (N, T, D), or (N, 1 + T, D) with REG
        N, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        rope = (self.rope_cos, self.rope_sin) if self.use_rope and use_rope is not False else None
        align_at = align_depth or self.encoder_depth
        zs = []
        blocks = self.blocks if num_blocks is None else self.blocks[:num_blocks]
        for i, block in enumerate(blocks):
            x = block(x, c, rope)
            if return_zs and self.projectors and i + 1 == align_at:
                zs = [project(proj, x, self.x_embedder.grid_size) for proj in self.projectors]
        if num_blocks is not None:
            return (None, zs, None) if self.reg else (None, zs)
        if not self.reg:
            return self.unpatchify(self.final_layer(x, c)), zs
        x, cls_v = self.final_layer(x, c)
        return self.unpatchify(x), zs, cls_v

    def _embed_tokens(self, x: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens + position embedding; with REG, [wg_norm(cls_projectors2(cls_token)), patches] + pos_embed
        (REG models/sit.py:291-297)."""
        if not self.reg:
            if cls_token is not None:
                raise ValueError("cls_token was given to a SiT built without reg=True: build it with reg=True (REG)")
            return self.x_embedder(x) + self.pos_embed
        if cls_token is None or cls_token.shape != (x.shape[0], self.cls_dim):
            got = None if cls_token is None else tuple(cls_token.shape)
            raise ValueError(
                f"a REG SiT (reg=True) needs cls_token=(noisy class token) of shape ({x.shape[0]}, {self.cls_dim}), "
                f"got {got}; training_loss passes it from cls_targets, the samplers from cls_latents"
            )
        cls = self.wg_norm(self.cls_projectors2(cls_token))  # (N, D)
        return torch.cat([cls[:, None], self.x_embedder(x)], dim=1) + self.pos_embed


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE 2-D sin-cos embedding (float64), (grid_size**2, embed_dim). The first half of the channels encodes the
    column index and the second half the row index, each as [sin, cos] (the reference's meshgrid(w, h) order)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_a = _get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_b = _get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def _get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# name: (depth, hidden_size, num_heads). "T" (tiny) is a repa_fast addition for the embedded demo and tests.
SIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (6, 192, 3)}


def _make_constructor(size: str, patch: int):
    depth, hidden, heads = SIT_SIZES[size]

    def constructor(**kwargs) -> SiT:
        kwargs.setdefault("depth", depth)
        return SiT(hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    constructor.__name__ = f"SiT_{size}_{patch}"
    constructor.__doc__ = f"SiT-{size}/{patch}: depth {depth}, width {hidden}, {heads} heads, patch {patch}."
    return constructor


SIT_PATCHES = (2, 4, 8)
SiT_models = {f"SiT-{s}/{p}": _make_constructor(s, p) for s in SIT_SIZES for p in SIT_PATCHES}


def parse_model_name(name: str) -> tuple[str, int]:
    """``"SiT-XL/2"`` -> ("XL", 2): the size key of ``SIT_SIZES`` and the patch size; ValueError listing the names."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(SiT_models)}")
    size, patch = name[len("SiT-") :].split("/")
    return size, int(patch)


def build_sit(name: str, **kwargs) -> SiT:
    """``SiT_models[name](**kwargs)`` with an error that lists the valid names."""
    parse_model_name(name)
    return SiT_models[name](**kwargs)
