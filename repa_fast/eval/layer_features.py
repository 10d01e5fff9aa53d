"""Per-layer SiT features and target-encoder features of N dataset images (shared by CKNNA and linear probes).

For each image: x0 from the run's data (``objective.sample_posterior``: pixels on the demo, a VAE posterior sample
otherwise), x_t = alpha_t x0 + sigma_t eps (the run's interpolant, ``objective.interpolant``), the null class
label, and every block's output averaged over its tokens (forward hooks; the model is not changed). The target
is the run's encoder (same name, weights, token grid; a random-weight demo encoder is rebuilt from the run's seed
exactly as training built it) on the clean image, averaged over its patch tokens.

REG runs (docs/methods.md §REG): the model also reads the noisy class token, built as training builds it,
alpha_t c + sigma_t eps with c the target encoder's class token of the clean image; the class token's row is left
out of every block's average, so the features (and CKNNA over them) are over the same patch tokens as REPA's.

``collect_layer_features(LayerFeatureOptions(ckpt=RUN_DIR, t=0.5, ...))``; the options and their defaults are
``repa_fast.options.LayerFeatureOptions`` (the CLIs' flags: ``repa_fast.cli_flags.add_layer_feature_flags``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

import torch

from repa_fast.config import ConfigError
from repa_fast.io import atomic_path, write_text
from repa_fast.options import LayerFeatureOptions, ModelOptions


@dataclass
class LayerFeatures:
    layers: list[torch.Tensor]  # one (N, D) per block, patch-mean pooled
    target: torch.Tensor | None  # (N, D_enc), patch-mean pooled
    labels: torch.Tensor  # (N,)
    target_name: str
    run_dir: str = ""  # the run the features come from

    def out_dir(self, opts: LayerFeatureOptions) -> str:
        """Where the scores go: ``opts.out``, else <run dir>/eval."""
        return opts.out or os.path.join(self.run_dir, "eval")


def _hidden_states(model, x, t, y, cls_token=None) -> list[torch.Tensor]:
    """Each block's output averaged over its patch tokens: [(B, D)] * depth (REG's class token, row 0, left out)."""
    first = 1 if cls_token is not None else 0
    out = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(o[:, first:].float().mean(1))) for b in model.blocks]
    try:
        model(x, t, y, return_zs=False, **({"cls_token": cls_token} if cls_token is not None else {}))
    finally:
        for h in hooks:
            h.remove()
    return out


def _load_run(opts: LayerFeatureOptions):
    """``opts.ckpt`` read: a repa_fast run (its config.json names the data, the encoder and the seed)."""
    from repa_fast.engine.checkpoint import load_run

    run = load_run(opts.ckpt, which=opts.weights)
    if run.config_path is None:
        raise ConfigError(f"--ckpt {opts.ckpt}: no config.json in its run directory; pass a repa_fast run directory")
    return run


def _target_encoder(opts: LayerFeatureOptions, cfg, resolution: int, device):
    """The run's target encoder named by ``opts.enc_type`` (default: the first), built as training built it."""
    from repa_fast.build import build_encoders, seed_everything

    seed_everything(cfg.run.seed)  # a random-weight target is drawn first after this seed, as in training
    if opts.encoder_checkpoint_dir:
        cfg.target.encoder_checkpoint_dir = opts.encoder_checkpoint_dir
    (encoder,) = build_encoders(cfg, resolution, device, enc_type=opts.enc_type or cfg.target.enc_type.split(",")[0])
    return encoder


@torch.no_grad()
def collect_layer_features(opts: LayerFeatureOptions, need_target: bool = True, indices=None) -> LayerFeatures:
    """Features of the first ``opts.num_images`` images (or of ``indices``) of the run's dataset (module doc)."""
    from repa_fast.build import build_dataset
    from repa_fast.generate import build_model
    from repa_fast.objective import interpolant, sample_posterior

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = _load_run(opts)
    cfg = run.config
    dataset = build_dataset(cfg)
    indices = [i for i in (range(opts.num_images) if indices is None else indices) if i < len(dataset)]
    if len(indices) < 4:
        raise ConfigError(f"--num-images {opts.num_images}: need at least 4 images (the dataset has {len(dataset)})")
    name = opts.enc_type or cfg.target.enc_type.split(",")[0]
    model = build_model(ModelOptions(), run).to(device)  # generate's defaults: one source
    reg = bool(getattr(model, "reg", False))
    encoder = _target_encoder(opts, cfg, dataset.resolution, device) if need_target or reg else None
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    layers, targets, labels = [], [], []
    for start in range(0, len(indices), opts.batch_size):
        items = [dataset[i] for i in indices[start : start + opts.batch_size]]
        image = torch.stack([it[0] for it in items]).to(device)
        moments = torch.stack([it[1] for it in items]).to(device)
        labels.append(torch.stack([it[2] for it in items]))
        x0 = sample_posterior(moments, cfg.data.latent_scale)
        t = torch.full((len(x0),), float(opts.t), device=device)
        alpha, sigma, _, _ = interpolant(t.view(-1, 1, 1, 1), cfg.loss.path_type)
        x_t = alpha * x0 + sigma * torch.randn(x0.shape, device=device, generator=gen)
        y = torch.full((len(x0),), model.num_classes, device=device)  # the null class
        tokens, cls_token = encoder(image, with_cls=True) if reg else (encoder(image) if encoder else None, None)
        if reg:  # REG's noisy class token at the same t (training's interpolant)
            a, s = alpha.view(-1, 1), sigma.view(-1, 1)
            cls_token = a * cls_token.float() + s * torch.randn(cls_token.shape, device=device, generator=gen)
        layers.append(_hidden_states(model, x_t, t, y, cls_token))
        if need_target:
            targets.append(tokens.float().mean(1))  # (B, D): patch-mean of the target tokens
    return LayerFeatures(
        layers=[torch.cat([b[i] for b in layers]).cpu() for i in range(len(model.blocks))],
        target=torch.cat(targets).cpu() if targets else None,
        labels=torch.cat(labels),
        target_name=name,
        run_dir=os.path.dirname(run.config_path),
    )


def write_scores(rows: list[dict], out_dir: str, stem: str, key: str, title: str) -> str:
    """``<out_dir>/<stem>.csv`` and a PNG plot of ``key`` vs layer, both atomic; returns the CSV path."""
    os.makedirs(out_dir, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    path = write_text(os.path.join(out_dir, f"{stem}.csv"), text.getvalue())
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
    with atomic_path(os.path.join(out_dir, f"{stem}.png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
