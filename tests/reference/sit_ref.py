"""Test-side reimplementation of the SiT that REPA, REG and iREPA share, as their code computes it (the oracle of
tests/test_reg.py and tests/test_irepa.py). Written from reading, not copied:

- sihyun-yu/REPA @ 67f7145 models/sit.py:16-342 (embedders, block, final layer, init, sin-cos table);
- Martinser/REG @ 021ea2e models/sit.py:16-315 (the same SiT with the class token, see reg_ref.py);
- End2End-Diffusion/iREPA @ 99ad4ac ldm/models/sit.py:17-362 (the same SiT with ProjectionLayer, see irepa_ref.py).

Like the references, blocks are built from timm's ``Attention`` and ``Mlp`` (REG models/sit.py:13, 106-136); the
module registration order, the init (``initialize_weights``, REG :227-265) and hence the random draws of a seeded
build are theirs, so a seeded build of this module and of repa_fast's SiT must give identical weights.
Differences kept on purpose: timm >= 1.0 needs ``norm_layer`` for qk-norm, which the references' timm defaulted to
``nn.LayerNorm`` (eps 1e-5); that default is passed here.
"""

import math

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed


def build_mlp(hidden_size, projector_dim, z_dim):
    """REPA/REG models/sit.py:16-23."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """REG models/sit.py:31-69: [cos, sin] of t * exp(-ln(1e4) k / half) computed in fp32, cast to t's dtype."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """REG models/sit.py:72-99: a null row when dropout > 0; labels dropped to num_classes with rand(B) < p."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class SiTBlock(nn.Module):
    """REG models/sit.py:106-136 (timm Attention with qkv bias, optional qk LayerNorm; GELU-tanh Mlp)."""

    def __init__(self, hidden_size, num_heads, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        norm = {"norm_layer": nn.LayerNorm} if qk_norm else {}
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, **norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * 4), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    """MAE's table as REG models/sit.py:323-370 (meshgrid(w, h); [sin, cos] halves; zero rows for extra tokens)."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), 0)
    grid = grid.reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token and extra_tokens > 0:
        emb = np.concatenate([np.zeros([extra_tokens, embed_dim]), emb], axis=0)
    return emb


class SiTBase(nn.Module):
    """The shared skeleton; subclasses build ``projectors`` and ``final_layer`` and add their own modules in the
    reference's registration order (``_build_heads``), then ``initialize_weights``."""

    extra_tokens = 0

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3,
                 class_dropout_prob=0.1, num_classes=1000, z_dims=(24,), projector_dim=64, encoder_depth=2,
                 qk_norm=False, **head_kwargs):  # fmt: skip
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.encoder_depth, self.z_dims = patch_size, encoder_depth, list(z_dims)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.extra_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, qk_norm) for _ in range(depth))
        self._build_heads(hidden_size, projector_dim, **head_kwargs)
        self.initialize_weights()

    def initialize_weights(self):
        """REG models/sit.py:227-265 (REPA :212-248, iREPA :280-316)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(
            self.pos_embed.shape[-1], grid, cls_token=self.extra_tokens, extra_tokens=self.extra_tokens
        )
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for layer in self._zeroed_output_layers():
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def _zeroed_output_layers(self):
        return [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]

    def unpatchify(self, x):
        """REG models/sit.py:267-280 (einsum nhwpqc->nchpwq)."""
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def embed(self, x, t, y):
        """(tokens without position, c = t_emb + y_emb)."""
        return self.x_embedder(x), self.t_embedder(t) + self.y_embedder(y, self.training)
