"""Sample a trained model into the ADM evaluator's .npz (the reference generate.py, with its flag names).

    torchrun --nproc_per_node 8 -m repa_fast.generate --ckpt RUN_DIR --vae sd-vae-ft-ema --preset paper
    python -m repa_fast.generate --ckpt ema.pt --model SiT-XL/2 --vae DIR --num-fid-samples 50000 \\
        --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7            # = --preset paper

``--ckpt`` takes a repa_fast run or checkpoint directory (its config.json supplies model, resolution and classes),
a reference/ERW train.py checkpoint, REPA's released last.pt (a bare state dict) or an exported ``{'ema': ...}``
file (then pass --model like generate.py; files are read with weights_only, argparse.Namespace the only class).
``--vae ema|mse`` is stabilityai/sd-vae-ft-ema|mse (hub or local cache) as in generate.py, or a local directory;
it is loaded before the first sample. ``--legacy`` remaps decoder_blocks.* keys; RoPE (ERW) comes from the file's
saved args, else ``--use-rope``, else config.json, and the choice is printed. Defaults are
generate.py's (ode, 50 steps, cfg 1.5); ``--preset paper`` sets REPA's README evaluation (SDE, 250 steps, cfg 1.8,
guidance interval [0, 0.7]). Differences from generate.py, on purpose: images are rounded, not truncated
(``--rounding truncate`` restores it); labels are class-balanced (``--labels random`` restores generate.py's loop:
per batch the noise then the labels, full batches, its sample numbering across ranks, so its seed gives its samples);
no PNG round trip: each process writes its share as an .npz part, rank 0 merges them into one file whose name
records every sampling setting (``--png-dir`` also writes generate.py's 000000.png ... folder); the z_dims/encoder
depth/qk-norm of the checkpoint are read from its keys (generate.py's --qk-norm and --projector-embed-dims, when
given, must agree with them).

As a library: ``generate(GenerateOptions(ckpt=..., sampling=SamplingOptions(...)), device)``; the pieces are
``load_run`` (repa_fast.engine.checkpoint), ``build_model``, ``generate_shard`` and ``output_name``.
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from repa_fast import errors
from repa_fast.build import model_kwargs
from repa_fast.engine.adapters import arch_from_keys, check_fits, legacy_remap
from repa_fast.engine.checkpoint import CheckpointError, Run, load_run
from repa_fast.io import check_output_path
from repa_fast.models.sit import build_sit, parse_model_name
from repa_fast.options import VAE_HELP, WEIGHTS, Checked, EvalOptions, ModelOptions, SamplingOptions, option
from repa_fast.sample import (
    REG_CLS_CFG_SCALE,
    SAMPLERS,
    class_balanced_labels,
    decode_to_uint8,
    reg_cls_latents,
    save_npz,
    shard_bounds,
)

logger = logging.getLogger("repa_fast")


@dataclass
class GenerateOptions(Checked):
    """One generate command: the checkpoint, how to build and sample it, where samples go, optional evaluation."""

    ckpt: str = option(help="run dir, checkpoint dir, a reference/ERW train.py .pt file or REPA's released last.pt")
    weights: str = option("ema", "which weights of the checkpoint", choices=WEIGHTS)
    sample_dir: str = option("samples", "where the .npz (and its per-process parts) are written")
    png_dir: str | None = option(
        None, "also write every sample as DIR/000000.png, 000001.png, ... (REPA generate.py's per-image folder; the "
        "global sample index names the file)",
    )  # fmt: skip
    vae: str | None = option(None, VAE_HELP)
    tf32: bool = option(True, "TF32 matmuls (generate.py's --tf32)")
    fid_reference: str | None = option(None, "reference .npz: evaluate the samples right after sampling")
    calculate_fid: bool = option(False, "ERW's switch; evaluation needs --fid-reference")
    cls: int | None = option(
        None, "REG generate.py's class-token width (its default 768): read from the checkpoint; if given, must agree"
    )
    sit: ModelOptions = field(default_factory=ModelOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    evaluation: EvalOptions = field(default_factory=EvalOptions)


def rope_setting(opts: ModelOptions, run: Run) -> tuple[bool, str]:
    """(use_rope, where it came from): the file's saved args, else --use-rope, else config.json, else off."""
    if run.foreign and "use_rope" in run.stated:
        saved = run.config.model.use_rope
        if opts.use_rope is not None and opts.use_rope != saved:
            logger.warning("--use-rope %s ignored: the checkpoint's saved args say %s", opts.use_rope, saved)
        return saved, "the checkpoint's saved args"
    if opts.use_rope is not None:
        return opts.use_rope, "--use-rope"
    if "use_rope" in run.stated:
        return run.config.model.use_rope, "the run's config.json"
    return False, "default (no saved args, no --use-rope)"


