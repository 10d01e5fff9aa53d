"""``digits-ssl``: the embedded demo's target encoder, a small CNN trained on the digits without labels.

Why: a random-weight target (the demo's former ``dinov2-vit-t``) shows the alignment machinery but not the method;
REPA's claim is that aligning to a *good self-supervised* representation helps. This encoder is trained with
SimCLR's contrastive objective (Chen et al. 2020, NT-Xent, Eq. 1; temperature 0.5, 300 steps of 128 pairs) on two
augmented views of each digit (random rotation, scale and +-2 px translation, brightness scaling), labels unused,
on CPU in tens of seconds, once; the weights are cached as safetensors (``--encoder-checkpoint-dir``, else
``~/.cache/repa_fast/encoders``) and reused. A linear probe on its patch-mean features reaches 93.6% on 297
held-out digits, against 88.9% for the same CNN with random weights (``eval.linear_probe.train_probe``, 30 epochs).
Training runs under its own seed in a forked RNG, so building this encoder never changes the run's random streams.

Architecture: uint8 (B, 3, R, R) -> [0, 1] -> bilinear to 16 px -> conv 3x3 (32) -> conv 3x3 stride 2 (64) ->
conv 3x3 (64) -> conv 3x3 (64), ReLUs between -> 8x8 map -> average-pooled to the SiT token grid (``grid``) ->
tokens (B, grid * grid, 64), LayerNorm-ed like DINOv2's patch tokens. The SSL head (pooled tokens -> MLP) is
dropped after training. ``pretrained=False`` gives the same architecture with random weights: the
"REPA with a random encoder" baseline of ``bench/repa_vs_vanilla.py``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("repa_fast.models.encoders")

NAME = "digits-ssl"
FILE = "digits_ssl_encoder.safetensors"
WIDTH = 64
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "repa_fast", "encoders")


def default_dir() -> str:
    """``~/.cache/repa_fast/encoders`` under the HOME of now (DEFAULT_DIR is the one at import)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "repa_fast", "encoders")


class DigitsEncoder(nn.Module):
    def __init__(self, resolution: int, grid: int = 8):
        super().__init__()
        self.enc_name, self.resolution, self.grid, self.embed_dim = NAME, resolution, grid, WIDTH
        self.num_patches = grid * grid  # targets per image (the encoder contract, as DINOv2ViT)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, WIDTH, 3, padding=1),
        )
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)

    @property
    def preprocessing(self) -> dict:
        """What ``tokens`` does to an image before the network (recorded by repa_fast.tools.cache_targets)."""
        return {"scale": "x / 255", "resize": "bilinear, antialias, to 16x16 (when not 16 px)"}

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or 0..255 float (B, 3, R, R) -> the network's (B, WIDTH, 8, 8) map, differentiable."""
        x = images.float() / 255.0
        if x.shape[-1] != 16:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x)

    def tokens(self, images: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 or 0..255 float (B, 3, R, R) -> (B, grid * grid, WIDTH), differentiable (``h``: its feature map)."""
        h = self.feature_map(images) if h is None else h  # (B, WIDTH, 8, 8)
        if h.shape[-1] != self.grid:
            h = F.adaptive_avg_pool2d(h, self.grid)
        return self.norm(h.flatten(2).transpose(1, 2))

    def global_feature(self, h: torch.Tensor) -> torch.Tensor:
        """The pooled global feature (B, WIDTH) of a feature map: the mean of its LayerNorm-ed 8x8 tokens, i.e. the
        representation SimCLR trained (``train_ssl`` feeds ``tokens(...).mean(1)`` at the native grid to its head).
        It is this encoder's class token for REG (docs/methods.md §REG), whatever the target ``grid``."""
        return self.norm(h.flatten(2).transpose(1, 2)).mean(1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, with_cls: bool = False):
        """Targets (B, grid * grid, WIDTH); ``with_cls``: (targets, the pooled global feature (B, WIDTH))."""
        if not with_cls:
            return self.tokens(images)
        h = self.feature_map(images)
        return self.tokens(images, h), self.global_feature(h)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of 0..255 float images (B, 3, 16, 16): affine jitter (rotation +-15 deg, scale 0.85-1.15,
    translation +-2 px) and brightness 0.6-1.0."""
    b = len(x)
    angle = torch.empty(b).uniform_(-0.26, 0.26, generator=g)
    scale = torch.empty(b).uniform_(0.85, 1.15, generator=g)
    shift = torch.empty(b, 2).uniform_(-0.25, 0.25, generator=g)  # in [-1, 1] units: +-2 px at 16 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * torch.empty(b, 1, 1, 1).uniform_(0.6, 1.0, generator=g)


def train_ssl(steps: int = 300, batch: int = 128, seed: int = 0, temperature: float = 0.5) -> DigitsEncoder:
    """SimCLR on the digits (module doc). Deterministic for a seed; runs on CPU."""
    from repa_fast.data.demo import _load_digits, digits_to_uint8

    images = digits_to_uint8(_load_digits().images, 16).float()  # (N, 3, 16, 16), labels unused
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = DigitsEncoder(16, grid=8)
        head = nn.Sequential(nn.Linear(WIDTH, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=2e-3)
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        z = torch.cat([head(enc.tokens(_augment(x, g)).mean(1)) for _ in range(2)])  # (2B, 64)
        z = F.normalize(z, dim=1)
        sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])  # each view's partner
        loss = F.cross_entropy(sim, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc


def build_digits_encoder(
    name: str, resolution: int, checkpoint_dir=None, *, grid: int | None = None, pretrained: bool = True, device=None
) -> DigitsEncoder:
    """The frozen ``digits-ssl`` target (trained and cached on first use when ``pretrained``)."""
    from safetensors.torch import load_file, save_file

    grid = grid or max(1, resolution // 2)
    with torch.random.fork_rng(devices=[]):  # the run's RNG streams do not depend on the cache being warm
        enc = DigitsEncoder(resolution, grid)
    if pretrained:
        from repa_fast.io import atomic_path, ensure_cache_dir

        folder = str(checkpoint_dir) if checkpoint_dir else default_dir()
        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            logger.info("encoder %s: training it on the digits without labels (once, ~seconds); caching %s", name, path)
            ensure_cache_dir(folder, "--encoder-checkpoint-dir", default=default_dir())
            trained = train_ssl()
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp)
        enc.load_state_dict(load_file(path))
        logger.info("encoder %s: self-supervised weights from %s", name, path)
    enc.eval().requires_grad_(False)
    return enc.to(device) if device is not None else enc
