"""Builders of tiny on-disk datasets for the data tests (shapes read from the data, never 256/32 assumed)."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image


def ref_names(i: int) -> tuple[str, str]:
    """The reference tools' file names for sample i (written independently of repa_fast.data)."""
    s = f"{i:08d}"
    return f"{s[:5]}/img{s}.png", f"{s[:5]}/img-mean-std-{s}.npy"


def make_ref_dataset(
    root, ids, *, resolution=32, latent_shape=(8, 4, 4), num_classes=5, moments_dtype=np.float32, seed=0
):
    """Write a REPA-layout dataset for sample numbers ``ids``; returns {id: (image, moments, label)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    img_labels, feat_labels = [], []
    for i in ids:
        img_name, feat_name = ref_names(i)
        image = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)  # (H, W, 3)
        moments = rng.standard_normal(latent_shape).astype(moments_dtype)
        label = int(rng.integers(0, num_classes))
        for sub, name in (("images", img_name), ("vae-sd", feat_name)):
            os.makedirs(os.path.join(root, sub, os.path.dirname(name)), exist_ok=True)
        PIL.Image.fromarray(image).save(os.path.join(root, "images", img_name), compress_level=0)
        np.save(os.path.join(root, "vae-sd", feat_name), moments)
        img_labels.append([img_name, label])
        feat_labels.append([feat_name, label])
        truth[i] = (image.transpose(2, 0, 1), moments.astype(np.float32), label)
    with open(os.path.join(root, "images", "dataset.json"), "w") as f:
        json.dump({"labels": img_labels}, f)
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump({"labels": feat_labels}, f)
    return truth


def feature_path(root, i):
    return os.path.join(root, "vae-sd", ref_names(i)[1])


def image_path(root, i):
    return os.path.join(root, "images", ref_names(i)[0])


def make_jpeg_folder(root, sizes_per_class: dict, seed=0):
    """ImageNet-style folder: {class_name: [(W, H), ...]} random-content JPEGs (smooth, so JPEG keeps them)."""
    rng = np.random.default_rng(seed)
    written = []
    for cls, sizes in sizes_per_class.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for k, (w, h) in enumerate(sizes):
            base = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
            img = PIL.Image.fromarray(base).resize((w, h), PIL.Image.Resampling.BILINEAR)
            path = os.path.join(root, cls, f"{cls}_{k:03d}.JPEG")
            img.save(path, quality=90)
            written.append(path)
    return written


def make_tiny_vae(path, *, downsample_blocks=4, latent_channels=4, seed=0):
    """A random diffusers AutoencoderKL in diffusers layout: 2^(blocks-1) down, e.g. 32 px -> 4x4 latents."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * downsample_blocks,
        up_block_types=("UpDecoderBlock2D",) * downsample_blocks,
        block_out_channels=(8,) * downsample_blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return vae.eval()