def model_name(opts: ModelOptions, run: Run) -> str:
    """--model, else the run's (config.json or the file's saved args); a CheckpointError when neither names one."""
    name = opts.model or (run.config.model.model if "model" in run.stated else None)
    if not name:
        raise CheckpointError("--model is required when --ckpt is a reference .pt file (e.g. --model SiT-XL/2)")
    return name


def check_stated_arch(opts: ModelOptions, arch: dict, ckpt: str) -> None:
    """REPA generate.py's --qk-norm and --projector-embed-dims, when given, agree with what the checkpoint's keys say
    (REPA builds the model from them and fails in load_state_dict; we read the keys, so a contradiction is named)."""
    if opts.qk_norm is not None and opts.qk_norm != arch["qk_norm"]:
        has = "has" if arch["qk_norm"] else "has no"
        raise CheckpointError(
            f"--{'' if opts.qk_norm else 'no-'}qk-norm contradicts --ckpt {ckpt}: it {has} q/k-norm weights "
            f"(qk_norm={arch['qk_norm']}); drop the flag or pass --{'' if arch['qk_norm'] else 'no-'}qk-norm"
        )
    if opts.projector_embed_dims is not None:
        try:
            dims = [int(d) for d in opts.projector_embed_dims.split(",") if d.strip()]
        except ValueError as e:
            raise errors.ConfigError(
                f"--projector-embed-dims {opts.projector_embed_dims!r}: expected widths separated by commas, e.g. 768"
            ) from e
        if dims != list(arch["z_dims"]):
            found = ",".join(map(str, arch["z_dims"])) or "none (no projectors)"
            raise CheckpointError(
                f"--projector-embed-dims {opts.projector_embed_dims} contradicts --ckpt {ckpt}: its projectors are "
                f"{found}; drop the flag (the keys give the widths) or pass --projector-embed-dims "
                f"{','.join(map(str, arch['z_dims']))}"
            )


def build_model(opts: ModelOptions, run: Run) -> torch.nn.Module:
    """SiT with the projector widths, depth and qk-norm ``run``'s keys imply and RoPE from ``rope_setting``."""
    name = model_name(opts, run)
    encoder_depth = opts.encoder_depth or run.config.model.encoder_depth  # generate.py's default: 8
    sd = run.weights
    if opts.legacy:
        sd = legacy_remap(sd, encoder_depth)
    elif any(k.startswith("decoder_blocks.") for k in sd):
        raise CheckpointError(
            f"--ckpt {run.path} uses the old decoder_blocks.* layout; pass --legacy (and its --encoder-depth)"
        )
    arch = arch_from_keys(sd)
    check_stated_arch(opts, arch, run.path)
    use_rope, source = rope_setting(opts, run)
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
        fused_attn=opts.fused_attn,
        use_rope=use_rope,
        impl=model_kwargs(run.config.model)["impl"],  # the run's --kernels, mapped as training maps it (build.py)
        **family_options(run, arch),
    )
    check_fits(f"--ckpt {run.path} (--model {name})", sd, model)  # names the keys, and a projector's shape
    model.load_state_dict(sd, strict=True)
    return model.eval()


def family_options(run: Run, arch: dict) -> dict:
    """REG / iREPA model keywords of a checkpoint (docs/methods.md): REG and the projector type from its keys; the
    conv kernel size from the run's config.json or the file's saved args (iREPA's train.py defaults it to 1, its
    README to 3: the args say what built the weights), else from the weights' shape."""
    kernel = arch["proj_kernel_size"]
    if arch["projection_layer_type"] == "conv" and "proj_kwargs_kernel_size" in run.stated:
        kernel = run.config.model.proj_kwargs_kernel_size
    return dict(reg=arch["reg"], projection_layer_type=arch["projection_layer_type"], proj_kernel_size=kernel)


