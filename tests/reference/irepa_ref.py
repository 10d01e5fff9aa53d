"""Test-side reimplementation of iREPA's LDM code (End2End-Diffusion/iREPA @ 99ad4ac234ef), the oracle of
tests/test_irepa.py. Written from reading the reference, not copied:

- ``ProjectionLayer``: ldm/models/sit.py:32-79 ("linear": Linear(D, z) per token; "conv": Conv2d(D, z, k, padding
  k // 2) over the (H, W) token grid, via a contiguous NCHW copy);
- ``IrepaSiT``: ldm/models/sit.py:213-362 (REPA's SiT with ``ProjectionLayer`` projectors, forward -> (x, zs,
  zs_original));
- ``spatial_zscore``: ldm/utils.py:113-127 (unbiased std over the token axis, eps 1e-6);
- ``irepa_loss``: ldm/loss.py:73-118 with the cosine projection loss of ldm/projection_loss.py:62-76 and the total
  of ldm/train.py:332-337 (targets z-scored in the loop, train.py:292-330).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.sit_ref import SiTBase, modulate


class ProjectionLayer(nn.Module):
    def __init__(self, projection_layer_type, hidden_size, z_dim, proj_kwargs_kernel_size=3):
        super().__init__()
        self.projection_layer_type = projection_layer_type
        if projection_layer_type == "linear":
            self.projection_layer = nn.Linear(hidden_size, z_dim)
        else:
            k = proj_kwargs_kernel_size
            self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        B, T, D = x.shape
        if self.projection_layer_type == "linear":
            return self.projection_layer(x.reshape(B * T, D)).reshape(B, T, -1)
        H = W = int(math.isqrt(T))
        x_ = x.reshape(B, H, W, D).permute(0, 3, 1, 2).contiguous()
        y = self.projection_layer(x_).permute(0, 2, 3, 1).contiguous()
        return y.reshape(B, T, -1)


class FinalLayer(nn.Module):
    """ldm/models/sit.py:192-210."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class IrepaSiT(SiTBase):
    def _build_heads(self, hidden_size, projector_dim, projection_layer_type="conv", proj_kwargs_kernel_size=3):
        self.projectors = nn.ModuleList(
            ProjectionLayer(projection_layer_type, hidden_size, z, proj_kwargs_kernel_size) for z in self.z_dims
        )
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)

    def forward(self, x, t, y):
        x, c = self.embed(x, t, y)
        x = x + self.pos_embed
        zs = zs_original = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
                zs_original = [x.clone() for _ in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs, zs_original


def spatial_zscore(feat, alpha=1.0, eps=1e-6):
    mean = feat.mean(dim=1, keepdim=True)
    std = feat.std(dim=1, keepdim=True)
    return (feat - alpha * mean) / (std + eps)


def irepa_loss(model, images, y, zs, path_type="linear", proj_coeff=1.0):
    """ldm/loss.py:73-118 (uniform weighting) -> dict(loss, denoising, alignment); zs already z-scored."""
    time_input = torch.rand((images.shape[0], 1, 1, 1)).to(device=images.device, dtype=images.dtype)
    noises = torch.randn_like(images)
    if path_type == "linear":
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - time_input, time_input, -1, 1
    else:
        alpha_t, sigma_t = torch.cos(time_input * np.pi / 2), torch.sin(time_input * np.pi / 2)
        d_alpha_t = -np.pi / 2 * torch.sin(time_input * np.pi / 2)
        d_sigma_t = np.pi / 2 * torch.cos(time_input * np.pi / 2)
    model_input = alpha_t * images + sigma_t * noises
    model_target = d_alpha_t * images + d_sigma_t * noises
    model_output, zs_tilde, zs_tilde_original = model(model_input, time_input.flatten(), y)
    denoising = torch.mean((model_output - model_target) ** 2, dim=list(range(1, model_output.dim())))
    proj_loss = torch.tensor(0.0, dtype=images.dtype)
    for z, z_tilde in zip(zs, zs_tilde):
        cos = (F.normalize(z, dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)  # [B, T]
        proj_loss = proj_loss + (-cos).mean()
    proj_loss /= len(zs)
    den = denoising.mean()
    return {"loss": den + proj_coeff * proj_loss, "denoising": den, "alignment": proj_loss}
