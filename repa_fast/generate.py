"""Sample a trained model into the ADM evaluator's .npz (the reference generate.py, with its flag names).

    torchrun --nproc_per_node 8 -m repa_fast.generate --ckpt RUN_DIR --vae sd-vae-ft-ema --preset paper
    python -m repa_fast.generate --ckpt ema.pt --model SiT-XL/2 --vae DIR --num-fid-samples 50000 \
        --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7            # = --preset paper

``--ckpt`` takes a repa_fast run or checkpoint directory (its config.json supplies model, resolution and classes),
a reference/ERW train.py checkpoint, REPA's released last.pt (a bare state dict) or an exported ``{'ema': ...}``
file (then pass --model like generate.py; files are read with weights_only, argparse.Namespace the only class).
``--vae ema|mse`` is stabilityai/sd-vae-ft-ema|mse (hub or local cache) as in generate.py, or a local directory;
it is loaded before the first sample. ``--legacy`` remaps decoder_blocks.* keys; RoPE (ERW) comes from the file's
saved args, else ``--use-rope``, else config.json, and the choice is printed. Defaults are
generate.py's (ode, 50 steps, cfg 1.5); ``--preset paper`` sets REPA's README evaluation (SDE, 250 steps, cfg 1.8,
guidance interval [0, 0.7]). Differences from generate.py, on purpose: images are rounded, not truncated
(``--rounding truncate`` restores it); labels are class-balanced (``--labels random`` restores generate.py's draws);
no PNG round trip: each process writes its share as an .npz part, rank 0 merges them into one file whose name
records every sampling setting; the z_dims/encoder depth/qk-norm of the checkpoint are read from its keys.
"""

import argparse
import json
import logging
import math
import os
import sys

import numpy as np
import torch

from repa_fast import errors
from repa_fast.config import AT_LEAST_1, NON_NEGATIVE, PROBABILITY, Range
from repa_fast.engine.checkpoint import CheckpointError, load_tensors
from repa_fast.evaluate import add_eval_args
from repa_fast.export import find_checkpoint_dir
from repa_fast.models.sit import build_sit, parse_model_name
from repa_fast.sample import SAMPLERS, class_balanced_labels, decode_to_uint8, save_npz, shard_bounds

logger = logging.getLogger("repa_fast")

PRESETS = {"paper": {"mode": "sde", "num_steps": 250, "cfg_scale": 1.8, "guidance_low": 0.0, "guidance_high": 0.7}}

# Valid values of the numeric flags (repa_fast.config.Range, as the training options).
CHECKS = {
    "num_fid_samples": AT_LEAST_1,
    "per_proc_batch_size": AT_LEAST_1,
    "num_steps": AT_LEAST_1,
    "global_seed": NON_NEGATIVE,
    "cfg_scale": Range(1, note="1 = no guidance"),
    "guidance_low": PROBABILITY,
    "guidance_high": PROBABILITY,
    "resolution": AT_LEAST_1,
    "num_classes": AT_LEAST_1,
    "in_channels": AT_LEAST_1,
    "latent_scale": Range(0, lo_open=True),
}