def resolve_vae_choice(vae: str | None, in_channels: int, latent_scale: float, ckpt: str) -> str | None:
    """The --vae to load, or None for pixel space; a latent model without a VAE is an error here, before sampling.

    A model with 3 channels samples RGB pixels (the demo); any other width is a VAE latent (4 for SD-VAE).
    """
    pixel = in_channels == 3
    choice = vae if vae is not None else (None if pixel else "ema")  # generate.py's default: ema
    if choice in ("none", None):
        if not pixel:
            raise CheckpointError(
                f"--ckpt {ckpt} is a latent-space model (latent scale {latent_scale}) and --vae none was given: "
                "its samples need a VAE to become images; pass --vae ema (generate.py's default), mse or a directory"
            )
        return None
    return choice


def output_name(opts: GenerateOptions, model_name: str, reg: bool = False) -> str:
    """Every setting that changes the samples (the reference's name ignores steps and the guidance interval); with
    ``reg`` (a REG model) the class token's guidance scale too."""
    s = opts.sampling
    tag = os.path.basename(os.path.normpath(opts.ckpt)).replace(".pt", "")
    heun = "-heun" if s.heun else ""
    cls_cfg = f"-clscfg{REG_CLS_CFG_SCALE if s.cls_cfg_scale is None else s.cls_cfg_scale}" if reg else ""
    return (
        f"{model_name.replace('/', '_')}-{tag}-{opts.weights}-{s.mode}{s.num_steps}{heun}"
        f"-cfg{s.cfg_scale}{cls_cfg}-g{s.guidance_low}-{s.guidance_high}-{s.labels}-{s.rounding}"
        f"-seed{s.global_seed}-n{s.num_fid_samples}"
    )


def shard_indices(s: SamplingOptions, rank: int, world: int) -> np.ndarray:
    """The global sample index of each sample ``generate_shard`` returns for ``rank``, in its order.

    balanced: a contiguous share. random: REPA generate.py's layout, full batches of --per-proc-batch-size on every
    rank, sample i of a rank's batch b being number b * n * world + i * world + rank (generate.py:158,
    ``index = i * world_size + rank + total``); the draws past --num-fid-samples are made and dropped, as there."""
    if s.labels == "balanced":
        start, end = shard_bounds(s.num_fid_samples, rank, world)
        return np.arange(start, end)
    n = s.per_proc_batch_size
    batches = math.ceil(s.num_fid_samples / (n * world))
    idx = (np.arange(batches)[:, None] * n * world + np.arange(n)[None, :] * world + rank).ravel()
    return idx[idx < s.num_fid_samples]


def _draws(s: SamplingOptions, model, rank: int, world: int, device, gen):
    """(noise, labels, REG's class-token noise or None, how many of the batch are kept) per batch, in the order the
    generator is drawn from.

    balanced: the labels are fixed, the noise is drawn per batch. random: generate.py's loop, per batch the noise
    then the labels, both for a full batch (generate.py:121-122, ``z = torch.randn(n, ...)`` then
    ``y = torch.randint(0, num_classes, (n,))``), then the sampler's own draws (SDE), so that REPA's --global-seed
    gives REPA's samples. A REG model draws its class-token noise last, after the labels (REG generate.py:129-131:
    ``z``, ``y``, then ``cls_z = torch.randn(n, args.cls)``)."""
    size, c, n = model.x_embedder.grid_size * model.patch_size, model.in_channels, s.per_proc_batch_size
    if s.labels == "balanced":
        start, end = shard_bounds(s.num_fid_samples, rank, world)
        labels = class_balanced_labels(s.num_fid_samples, model.num_classes, device=device)[start:end]
        for i in range(0, end - start, n):
            y = labels[i : i + n]
            z = torch.randn(len(y), c, size, size, device=device, generator=gen)
            yield z, y, reg_cls_latents(model, len(y), gen, device), len(y)
        return
    kept = shard_indices(s, rank, world)
    for b in range(math.ceil(s.num_fid_samples / (n * world))):
        z = torch.randn(n, c, size, size, device=device, generator=gen)
        y = torch.randint(0, model.num_classes, (n,), device=device, generator=gen)
        cls = reg_cls_latents(model, n, gen, device)
        yield z, y, cls, int(((kept >= b * n * world) & (kept < (b + 1) * n * world)).sum())


