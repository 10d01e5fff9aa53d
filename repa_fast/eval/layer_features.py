"""Per-layer SiT features and target-encoder features of N dataset images (shared by CKNNA and linear probes).

For each image: x0 from the run's data (``objective.sample_posterior``: pixels on the demo, a VAE posterior sample
otherwise), x_t = alpha_t x0 + sigma_t eps (the run's interpolant, ``objective.interpolant``), the null class
label, and every block's output averaged over its tokens (forward hooks; the model is not changed). The target
is the run's encoder (same name, weights, token grid; a random-weight demo encoder is rebuilt from the run's seed
exactly as training built it) on the clean image, averaged over its patch tokens.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from dataclasses import dataclass

import torch

from repa_fast.config import ConfigError, TrainConfig


@dataclass
class LayerFeatures:
    layers: list[torch.Tensor]  # one (N, D) per block, patch-mean pooled
    target: torch.Tensor | None  # (N, D_enc), patch-mean pooled
    labels: torch.Tensor  # (N,)
    target_name: str


def add_layer_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="repa_fast run directory (or one of its checkpoint directories)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    p.add_argument("--t", type=float, default=0.5, help="interpolation time of x_t (0 = clean; REPA: 0, 0.25, 0.5)")
    p.add_argument("--num-images", type=int, default=1024, help="images of the run's dataset, in order")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--enc-type", default=None, help="target encoder (default: the run's first one)")
    p.add_argument("--encoder-checkpoint-dir", default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise in x_t")
    p.add_argument("--out", default=None, help="output directory (default: <run dir>/eval)")


def _run_config(ckpt: str) -> tuple[TrainConfig, str]:
    from repa_fast.export import find_checkpoint_dir

    ckpt_dir = find_checkpoint_dir(ckpt)
    run = os.path.normpath(os.path.join(ckpt_dir, "..", ".."))
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt {ckpt}: no config.json in {run}; pass a repa_fast run directory")
    cfg = TrainConfig()
    with open(path) as f:
        cfg.update(json.load(f).get("trainer", {}), source=path)
    return cfg, run


def _hidden_states(model, x, t, y) -> list[torch.Tensor]:
    """Each block's output, token-averaged: [(B, D)] * depth."""
    out, hooks = [], [b.register_forward_hook(lambda m, i, o: out.append(o.float().mean(1))) for b in model.blocks]
    try:
        model(x, t, y, return_zs=False)
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def collect_layer_features(args, need_target: bool = True, indices=None) -> LayerFeatures:
    """Features of the first ``args.num_images`` images (or of ``indices``) of the run's dataset (module doc)."""
    from repa_fast.build import build_dataset, build_encoders, seed_everything
    from repa_fast.generate import build_model, load_weights
    from repa_fast.generate import parse_args as generate_args
    from repa_fast.objective import interpolant, sample_posterior

    cfg, run = _run_config(args.ckpt)
    args.out = args.out or os.path.join(run, "eval")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = build_dataset(cfg)
    indices = [i for i in (range(args.num_images) if indices is None else indices) if i < len(dataset)]
    if len(indices) < 4:
        raise ConfigError(f"--num-images {args.num_images}: need at least 4 images (the dataset has {len(dataset)})")
    encoder, name = None, args.enc_type or cfg.target.enc_type.split(",")[0]
    if need_target:
        seed_everything(cfg.run.seed)  # a random-weight target is drawn first after this seed, as in training
        if args.encoder_checkpoint_dir:
            cfg.target.encoder_checkpoint_dir = args.encoder_checkpoint_dir
        (encoder,) = build_encoders(cfg, dataset.resolution, device, enc_type=name)  # as training built it
    gen_args = generate_args(["--ckpt", args.ckpt, "--weights", args.weights])  # generate's defaults, one source
    sd, config = load_weights(gen_args)
    model = build_model(gen_args, sd, config).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    layers, targets, labels = [], [], []
    for start in range(0, len(indices), args.batch_size):
        items = [dataset[i] for i in indices[start : start + args.batch_size]]
        image = torch.stack([it[0] for it in items]).to(device)
        moments = torch.stack([it[1] for it in items]).to(device)
        labels.append(torch.stack([it[2] for it in items]))
        x0 = sample_posterior(moments, cfg.data.latent_scale)
        t = torch.full((len(x0),), float(args.t), device=device)
        alpha, sigma, _, _ = interpolant(t.view(-1, 1, 1, 1), cfg.loss.path_type)
        x_t = alpha * x0 + sigma * torch.randn(x0.shape, device=device, generator=gen)
        y = torch.full((len(x0),), model.num_classes, device=device)  # the null class
        layers.append(_hidden_states(model, x_t, t, y))
        if encoder is not None:
            targets.append(encoder(image).float().mean(1))  # (B, D): patch-mean of the target tokens
    return LayerFeatures(
        layers=[torch.cat([b[i] for b in layers]).cpu() for i in range(len(model.blocks))],
        target=torch.cat(targets).cpu() if targets else None,
        labels=torch.cat(labels),
        target_name=name,
    )


def write_scores(rows: list[dict], out_dir: str, stem: str, key: str, title: str) -> str:
    """``<out_dir>/<stem>.csv`` (atomic) and a PNG plot of ``key`` vs layer; returns the CSV path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'repa_fast[eval]'") from e
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o")
    ax.set(xlabel="SiT layer", ylabel=key, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(out_dir, f"{stem}.png")
    fig.savefig(png + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(png + ".tmp.png", png)
    return path
