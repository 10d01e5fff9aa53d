"""Whole training-step throughput: repa_fast against a plain-PyTorch re-creation of the reference step, same run.

    python bench/throughput.py                       # CPU: small config (SiT-S/2 + random DINOv2-S), both providers
    python bench/throughput.py --model SiT-XL/2 --enc-type dinov2-vit-b --batch-size 256 --compile   # GPU recipe

Providers:
  reference  the reference train.py step structure: per-sample projection-loss loop (loss.py:80-88), t drawn on the
             CPU and copied, foreach AdamW, clip_grad_norm_, Python per-parameter EMA loop, three .item() syncs per
             step, the encoder with explicit-softmax attention (torch.hub DINOv2 without xformers), --kernels ref.
  repa_fast  repa_fast.engine's micro_step + optimizer_step: fused kernels (--kernels auto: Triton on CUDA),
             SDPA/FlashAttention in SiT and encoder, fused AdamW with on-device skip, foreach EMA, no host sync;
             --compile compiles each SiT block.
  repa_fast_cached  the same step with --targets cached: the batch holds the encoders' targets (computed once
             before timing, as repa_fast.tools.cache_targets stores them, in fp32) instead of images; its TFLOP/s
             count the step without the encoder forward (repa_fast.flops train_step_cached_targets).
Both use synthetic data (uniform uint8 images, Gaussian moments) and the same precision. Reports ms/step, img/s,
achieved TFLOP/s from repa_fast.flops and, on a GPU with a known peak, MFU. Rows are appended to
bench/results/throughput.csv with device, versions and git sha.
"""

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import git_sha  # noqa: E402  (bench/ is on sys.path when run as a script)

from repa_fast import build as B  # noqa: E402
from repa_fast.cli import resolve_config  # noqa: E402
from repa_fast.data import ResumableDistributedSampler  # noqa: E402
from repa_fast.engine import trainer as T  # noqa: E402  (the step functions the trainer runs)
from repa_fast.engine.ema import EMA  # noqa: E402
from repa_fast.engine.metrics import LossMeter  # noqa: E402
from repa_fast.engine.parallel import Backend  # noqa: E402
from repa_fast.flops import repa_step_flops  # noqa: E402
from repa_fast.models.encoder_archs import encoder_arch  # noqa: E402
from repa_fast.models.sit import SIT_SIZES, parse_model_name  # noqa: E402
from repa_fast.objective import interpolant, sample_posterior  # noqa: E402
from repa_fast.recipe import build_recipe  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; add your device if missing.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "A100": 312.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="SiT-XL/2" if cuda else "SiT-S/2")
    p.add_argument("--enc-type", default="dinov2-vit-b" if cuda else "dinov2-vit-s")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 4, help="per-device batch")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--encoder-depth", type=int, default=8 if cuda else 4)
    p.add_argument("--mixed-precision", default="bf16" if cuda else "no", choices=("no", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=20 if cuda else 3)
    p.add_argument("--warmup", type=int, default=5 if cuda else 1)
    p.add_argument(
        "--providers", default="reference,repa_fast", help="comma-separated: reference, repa_fast, repa_fast_cached"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the SiT blocks (repa_fast provider)")
    p.add_argument(
        "--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.csv")
    )
    return p.parse_args(argv)


def make_cfg(args, kernels: str):
    cfg, _ = resolve_config(
        [
            "--model",
            args.model,
            "--enc-type",
            args.enc_type,
            "--no-encoder-pretrained",
            "--data-dir",
            "synthetic",
            "--resolution",
            str(args.resolution),
            "--encoder-depth",
            str(args.encoder_depth),
            "--batch-size",
            str(args.batch_size),
            "--mixed-precision",
            args.mixed_precision,
            "--kernels",
            kernels,
            "--exp-name",
            "bench",
        ]
    )
    return cfg


def synthetic_batch(args, device):
    lat = args.resolution // 8
    image = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8)
    moments = torch.cat([torch.randn(args.batch_size, 4, lat, lat), torch.rand(args.batch_size, 4, lat, lat) * 0.1], 1)
    labels = torch.randint(0, 1000, (args.batch_size,))
    return image.to(device), moments.to(device), labels.to(device)


@dataclass
class SyntheticShape:
    """What ``build.build_models`` reads of a dataset, for ``synthetic_batch``'s data: SD-VAE latents (4 channels,
    resolution / 8) of ``num_classes`` classes."""

    latent_shape: tuple
    resolution: int
    num_classes: int


