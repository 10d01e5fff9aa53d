"""Sample a trained model into the ADM evaluator's .npz (the reference generate.py, with its flag names).

    torchrun --nproc_per_node 8 -m repa_fast.generate --ckpt RUN_DIR --vae sd-vae-ft-ema --preset paper
    python -m repa_fast.generate --ckpt ema.pt --model SiT-XL/2 --vae DIR --num-fid-samples 50000 \
        --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7            # = --preset paper

``--ckpt`` takes a repa_fast run or checkpoint directory (its config.json supplies model, resolution and classes),
or a reference-layout ``{'ema': state_dict}`` file (then pass --model/--resolution like generate.py). Defaults are
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
from safetensors.torch import load_file

from repa_fast.config import ConfigError
from repa_fast.engine.checkpoint import CheckpointError
from repa_fast.evaluate import add_eval_args
from repa_fast.export import find_checkpoint_dir
from repa_fast.models.sit import build_sit
from repa_fast.sample import SAMPLERS, class_balanced_labels, decode_to_uint8, save_npz, shard_bounds

logger = logging.getLogger("repa_fast")

PRESETS = {"paper": {"mode": "sde", "num_steps": 250, "cfg_scale": 1.8, "guidance_low": 0.0, "guidance_high": 0.7}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m repa_fast.generate",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir, or a reference {'ema': ...} .pt file")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a repa_fast checkpoint")
    p.add_argument("--model", default=None, help="SiT_models name (default: from the run's config.json)")
    p.add_argument("--resolution", type=int, default=None, help="256 or 512 (default: from config.json, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from config.json, else 1000")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--latent-scale", type=float, default=None, help="default: config.json's, else 0.18215")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL dir (sd-vae-ft-ema); none = pixel space")
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
    for flag in ("--encoder-depth", "--projector-embed-dims", "--qk-norm", "--legacy"):
        p.add_argument(flag, default=None, help=argparse.SUPPRESS, nargs="?", const=True)
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in p._actions if any(g.split("=")[0] in a.option_strings for g in given)}
    for k, v in PRESETS.get(args.preset, {}).items():
        if k not in explicit:
            setattr(args, k, v)
    return args


def load_weights(args) -> tuple[dict, dict]:
    """(state_dict, run config or {}) from a run dir, a checkpoint dir or a reference .pt file."""
    if os.path.isfile(args.ckpt):
        try:
            sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"--ckpt {args.ckpt}: cannot load with weights_only=True ({e}); convert it with "
                "python -m repa_fast.export or pass a repa_fast run directory"
            ) from e
        if not isinstance(sd, dict) or "ema" not in sd:
            raise CheckpointError(f"--ckpt {args.ckpt}: expected the reference layout {{'ema': state_dict}}")
        return sd["ema"], {}
    ckpt = find_checkpoint_dir(args.ckpt)
    config = {}
    for cand in (os.path.join(ckpt, "..", "..", "config.json"), os.path.join(args.ckpt, "config.json")):
        if os.path.isfile(cand):
            with open(cand) as f:
                config = json.load(f).get("trainer", {})
            break
    return load_file(os.path.join(ckpt, f"{args.weights}.safetensors")), config


def build_model(args, sd: dict, config: dict) -> torch.nn.Module:
    """SiT with the projector widths, encoder depth and qk-norm that the checkpoint's keys imply."""
    name = args.model or config.get("model")
    if not name:
        raise CheckpointError("--model is required when --ckpt is a reference .pt file (e.g. --model SiT-XL/2)")
    k = 0
    z_dims = []
    while f"projectors.{k}.4.weight" in sd:
        z_dims.append(sd[f"projectors.{k}.4.weight"].shape[0])
        k += 1
    patch = int(name.split("/")[1])
    input_size = math.isqrt(sd["pos_embed"].shape[1]) * patch
    in_channels = sd["x_embedder.proj.weight"].shape[1]
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    depth = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("blocks."))
    model = build_sit(
        name,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        z_dims=z_dims,
        depth=depth,
        encoder_depth=int(args.encoder_depth or config.get("encoder_depth", 1)) if z_dims else 1,
        projector_dim=sd["projectors.0.0.weight"].shape[0] if z_dims else 2048,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        fused_attn=args.fused_attn,
        use_rope=bool(config.get("use_rope", False)),
    )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"--ckpt {args.ckpt} does not fit --model {name}: {str(e)[:300]}") from e
    return model.eval()


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


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # Triton kernels and NCCL use the current device
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    feature_net = None
    try:
        if args.calculate_fid or args.fid_reference:  # every evaluation mistake surfaces before sampling
            from repa_fast.evaluate import prepare_evaluation

            feature_net = prepare_evaluation(args, args.fid_reference, device, need="--fid-reference REF.npz")
            if args.num_fid_samples < 2:
                raise ConfigError(f"--num-fid-samples {args.num_fid_samples}: evaluation needs at least 2 samples")
        sd, config = load_weights(args)
        model = build_model(args, sd, config).to(device)
        latent_scale = args.latent_scale or float(config.get("latent_scale", 0.18215))
        vae = None
        if args.vae:
            from repa_fast.data.vae import load_vae

            vae = load_vae(args.vae, device)
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
    except (CheckpointError, ConfigError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