@torch.no_grad()
def generate_shard(s: SamplingOptions, model, vae, rank: int, world: int, device, latent_scale: float) -> np.ndarray:
    """This rank's share of the samples, uint8 (n, H, W, 3), in the order of ``shard_indices``."""
    gen = torch.Generator(device=device).manual_seed(s.global_seed * world + rank)  # generate.py's rank seed
    kw = dict(
        num_steps=s.num_steps,
        cfg_scale=s.cfg_scale,
        guidance_low=s.guidance_low,
        guidance_high=s.guidance_high,
        path_type=s.path_type,
    )
    kw |= {"heun": s.heun} if s.mode == "ode" else {"generator": gen}
    if model.reg:  # REG samples the class token jointly (REG generate.py:129-131, samplers.py)
        kw["cls_cfg_scale"] = REG_CLS_CFG_SCALE if s.cls_cfg_scale is None else s.cls_cfg_scale
    out = []
    for z, y, cls, keep in _draws(s, model, rank, world, device, gen):
        if not keep:  # only a rank's last batch can be all past --num-fid-samples: nothing is drawn after it
            continue
        if cls is not None:
            kw["cls_latents"] = cls
        x = SAMPLERS[s.mode](model, z, y, **kw)[:keep].float()
        x = vae.decode(x / latent_scale).sample if vae is not None else x / latent_scale
        out.append(decode_to_uint8(x, rounding=s.rounding).cpu().numpy())
    size = model.x_embedder.grid_size * model.patch_size
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def write_pngs(png_dir: str, images: np.ndarray, indices: np.ndarray) -> None:
    """REPA generate.py's per-image folder: sample k as ``png_dir/{k:06d}.png`` (each written atomically)."""
    from PIL import Image

    from repa_fast.io import atomic_path

    os.makedirs(png_dir, exist_ok=True)
    for image, k in zip(images, indices):
        path = os.path.join(png_dir, f"{int(k):06d}.png")
        with atomic_path(path, intact="The .npz is written after the PNGs.") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")


def feature_net_for(opts: GenerateOptions, device):
    """The feature network when the samples are to be evaluated (None otherwise): every evaluation mistake surfaces
    before the first sample is drawn."""
    if not (opts.calculate_fid or opts.fid_reference):
        return None
    from repa_fast.evaluate import prepare_evaluation as prepare

    net = prepare(opts.evaluation, opts.fid_reference, device, need="--fid-reference REF.npz")
    if opts.sampling.num_fid_samples < 2:
        raise errors.ConfigError(
            f"--num-fid-samples {opts.sampling.num_fid_samples}: evaluation needs at least 2 samples"
        )
    return net


def load_model(opts: GenerateOptions, device):
    """(model, vae, latent scale, model name) from ``opts.ckpt``; the VAE is loaded now, so that a missing one fails
    before the first sample, not after 50,000 images."""
    run = load_run(opts.ckpt, which=opts.weights)
    if run.format == "erw-warmup":
        raise CheckpointError(
            f"--ckpt {opts.ckpt} is an ERW warm-up checkpoint (blocks and projectors only, no final layer): it "
            "cannot sample. Train the full phase from it (train.py --resume-step N --warmup-steps N)"
        )
    model = build_model(opts.sit, run).to(device)
    if opts.sampling.cls_cfg_scale is not None and not model.reg:
        raise errors.ConfigError(
            f"--cls-cfg-scale guides REG's class token, but {opts.ckpt} is not a REG checkpoint; drop --cls-cfg-scale"
        )
    if opts.cls is not None and opts.cls != (model.cls_dim if model.reg else None):
        raise errors.ConfigError(
            f"--cls {opts.cls}: REG's generate.py flag is the class-token width, which {opts.ckpt} fixes at "
            f"{model.cls_dim if model.reg else 'none (not a REG checkpoint)'}; drop --cls"
        )
    latent_scale = opts.sit.latent_scale or run.config.data.latent_scale
    vae, vae_choice = None, resolve_vae_choice(opts.vae, model.in_channels, latent_scale, opts.ckpt)
    if vae_choice is not None:
        from repa_fast.data.vae import load_vae

        vae = load_vae(vae_choice, device)
    return model, vae, latent_scale, model_name(opts.sit, run)