def synthetic_shape(cfg) -> SyntheticShape:
    r = cfg.data.resolution
    return SyntheticShape((8, r // 8, r // 8), r, cfg.data.num_classes)


def models_from_config(cfg, device, encoder_attn: str | None = None):
    """(SiT, encoders) exactly as training builds them from ``cfg`` (``repa_fast.build.build_models``), for the
    synthetic batch's shape; ``encoder_attn`` overrides the encoders' attention backend (the reference provider)."""
    return B.build_models(cfg, synthetic_shape(cfg), device, attn_backend=encoder_attn)


def build(args, device, kernels: str, encoder_attn: str | None):
    """The config of these flags and its models, built as the trainer builds them (``models_from_config``)."""
    cfg = make_cfg(args, kernels)
    model, encoders = models_from_config(cfg, device, encoder_attn)
    return cfg, model, encoders


class ReferenceStep:
    """The reference train.py step, structure for structure (see the module docstring)."""

    def __init__(self, args, device):
        self.cfg, self.model, self.encoders = build(args, device, "ref", "math")
        self.ema = EMA(self.model).module
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.amp = B.AMP_DTYPES[args.mixed_precision]
        self.scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None

    def __call__(self, batch):
        image, moments, labels = batch
        device = image.device
        x0 = sample_posterior(moments, 0.18215)
        with torch.no_grad(), torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
            zs = [enc(image) for enc in self.encoders]
        t = torch.rand((x0.shape[0], 1, 1, 1)).to(device=device, dtype=x0.dtype)  # CPU draw + copy (loss.py:57)
        noise = torch.randn_like(x0)
        a, s, da, ds = interpolant(t)
        with torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
            out, zs_tilde = self.model(a * x0 + s * noise, t.flatten(), labels)
        den = ((out.float() - (da * x0 + ds * noise)) ** 2).mean(dim=(1, 2, 3))
        proj = 0.0
        for z, z_tilde in zip(zs, zs_tilde):  # loss.py:83-88, a Python loop over the batch
            for z_j, zt_j in zip(z, z_tilde):
                proj += (
                    -(
                        torch.nn.functional.normalize(z_j, dim=-1) * torch.nn.functional.normalize(zt_j.float(), dim=-1)
                    ).sum(-1)
                ).mean()
        proj = proj / (len(zs) * x0.shape[0])
        loss = den.mean() + 0.5 * proj
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_params, params = dict(self.ema.named_parameters()), dict(self.model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():  # train.py:81-91
                ema_params[name].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)
        return loss.item(), proj.item(), grad_norm.item()  # train.py:365-371 syncs every step


class RepaFastStep:
    def __init__(self, args, device, kernels: str = "auto", cached: bool = False):
        self.cfg, model, encoders = build(args, device, kernels, None)
        self.cfg.model.compile = args.compile  # the trainer's per-block compile (inductor), applied by build_phase
        self.encoders = encoders
        self.backend = Backend(device.type)
        recipe = build_recipe(self.cfg)  # the REPA recipe: one phase, constant alignment weight
        fixed = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
        train_model, opt, ema = B.build_phase(self.cfg, self.backend, model, recipe.phase(0), fixed)
        self.scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
        sampler = ResumableDistributedSampler(args.batch_size, args.batch_size)
        self.state = T.State(model, train_model, ema, opt, self.scaler, sampler, recipe=recipe, fixed=fixed)
        self.state.phase = recipe.phase(0)
        self.meter = LossMeter(device)
        self.amp = B.AMP_DTYPES[args.mixed_precision]
        self.cached, self._cached_batch = cached, None

    def __call__(self, batch):
        if self.cached:  # the targets a cache would hold, made once (not timed): the step sees no image
            if self._cached_batch is None:
                with torch.no_grad():
                    self._cached_batch = ([enc(batch[0]).float() for enc in self.encoders], *batch[1:])
            batch = self._cached_batch
        losses = T.micro_step(self.cfg, self.state, self.backend, batch, self.encoders, self.amp, last=True)
        self.meter.add_losses(losses)
        T.optimizer_step(self.cfg, self.state, self.backend, self.meter)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_provider(step, batch, args, device) -> tuple[float, float]:
    """(median seconds per step, seconds of the first step: compilation and lazy initialisation included)."""
    t0 = time.perf_counter()
    step(batch)
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step(batch)
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], first


def step_flops_per_image(args, cached: bool = False) -> float:
    size, patch = parse_model_name(args.model)
    depth, dim, _ = SIT_SIZES[size]
    tokens = (args.resolution // 8 // patch) ** 2
    encs = [n.strip() for n in args.enc_type.split(",")]
    z_dims = [encoder_arch(e).embed_dim for e in encs]
    flops = repa_step_flops(depth, dim, tokens, patch, z_dims=z_dims, encoders=encs, encoder_grid=args.resolution // 16)
    return flops.train_step_cached_targets if cached else flops.train_step


def device_peak(device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.split()[0] in name and k.split()[-1] in name), 0.0)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch = synthetic_batch(args, device)
    flops = step_flops_per_image(args) * args.batch_size
    cuda = device.type == "cuda"
    dev_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = device_peak(device)
    rows, base = [], None
    print(
        f"{args.model} + {args.enc_type}, batch {args.batch_size}, {args.mixed_precision}, {dev_name}; "
        f"{flops / args.batch_size / 1e9:.1f} GFLOP per image per step"
    )
    for name in args.providers.split(","):
        providers = {"reference": ReferenceStep, "repa_fast": RepaFastStep}
        providers["repa_fast_cached"] = lambda a, d: RepaFastStep(a, d, cached=True)
        step = providers[name](args, device)
        sec, first = time_provider(step, batch, args, device)
        tflops = step_flops_per_image(args, cached=name == "repa_fast_cached") * args.batch_size / sec / 1e12
        base = base or sec
        row = {
            "provider": name,
            "ms_per_step": round(sec * 1e3, 2),
            "img_per_s": round(args.batch_size / sec, 2),
            "tflops": round(tflops, 3),
            "mfu": round(tflops / peak, 4) if peak else "",
            "speedup_vs_first": round(base / sec, 3),
            "compile": args.compile,
            "first_step_s": round(first, 2),  # includes torch.compile's compile time with --compile
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "",
        }
        rows.append(row)
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        del step
    meta = {
        "device": dev_name,
        "model": args.model,
        "enc_type": args.enc_type,
        "batch": args.batch_size,
        "precision": args.mixed_precision,
        "torch": torch.__version__,
        "git": git_sha(),
        "time": int(time.time()),
    }
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*meta, *rows[0]])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    if device.type != "cuda":
        print("CPU timings only: GPU throughput and MFU need a CUDA device (run this script there).")
    return rows


if __name__ == "__main__":
    main()
