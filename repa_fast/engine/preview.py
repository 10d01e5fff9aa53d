"""Preview grids during training and the loss-curve plot of a finished run.

Samples come from the EMA model in eval mode (the reference samples from the raw model in train mode, with label
dropout active: a quirk we fix), with the reference's preview sampler settings (Euler ODE, 50 steps, CFG 4.0).
Latents are decoded with a local diffusers AutoencoderKL when ``--vae`` is given; pixel-space data (the demo) is
shown as is; latents without a VAE are shown as their first three channels, and the log says so.
"""

import json
import logging
import math

import numpy as np
import torch
from PIL import Image

from repa_fast.data.vae import load_vae
from repa_fast.io import atomic_path
from repa_fast.sample import class_balanced_labels, decode_to_uint8, euler_sampler, reg_cls_latents

logger = logging.getLogger("repa_fast")


class Previewer:
    def __init__(
        self,
        latent_shape: tuple,
        num_classes: int,
        latent_scale: float,
        path_type: str,
        device: torch.device,
        seed: int,
        vae_path: str | None = None,
        n: int = 32,
    ):
        c, h, w = latent_shape[0] // 2, latent_shape[1], latent_shape[2]
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(n, c, h, w, generator=gen).to(device)  # fixed across previews
        self.gen = gen  # REG's class-token noise: drawn after the image noise, once (reg_cls_latents)
        self.cls_noise = None
        self.labels = class_balanced_labels(n, num_classes, device=device)
        self.latent_scale, self.path_type = latent_scale, path_type
        self.pixel_space = vae_path is None and c == 3
        self.vae = load_vae(vae_path, device) if vae_path else None
        if self.vae is None and not self.pixel_space:
            logger.info("preview: no --vae given, grids show the first 3 latent channels, not images")

    @torch.no_grad()
    def __call__(self, ema_model: torch.nn.Module, path: str, num_steps: int = 50, cfg_scale: float = 4.0) -> str:
        was_training = ema_model.training
        ema_model.eval()
        if self.cls_noise is None:  # REG: the class token is sampled jointly (docs/methods.md §REG, Sampling)
            self.cls_noise = reg_cls_latents(ema_model, len(self.noise), self.gen, self.noise.device)
        x = euler_sampler(
            ema_model,
            self.noise,
            self.labels,
            num_steps=num_steps,
            cfg_scale=cfg_scale,
            path_type=self.path_type,
            cls_latents=self.cls_noise,
        ).float()
        ema_model.train(was_training)
        if self.vae is not None:
            with torch.no_grad():  # a frozen decoder: no autograd state (and the same conv path as a plain decode)
                x = self.vae.decode(x / self.latent_scale).sample
        elif not self.pixel_space:
            x = x[:, :3] / x[:, :3].abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        else:
            x = x / self.latent_scale
        save_grid(decode_to_uint8(x.clamp(-1, 1)).cpu().numpy(), path)
        return path


def save_grid(images: np.ndarray, path: str) -> None:
    """uint8 (N, H, W, 3) -> one PNG grid, written atomically."""
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = img
    scale = max(1, 256 // max(h, w))  # upscale tiny demo images so the PNG is legible
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def plot_loss_curve(log_path: str, out_path: str) -> str | None:
    """Plot loss / denoising / alignment from log.jsonl; returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("loss curve not drawn: matplotlib is missing (pip install 'repa_fast[demo]')")
        return None
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [r["denoising"] for r in records], label="denoising")
    axes[0].plot(steps, [r["loss"] for r in records], label="total")
    axes[1].plot(steps, [r["alignment"] for r in records], color="C2", label="alignment (-cos)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