def check_args(args) -> None:
    """Every numeric flag in its range, else a ConfigError naming flag, value and range."""
    for name, check in CHECKS.items():
        value = getattr(args, name)
        if value is not None and value not in check:
            raise errors.ConfigError(f"--{name.replace('_', '-')} must be {check}, got {value}")
    if args.guidance_low > args.guidance_high:
        raise errors.ConfigError(
            f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}; the guidance "
            "interval needs low <= high"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m repa_fast.generate",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="run dir, checkpoint dir, a reference/ERW train.py .pt file or REPA's released last.pt (bare state dict)",
    )
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a repa_fast checkpoint")
    p.add_argument("--model", default=None, help="SiT_models name (default: from the run's config.json)")
    p.add_argument("--resolution", type=int, default=None, help="256 or 512 (default: from config.json, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from config.json, else 1000")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--latent-scale", type=float, default=None, help="default: config.json's, else 0.18215")
    p.add_argument(
        "--vae",
        default=None,
        help="ema | mse (stabilityai/sd-vae-ft-*, hub or local cache), a hub id or a local diffusers directory; "
        "none = pixel space. Default: ema for latent models (as generate.py), none for pixel-space runs",
    )
    p.add_argument(
        "--use-rope",
        "--use_rope",
        dest="use_rope",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="RoPE (ERW); it leaves no key, so: the file's saved args, else this flag, else the run's config.json",
    )
    p.add_argument(
        "--legacy",
        action="store_true",
        help="remap the old decoder_blocks.i keys to blocks.(i + --encoder-depth) as generate.py --legacy",
    )
    p.add_argument("--encoder-depth", type=int, default=None, help="projector block (default: config.json, else 8)")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--num-fid-samples", type=int, default=50000)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="paper = REPA README evaluation")
    p.add_argument("--mode", choices=sorted(SAMPLERS), default="ode")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--path-type", choices=("linear", "cosine"), default="linear")
    p.add_argument("--labels", choices=("balanced", "random"), default="balanced")
    p.add_argument("--rounding", choices=("round", "truncate"), default="round")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--fused-attn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SDPA/FlashAttention (generate.py defaults to explicit fp32 softmax; same function)",
    )
    p.add_argument("--fid-reference", default=None, help="reference .npz: evaluate the samples right after sampling")
    p.add_argument("--calculate-fid", action="store_true", help="ERW's switch; evaluation needs --fid-reference")
    add_eval_args(p)
    # Accepted for command-line compatibility with generate.py; read from the checkpoint's keys instead.
    for flag in ("--projector-embed-dims", "--qk-norm"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS, nargs="?", const=True)
    errors.add_debug_flag(p)
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in p._actions if any(g.split("=")[0] in a.option_strings for g in given)}
    for k, v in PRESETS.get(args.preset, {}).items():
        if k not in explicit:
            setattr(args, k, v)
    check_args(args)
    return args


def load_weights(args) -> tuple[dict, dict]:
    """(state_dict, settings) from a run dir, a checkpoint dir, or a reference/ERW/REPA .pt file.

    settings: the run's config.json "trainer" section, or for a .pt file the architecture options its saved
    argparse.Namespace gives (read with weights_only; nothing else in the file is unpickled).
    """
    from repa_fast.engine import compat

    if os.path.isfile(args.ckpt):
        f = compat.read_foreign(args.ckpt)
        if f["kind"] == "erw-warmup":
            raise CheckpointError(
                f"--ckpt {args.ckpt} is an ERW warm-up checkpoint (blocks and projectors only, no final layer): it "
                "cannot sample. Train the full phase from it (train.py --resume-step N --warmup-steps N)"
            )
        sd = f[args.weights]
        if sd is None:
            raise CheckpointError(
                f"--ckpt {args.ckpt}: no {args.weights!r} weights (expected the reference layout "
                f"{{'ema': state_dict}}, or a bare state dict as REPA's last.pt); "
                f"pass --weights {'model' if args.weights == 'ema' else 'ema'} to sample the other weights"
            )
        sd, _ = compat.clean_state_dict(sd)
        settings = {k: f["args"][k] for k in ("model", "encoder_depth", "use_rope", "resolution") if k in f["args"]}
        settings["_file"] = True
        return sd, settings
    ckpt = find_checkpoint_dir(args.ckpt)
    config = {}
    for cand in (os.path.join(ckpt, "..", "..", "config.json"), os.path.join(args.ckpt, "config.json")):
        if os.path.isfile(cand):
            with open(cand) as f:
                config = json.load(f).get("trainer", {})
            break
    return load_tensors(os.path.join(ckpt, f"{args.weights}.safetensors")), config


