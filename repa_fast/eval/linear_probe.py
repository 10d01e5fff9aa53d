"""Per-layer linear probes of a SiT's hidden states (REPA Fig. 3 style): top-1 accuracy vs layer.

    python -m repa_fast.eval.linear_probe --ckpt RUN_DIR --t 0.0 --num-images 50000 --val-images 10000

Protocol, as the REPA maintainers describe it (sihyun-yu/REPA issues 32 and 55: "followed the setup in MAE"):
the null class label, each block's output averaged over tokens (``repa_fast.eval.layer_features``), then
BatchNorm1d without affine parameters followed by a Linear classifier (He et al. 2022, MAE, Sec. A.2 linear
probing: "an extra BatchNorm layer without affine transformation"), trained with cross-entropy, batch 256 here,
base lr 0.1 scaled by batch / 256, momentum 0.9, no weight decay, cosine schedule, 90 epochs by default. MAE uses
LARS at batch 16384; at batch 256 we use plain SGD (LARS' layer-wise trust ratio matters for huge batches). The
first ``--num-images`` images train the probe, the next ``--val-images`` are held out and give top-1.
Writes ``linear_probe_t<t>.csv`` and ``.png``.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast import errors
from repa_fast.config import ConfigError


def train_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    seed: int = 0,
) -> float:
    """Top-1 accuracy on (x_val, y_val) of BatchNorm1d(affine=False) + Linear trained on (x_train, y_train)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = nn.Sequential(nn.BatchNorm1d(x_train.shape[1], affine=False), nn.Linear(x_train.shape[1], num_classes))
    nn.init.trunc_normal_(probe[1].weight, std=0.01)  # MAE's head init
    nn.init.zeros_(probe[1].bias)
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    total, step = epochs * steps_per_epoch, 0
    probe.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        return float((probe(x_val).argmax(1) == y_val).float().mean())


def parse_args(argv=None):
    """(layer-feature options, the probe's own flags) from the command line."""
    from repa_fast import cli_flags
    from repa_fast.options import LayerFeatureOptions

    p = cli_flags.parser("python -m repa_fast.eval.linear_probe", __doc__)
    cli_flags.add_layer_feature_flags(p)
    g = p.add_argument_group("probe")
    g.add_argument("--val-images", type=int, default=256, help="held-out images after the training ones")
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--probe-batch-size", type=int, default=256)
    g.add_argument("--base-lr", type=float, default=0.1)
    ns = p.parse_args(argv)
    return cli_flags.options_from(ns, LayerFeatureOptions), ns


def probe_layers(feats, n: int, epochs: int = 90, batch_size: int = 256, base_lr: float = 0.1, seed: int = 0):
    """Top-1 of a probe per layer, trained on the first ``n`` images' features and tested on the rest."""
    y = feats.labels
    num_classes = int(y.max()) + 1
    return [
        {
            "layer": i + 1,
            "top1": train_probe(h[:n], y[:n], h[n:], y[n:], num_classes, epochs, batch_size, base_lr, seed),
        }
        for i, h in enumerate(feats.layers)
    ]


@errors.entry_point("python -m repa_fast.eval.linear_probe")
def main(argv=None) -> int:
    from repa_fast.eval.layer_features import collect_layer_features, write_scores

    opts, args = parse_args(argv)
    if args.val_images < 1 or args.epochs < 1:
        raise ConfigError("--val-images and --epochs must be positive")
    n = opts.num_images
    feats = collect_layer_features(opts, need_target=False, indices=range(n + args.val_images))
    if len(feats.labels) < n + args.val_images:
        raise ConfigError(
            f"the dataset has {len(feats.labels)} images; --num-images {n} + --val-images {args.val_images} is more"
        )
    rows = probe_layers(feats, n, args.epochs, args.probe_batch_size, args.base_lr, opts.seed)
    title = f"linear probe top-1, t = {opts.t}"
    path = write_scores(rows, feats.out_dir(opts), f"linear_probe_t{opts.t}", "top1", title)
    best = max(rows, key=lambda r: r["top1"])
    print(f"wrote {path}: best layer {best['layer']} (top-1 {best['top1']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