def merge_parts(sample_dir: str, name: str, world: int, expected: int, s: SamplingOptions | None = None) -> str:
    """Rank 0: the processes' .npz parts as one ``<name>.npz`` in global sample order (``shard_indices`` of ``s``;
    rank order when None); the parts are removed once it is written."""
    parts = [os.path.join(sample_dir, f"{name}.part{r}.npz") for r in range(world)]
    arrays = [np.load(p)["arr_0"] if os.path.exists(p) else None for p in parts]
    arr = np.concatenate([a for a in arrays if a is not None])
    if s is not None and len(arr) == expected:
        order = np.concatenate([shard_indices(s, r, world) for r, a in enumerate(arrays) if a is not None])
        arr = arr[np.argsort(order, kind="stable")]
    if len(arr) != expected:
        raise CheckpointError(
            f"only {len(arr)} of {expected} samples were written (a rank failed?); the parts are kept in --sample-dir"
        )
    path = save_npz(os.path.join(sample_dir, f"{name}.npz"), arr)
    for p in parts:
        if os.path.exists(p):
            os.remove(p)
    print(f"wrote {path}: {arr.shape}")
    return path


def generate(opts: GenerateOptions, device, rank: int = 0, world: int = 1) -> str:
    """Sample ``opts`` into ``<sample_dir>/<output_name>.npz`` (every process its share; rank 0 merges), then
    evaluate it with ``opts.fid_reference``; returns the .npz path. Under torchrun, the process group must exist."""
    torch.backends.cuda.matmul.allow_tf32 = opts.tf32
    check_output_path(opts.sample_dir, "--sample-dir", directory=True)  # before any model is loaded or sample drawn
    if opts.png_dir:
        check_output_path(opts.png_dir, "--png-dir", directory=True)
    feature_net = feature_net_for(opts, device)
    model, vae, latent_scale, name = load_model(opts, device)
    name = output_name(opts, name, model.reg)
    os.makedirs(opts.sample_dir, exist_ok=True)
    part = generate_shard(opts.sampling, model, vae, rank, world, device, latent_scale)
    if opts.png_dir:
        write_pngs(opts.png_dir, part, shard_indices(opts.sampling, rank, world))
    if len(part):
        save_npz(os.path.join(opts.sample_dir, f"{name}.part{rank}.npz"), part)
    if world > 1:
        torch.distributed.barrier()
    path = os.path.join(opts.sample_dir, f"{name}.npz")
    if rank == 0:
        merge_parts(opts.sample_dir, name, world, opts.sampling.num_fid_samples, opts.sampling)
    if opts.fid_reference:
        from repa_fast.evaluate import evaluate, format_metrics

        if world > 1:
            torch.distributed.barrier()  # rank 0 has written the merged file
        result = evaluate(path, opts.fid_reference, opts.evaluation, device, rank, world, net=feature_net)
        if result is not None:
            print(f"{path}: {format_metrics(result)}")
    return path


def parse_args(argv=None) -> GenerateOptions:
    from repa_fast import cli_flags

    p = cli_flags.parser("python -m repa_fast.generate", __doc__)
    cli_flags.add_checkpoint_flags(p, GenerateOptions.__dataclass_fields__["ckpt"].metadata["help"])
    cli_flags.add_model_flags(p)
    cli_flags.add_vae_flag(p)
    cli_flags.add_sampling_flags(p)
    cli_flags.add_option_flags(p.add_argument_group("output"), GenerateOptions, skip=("ckpt", "weights", "vae"))
    cli_flags.add_eval_flags(p)
    ns = p.parse_args(argv)
    cli_flags.apply_sampling_preset(p, ns, argv)
    return cli_flags.options_from(ns, GenerateOptions)


@errors.entry_point("generate")
def main(argv=None) -> int:
    from repa_fast.engine.parallel.process_group import launched_command

    opts = parse_args(argv)
    with launched_command() as (rank, world, device):
        generate(opts, device, rank, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