def rope_setting(args, config: dict) -> tuple[bool, str]:
    """(use_rope, where it came from): the file's saved args, else --use-rope, else config.json, else off."""
    if config.get("_file") and "use_rope" in config:
        if args.use_rope is not None and args.use_rope != config["use_rope"]:
            logger.warning(
                "--use-rope %s ignored: the checkpoint's saved args say %s", args.use_rope, config["use_rope"]
            )
        return bool(config["use_rope"]), "the checkpoint's saved args"
    if args.use_rope is not None:
        return args.use_rope, "--use-rope"
    if "use_rope" in config:
        return bool(config["use_rope"]), "the run's config.json"
    return False, "default (no saved args, no --use-rope)"


def build_model(args, sd: dict, config: dict) -> torch.nn.Module:
    """SiT with the projector widths, depth and qk-norm its keys imply and RoPE from ``rope_setting``."""
    from repa_fast.engine import compat

    name = args.model or config.get("model")
    if not name:
        raise CheckpointError("--model is required when --ckpt is a reference .pt file (e.g. --model SiT-XL/2)")
    encoder_depth = int(args.encoder_depth or config.get("encoder_depth", 8))  # generate.py's default: 8
    has_old = any(k.startswith("decoder_blocks.") for k in sd)
    if args.legacy:
        sd = compat.legacy_remap(sd, encoder_depth)
    elif has_old:
        raise CheckpointError(
            f"--ckpt {args.ckpt} uses the old decoder_blocks.* layout; pass --legacy (and its --encoder-depth)"
        )
    arch = compat.arch_from_keys(sd)
    use_rope, source = rope_setting(args, config)
    print(f"generate: RoPE {'on' if use_rope else 'off'} (from {source})", file=sys.stderr)
    try:
        patch = parse_model_name(name)[1]
    except ValueError as e:
        raise CheckpointError(f"--model: {e}") from e
    model = build_sit(
        name,
        input_size=math.isqrt(arch["num_patches"]) * patch,
        in_channels=arch["in_channels"],
        num_classes=arch["num_classes"],
        z_dims=arch["z_dims"],
        depth=arch["depth"],
        encoder_depth=min(encoder_depth, arch["depth"]) if arch["z_dims"] else 1,  # projectors do not sample
        projector_dim=arch["projector_dim"],
        qk_norm=arch["qk_norm"],
        fused_attn=args.fused_attn,
        use_rope=use_rope,
    )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"--ckpt {args.ckpt} does not fit --model {name}: {str(e)[:300]}") from e
    return model.eval()


def resolve_vae_choice(args, in_channels: int, latent_scale: float) -> str | None:
    """The --vae to load, or None for pixel space; a latent model without a VAE is an error here, before sampling.

    A model with 3 channels samples RGB pixels (the demo); any other width is a VAE latent (4 for SD-VAE).
    """
    pixel = in_channels == 3
    choice = args.vae if args.vae is not None else (None if pixel else "ema")  # generate.py's default: ema
    if choice in ("none", None):
        if not pixel:
            raise CheckpointError(
                f"--ckpt {args.ckpt} is a latent-space model (latent scale {latent_scale}) and --vae none was given: "
                "its samples need a VAE to become images; pass --vae ema (generate.py's default), mse or a directory"
            )
        return None
    return choice


def output_name(args, model_name: str) -> str:
    """Every setting that changes the samples (the reference's name ignores steps and the guidance interval)."""
    tag = os.path.basename(os.path.normpath(args.ckpt)).replace(".pt", "")
    heun = "-heun" if args.heun else ""
    return (
        f"{model_name.replace('/', '_')}-{tag}-{args.weights}-{args.mode}{args.num_steps}{heun}"
        f"-cfg{args.cfg_scale}-g{args.guidance_low}-{args.guidance_high}-{args.labels}-{args.rounding}"
        f"-seed{args.global_seed}-n{args.num_fid_samples}"
    )


