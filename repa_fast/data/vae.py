"""SD-VAE posterior moments from local diffusers weights (docs/objective.md §Latents; REPA
preprocessing/encoders.py)."""

from __future__ import annotations

import os

import torch

from .common import DataError

VAE_HELP = (
    "download stabilityai/sd-vae-ft-mse in diffusers layout (config.json + diffusion_pytorch_model.safetensors), "
    "e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir PATH`, and pass --vae PATH"
)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _resolve_vae_dir(path: str) -> str:
    """``path`` itself, or its ``vae/`` subfolder (a full Stable Diffusion pipeline directory)."""
    for d in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(d, "config.json")):
            if not any(os.path.isfile(os.path.join(d, w)) for w in _WEIGHT_FILES):
                raise DataError(f"{d}: has config.json but no weights ({' or '.join(_WEIGHT_FILES)}); {VAE_HELP}")
            return d
    raise DataError(f"{path}: no VAE weights in diffusers layout (config.json not found); {VAE_HELP}")


def load_vae(path: str, device: torch.device | str = "cpu"):
    """diffusers ``AutoencoderKL`` in fp32, eval mode, frozen, from a local directory only."""
    from repa_fast.errors import require

    vae_dir = _resolve_vae_dir(str(path))  # a wrong path is a DataError naming it, also without diffusers
    vae = require("diffusers", "vae", "--vae (SD-VAE encoding/decoding)").AutoencoderKL.from_pretrained(
        vae_dir, local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
    )  # plain load; no `accelerate` needed
    return vae.eval().requires_grad_(False).to(device)


def read_vae_config(path: str) -> dict:
    """The VAE's config.json (cheap: no diffusers import, no weights)."""
    import json

    with open(os.path.join(_resolve_vae_dir(str(path)), "config.json")) as f:
        return json.load(f)


def latent_geometry(config, resolution: int) -> tuple[int, int, int]:
    """(2C, h, w) of the moments for ``resolution`` px inputs from a VAE config (8x down, C = 4 for SD-VAE)."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % factor:
        raise DataError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    h = resolution // factor
    return (2 * int(config.get("latent_channels", 4)), h, h)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 2C, h, w) fp32 ``[mean, std]``; std = exp(0.5 * clamp(logvar, -30, 20)).

    Pixels are scaled to [-1, 1] as ``x / 127.5 - 1`` (REPA's StabilityVAEEncoder.encode_pixels), and the
    moments are diffusers' DiagonalGaussianDistribution ``mean`` and ``std``.
    """
    device = next(vae.parameters()).device
    x = images.to(device=device, dtype=torch.float32) / 127.5 - 1
    dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()
