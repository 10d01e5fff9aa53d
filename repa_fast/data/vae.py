"""The SD-VAE: one ``--vae`` resolver (ema | mse | hub id | local dir) and posterior moments (docs/objective.md
§Latents; REPA preprocessing/encoders.py)."""

from __future__ import annotations

import os

import torch

from .common import DataError

VAE_HELP = (
    "pass --vae ema or mse (stabilityai/sd-vae-ft-ema|mse from the Hugging Face hub or its local cache), another "
    "hub id, or a local diffusers directory (config.json + diffusion_pytorch_model.safetensors), e.g. from "
    "`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir PATH` and --vae PATH"
)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The reference's --vae names (REPA generate.py: AutoencoderKL.from_pretrained(f"stabilityai/sd-vae-ft-{vae}")).
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def _resolve_vae_dir(path: str) -> str:
    """``path`` itself, or its ``vae/`` subfolder (a full Stable Diffusion pipeline directory)."""
    for d in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(d, "config.json")):
            if not any(os.path.isfile(os.path.join(d, w)) for w in _WEIGHT_FILES):
                raise DataError(f"{d}: has config.json but no weights ({' or '.join(_WEIGHT_FILES)}); {VAE_HELP}")
            return d
    raise DataError(f"{path}: no VAE weights in diffusers layout (config.json not found); {VAE_HELP}")


def resolve_vae(spec: str) -> str:
    """The local diffusers directory of a ``--vae`` value: ema | mse | a hub id | a local directory.

    One resolver for generate, training previews and preprocessing. A hub id is looked up in the local Hugging Face
    cache first and downloaded only when it is missing there and HF_HUB_OFFLINE is not set.
    """
    spec = str(spec)
    if os.path.isdir(spec):
        return _resolve_vae_dir(spec)
    repo = VAE_ALIASES.get(spec, spec)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")) or os.path.exists(os.path.dirname(repo) or "."):
        raise DataError(f"{spec}: no VAE weights in diffusers layout (no such directory, not a hub id); {VAE_HELP}")
    from repa_fast.errors import require

    snapshot_download = require("huggingface_hub", "vae", "--vae with a hub id").snapshot_download
    patterns = ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json", "vae/*.safetensors"]
    try:
        return _resolve_vae_dir(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_exc:  # not in the cache (huggingface_hub raises several types for that)
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise DataError(
                f"--vae {spec}: {repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {VAE_HELP}"
            ) from cached_exc
    try:
        return _resolve_vae_dir(snapshot_download(repo, allow_patterns=patterns))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"--vae {spec}: could not fetch {repo} ({type(exc).__name__}: {exc}); {VAE_HELP}") from exc


def load_vae(spec: str, device: torch.device | str = "cpu"):
    """diffusers ``AutoencoderKL`` in fp32, eval mode, frozen, from ``resolve_vae(spec)`` (a local directory)."""
    from repa_fast.errors import require

    path = resolve_vae(spec)  # a wrong path is a DataError naming it, also without diffusers
    vae = require("diffusers", "vae", "--vae (SD-VAE encoding/decoding)").AutoencoderKL.from_pretrained(
        path, local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
    )  # plain load; no `accelerate` needed
    return vae.eval().requires_grad_(False).to(device)


def read_vae_config(path: str) -> dict:
    """The VAE's config.json (cheap: no diffusers import, no weights)."""
    import json

    with open(os.path.join(resolve_vae(path), "config.json")) as f:
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