@torch.no_grad()
def generate_shard(args, model, vae, rank: int, world: int, device, latent_scale: float) -> np.ndarray:
    """This rank's share of the samples, uint8 (n, H, W, 3), in global sample order."""
    start, end = shard_bounds(args.num_fid_samples, rank, world)
    gen = torch.Generator(device=device).manual_seed(args.global_seed * world + rank)  # generate.py's rank seed
    if args.labels == "balanced":
        labels = class_balanced_labels(args.num_fid_samples, model.num_classes, device=device)[start:end]
    else:
        labels = torch.randint(0, model.num_classes, (end - start,), device=device, generator=gen)
    size, c = model.x_embedder.grid_size * model.patch_size, model.in_channels
    sampler = SAMPLERS[args.mode]
    out = []
    for i in range(0, end - start, args.per_proc_batch_size):
        y = labels[i : i + args.per_proc_batch_size]
        z = torch.randn(len(y), c, size, size, device=device, generator=gen)
        kw = dict(
            num_steps=args.num_steps,
            cfg_scale=args.cfg_scale,
            guidance_low=args.guidance_low,
            guidance_high=args.guidance_high,
            path_type=args.path_type,
        )
        if args.mode == "ode":
            kw["heun"] = args.heun
        else:
            kw["generator"] = gen
        x = sampler(model, z, y, **kw).float()
        x = vae.decode(x / latent_scale).sample if vae is not None else x / latent_scale
        out.append(decode_to_uint8(x, rounding=args.rounding).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


@errors.entry_point("generate")
def main(argv=None) -> int:
    from repa_fast.engine.parallel.process_group import launched_command

    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    feature_net = None
    with launched_command() as (rank, world, device):
        if args.calculate_fid or args.fid_reference:  # every evaluation mistake surfaces before sampling
            from repa_fast.evaluate import prepare_evaluation

            feature_net = prepare_evaluation(args, args.fid_reference, device, need="--fid-reference REF.npz")
            if args.num_fid_samples < 2:
                raise errors.ConfigError(
                    f"--num-fid-samples {args.num_fid_samples}: evaluation needs at least 2 samples"
                )
        sd, config = load_weights(args)
        model = build_model(args, sd, config).to(device)
        latent_scale = args.latent_scale or float(config.get("latent_scale", 0.18215))
        vae = None
        vae_choice = resolve_vae_choice(args, model.in_channels, latent_scale)
        if vae_choice is not None:  # before the first sample: a missing VAE fails now, not after 50,000 images
            from repa_fast.data.vae import load_vae

            vae = load_vae(vae_choice, device)
        name = output_name(args, args.model or config["model"])
        os.makedirs(args.sample_dir, exist_ok=True)
        part = generate_shard(args, model, vae, rank, world, device, latent_scale)
        if len(part):
            save_npz(os.path.join(args.sample_dir, f"{name}.part{rank}.npz"), part)
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            parts = [os.path.join(args.sample_dir, f"{name}.part{r}.npz") for r in range(world)]
            arr = np.concatenate([np.load(p)["arr_0"] for p in parts if os.path.exists(p)])
            if len(arr) != args.num_fid_samples:
                raise CheckpointError(
                    f"only {len(arr)} of {args.num_fid_samples} samples were written (a rank "
                    "failed?); the parts are kept in --sample-dir"
                )
            path = save_npz(os.path.join(args.sample_dir, f"{name}.npz"), arr)
            for p in parts:
                if os.path.exists(p):
                    os.remove(p)
            print(f"wrote {path}: {arr.shape}")
        if args.fid_reference:
            from repa_fast.evaluate import evaluate, format_metrics

            if world > 1:
                torch.distributed.barrier()  # rank 0 has written the merged file
            path = os.path.join(args.sample_dir, f"{name}.npz")
            result = evaluate(path, args.fid_reference, args, device, rank, world, net=feature_net)
            if result is not None:
                print(f"{path}: {format_metrics(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
