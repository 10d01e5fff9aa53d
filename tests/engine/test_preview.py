"""Preview grids: EMA model in eval mode, VAE decode from a local diffusers folder, pixel-space demo, loss curve."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast.data.vae import load_vae
from repa_fast.engine.preview import Previewer, plot_loss_curve, save_grid
from repa_fast.models.sit import SiT_models
from repa_fast.sample import class_balanced_labels, decode_to_uint8, euler_sampler

from ..data.helpers import make_tiny_vae


def _random_sit(**kw):
    model = SiT_models["SiT-S/2"](depth=2, z_dims=[], num_classes=5, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model.train()  # the previewer must switch it to eval (no label dropout) and back


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_preview_decodes_latents_with_the_vae(tmp_path):
    make_tiny_vae(str(tmp_path / "vae"))  # 32 px <-> 4x4x4 latents
    # The expected image decodes with the weights as loaded from the folder, as the previewer loads them: the
    # in-memory module make_tiny_vae returns can take another conv path (1e-6 apart with one thread).
    vae = load_vae(str(tmp_path / "vae"))
    model = _random_sit(input_size=4)
    prev = Previewer((8, 4, 4), 5, 0.18215, "linear", torch.device("cpu"), seed=3, vae_path=str(tmp_path / "vae"), n=4)
    path = prev(model, str(tmp_path / "s" / "grid.png"), num_steps=3, cfg_scale=2.0)
    assert model.training  # restored

    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    model.eval()
    x = euler_sampler(model, noise, class_balanced_labels(4, 5), num_steps=3, cfg_scale=2.0).float()
    with torch.no_grad():
        img = vae.decode(x / 0.18215).sample
    save_grid(decode_to_uint8(img.clamp(-1, 1)).numpy(), str(tmp_path / "expected.png"))
    got, expected = _read(path), _read(tmp_path / "expected.png")
    assert got.shape == ((2 * 34 + 2) * 8, (2 * 34 + 2) * 8, 3)  # 2x2 grid of 32 px + 2 px borders, x8 upscale
    assert np.array_equal(got, expected) and got.std() > 0


def test_pixel_space_preview_shows_pixels(tmp_path):
    model = _random_sit(input_size=8, in_channels=3)
    prev = Previewer((6, 8, 8), 5, 1.0, "linear", torch.device("cpu"), seed=0, n=5)
    path = prev(model, str(tmp_path / "g.png"), num_steps=2, cfg_scale=1.0)
    img = _read(path)
    assert img.shape == ((2 * 10 + 2) * 32, (3 * 10 + 2) * 32, 3) and img.std() > 0  # 5 samples: 2 rows x 3


def test_loss_curve_png(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            json.dumps({"step": s, "loss": 1.0 / s, "denoising": 1.2 / s, "alignment": -0.5}) for s in range(1, 6)
        )
    )
    out = plot_loss_curve(str(log), str(tmp_path / "curve.png"))
    assert out and _read(out).std() > 0


def test_missing_vae_dir_is_clear(tmp_path):
    with pytest.raises(Exception, match="vae"):
        Previewer((8, 4, 4), 5, 0.18215, "linear", torch.device("cpu"), seed=0, vae_path=str(tmp_path / "none"))
