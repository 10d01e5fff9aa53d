"""The one assembly module: a TrainConfig becomes the pieces of a run (STYLE.md "one assembly module").

Everything that builds from a config calls these factories: training (``engine/trainer.py``), the target-cache
writer (``tools/cache_targets.py``), layer features / CKNNA / linear probes (``eval/layer_features.py``) and
``bench/throughput.py``; the in-training evaluation builds no model (it samples the EMA the loop hands it). The
user-facing switch names become the code's names here only (``--kernels`` -> ``impl``, ``--fused-attn`` ->
``attn_backend``: ``model_kwargs`` / ``encoder_kwargs``), so every entry point builds the same model and encoders from
the same config (tests/test_build.py checks the constructor arguments of each).

Order and seeding of a training run (docs/architecture.md), each step a factory below:
    build_backend(cfg)          process group and device (engine/parallel); nothing random
    build_run(cfg, backend)     seed_everything(seed): identical initial weights and random-weight target encoders on
                                every rank; then build_dataset -> build_encoders (the token grid comes from the data;
                                random-weight encoders are the first draws after the seed) -> build_model (z_dims from
                                the encoders) -> check_token_grids -> build_targets (``--targets cached`` swaps the
                                encoders for the stored targets) -> build_recipe
    (the trainer reads a checkpoint's or --init-from's weights into ``Run.model`` here, before anything is wrapped)
    build_training(run, phase)  build_phase: freeze what the phase does not train, build_optimizer over the rest,
                                compile + wrap (engine/parallel/parallelize.py), the EMA from the wrapped weights; then
                                seed_everything(rank_seed(seed, rank)) = seed + rank, the reference's per-process seed,
                                for everything drawn during training; then the grad scaler and the sampler
    build_loader(...)           after a resume has restored the sampler; its workers' seeds come from seed + rank
A resume that cannot restore the saved RNG streams (another process count, a foreign checkpoint) reseeds with
``rank_seed(seed, rank, step)`` (engine/trainer.py ``load_state``).
"""

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from repa_fast.config import ConfigError, ModelConfig, TrainConfig, micro_batch_size
from repa_fast.data import DigitsDataset, ResumableDistributedSampler, open_dataset
from repa_fast.engine.parallel import Backend, make_backend, parallelize
from repa_fast.engine.stop import ignore_in_worker
from repa_fast.models.encoders import load_encoders
from repa_fast.models.sit import build_sit, parse_model_name
from repa_fast.recipe import Phase, Recipe, build_recipe

logger = logging.getLogger("repa_fast")

# --mixed-precision name -> autocast dtype (None: full precision). The one table: training, the target cache and the
# benchmarks read it.
AMP_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_dataset(cfg: TrainConfig):
    d = cfg.data
    if d.dataset == "digits":
        return DigitsDataset(resolution=d.resolution, num_classes=d.num_classes)
    return open_dataset(d.data_dir, num_classes=d.num_classes, resolution=d.resolution)


def build_targets(cfg: TrainConfig, dataset, encoders):
    """--targets cached: the dataset yields the stored targets instead of images and no encoder runs
    (repa_fast.tools.cache_targets); the encoders were still built, to check the cache against their weights."""
    if cfg.target.targets != "cached":
        if cfg.target.targets_dir:
            raise ConfigError("--targets-dir is only read with --targets cached; add --targets cached or drop it")
        return dataset, encoders
    if not encoders:
        raise ConfigError("--targets cached: this run has no target encoder (--proj-coeff 0); drop --targets cached")
    from repa_fast.data.cached_targets import open_cached_targets

    dataset = open_cached_targets(dataset, encoders, cfg.target.targets_dir, with_cls=cfg.model.reg)  # REG: cls
    logger.info("targets: cached in %s (the encoders do not run, images are not read)", dataset.cache.dir)
    return dataset, []


def build_loader(cfg: TrainConfig, dataset, sampler, micro: int, device: torch.device, rank: int):
    """DALI or torch DataLoader (--loader; repa_fast.data.dali_loader.choose_loader logs why), same sample order."""
    from repa_fast.data.dali_loader import DALILoader, choose_loader

    skip = cfg.data.on_bad_sample == "skip"  # reads samples one by one: the DataLoader (validate refuses --loader dali)
    if choose_loader("dataloader" if skip else cfg.data.loader, dataset, device) == "dali":
        return DALILoader(dataset, sampler, micro, device=device, num_threads=max(1, cfg.data.num_workers))
    if skip:  # deterministic replacement of unreadable samples (data/sampler.py)
        from repa_fast.data.sampler import SkipBadSamples, bad_sample_limit

        limit = bad_sample_limit(cfg.data.bad_sample_budget, len(dataset))
        dataset = SkipBadSamples(dataset, limit, cfg.data.num_workers)
    return DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.run.seed + rank),
        worker_init_fn=ignore_in_worker,
    )


def model_kwargs(m: ModelConfig) -> dict:
    """SiT keywords from the model options: the one place where the user-facing names (``--kernels``, the ``kernels``
    key of configs/*.json and of runs' config.json) become the code's (``impl``). ``fused_attn`` is also the SiT's
    reference keyword, which the model maps to ``attn_backend``."""
    return dict(
        class_dropout_prob=m.cfg_prob,
        encoder_depth=m.encoder_depth,
        projector_dim=m.projector_dim,
        qk_norm=m.qk_norm,
        fused_attn=m.fused_attn,
        attn_backend=m.attn_backend,  # "auto" unless --attn-backend; fused_attn=False makes "auto" "math"
        impl=m.kernels,
        use_rope=m.use_rope,
        **family_kwargs(m),
    )


def family_kwargs(m: ModelConfig) -> dict:
    """The REPA family's SiT keywords (docs/methods.md §REG, §iREPA): REG's class token, iREPA's projector."""
    return dict(reg=m.reg, projection_layer_type=m.projection_layer_type, proj_kernel_size=m.proj_kwargs_kernel_size)


def loss_kwargs(cfg: TrainConfig) -> dict:
    """The family's ``training_loss`` / ``warmup_loss`` keywords: iREPA's target z-score (``--spnorm-method``,
    ``--zscore-alpha``); REG's ``cls_coeff`` (``--cls``) is ``training_loss``'s only (the warm-up has no velocity)."""
    norm = cfg.loss.spnorm_method
    return dict(target_norm=None if norm == "none" else norm, target_norm_alpha=cfg.loss.zscore_alpha)


def check_class_tokens(cfg: TrainConfig, encoders) -> None:
    """REG reads each encoder's class token (``forward(images, with_cls=True)``): refuse an encoder without one."""
    import inspect

    for e in encoders if cfg.model.reg else ():
        if "with_cls" not in inspect.signature(e.forward).parameters:
            raise ConfigError(
                f"--reg: target encoder {e.enc_name} gives no class token (forward(images, with_cls=True)); "
                "REG needs one: use an encoder that has one (dinov2-vit-*, digits-ssl, ...) or drop --reg"
            )


def encoder_kwargs(m: ModelConfig) -> dict:
    """Target-encoder keywords from the model options. The encoders have no Triton op: ``--kernels ref`` pins them to
    plain SDPA (a reference run end to end), otherwise ``repa_fast.kernels.attention`` picks its fastest backend."""
    return dict(attn_backend="sdpa" if m.kernels == "ref" else "auto")


def build_encoders(
    cfg: TrainConfig,
    resolution: int,
    device: torch.device,
    enc_type: str | None = None,
    attn_backend: str | None = None,
) -> list:
    """The frozen target encoders of the run (none when it does not align: ``--proj-coeff 0`` or no ``--enc-type``),
    built exactly as training builds them. ``enc_type`` picks a subset (e.g. one encoder for CKNNA); random-weight
    encoders (``--no-encoder-pretrained``) are drawn from the global RNG, so call ``seed_everything`` first.
    ``attn_backend`` overrides the config's attention choice (``encoder_kwargs``); only bench/throughput.py's
    reference provider sets it, to time the reference's explicit-softmax encoder."""
    names = enc_type or cfg.target.enc_type
    if not names or (enc_type is None and cfg.loss.proj_coeff == 0 and not cfg.model.reg):  # REG reads class tokens
        return []
    kw = encoder_kwargs(cfg.model)
    if attn_backend is not None:
        kw["attn_backend"] = attn_backend
    return load_encoders(
        names,
        resolution,
        cfg.target.encoder_checkpoint_dir,
        grid=cfg.target.encoder_grid or None,
        pretrained=cfg.target.encoder_pretrained,
        device=device,
        **kw,
    )


def build_model(cfg: TrainConfig, latent_shape, num_classes: int, z_dims) -> torch.nn.Module:
    """The SiT for latents of ``latent_shape`` (2C, h, w) with one projector per target width in ``z_dims``."""
    two_c, h, w = latent_shape
    if h != w:
        raise ConfigError(f"latents of shape {tuple(latent_shape)} are not square; SiT needs square inputs")
    return build_sit(
        cfg.model.model,
        input_size=h,
        in_channels=two_c // 2,
        num_classes=num_classes,
        z_dims=list(z_dims),
        **model_kwargs(cfg.model),
    )


def check_token_grids(cfg: TrainConfig, model, encoders, input_size: int) -> None:
    """REPA aligns token by token: every encoder's token grid must be the SiT's."""
    for e in encoders:
        if e.grid != model.x_embedder.grid_size:
            g, h = model.x_embedder.grid_size, input_size
            raise ConfigError(
                f"{cfg.model.model} on {h}x{h} inputs has a {g}x{g} token grid but encoder {e.enc_name} gives "
                f"{e.grid}x{e.grid} tokens; REPA aligns token by token: use patch size {h // e.grid} "
                f"(e.g. SiT-{parse_model_name(cfg.model.model)[0]}/{h // e.grid}) or set --encoder-grid {g}"
            )


def build_models(cfg: TrainConfig, dataset, device: torch.device, attn_backend: str | None = None):
    """SiT sized from the data, and the frozen target encoders on the matching token grid. ``dataset`` needs only
    ``latent_shape``, ``resolution`` and ``num_classes`` (a benchmark passes those of its synthetic batch)."""
    if dataset.latent_shape[1] != dataset.latent_shape[2]:  # before any encoder is loaded
        raise ConfigError(f"latents of shape {dataset.latent_shape} are not square; SiT needs square inputs")
    encoders = build_encoders(cfg, dataset.resolution, device, attn_backend=attn_backend)
    model = build_model(cfg, dataset.latent_shape, dataset.num_classes, [e.embed_dim for e in encoders]).to(device)
    check_token_grids(cfg, model, encoders, dataset.latent_shape[1])
    check_class_tokens(cfg, encoders)
    return model, encoders


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # fused=True on CPU and CUDA: one kernel per step, and the found_inf input lets a bad step be skipped on device.
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        weight_decay=o.adam_weight_decay,
        fused=True,
    )


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch global RNGs from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RESEED_STRIDE = 1_000_003  # a prime above any process count: (rank, step) pairs of one seed never share a seed


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process ``rank``'s random streams from optimizer step ``step`` on: ``seed + rank + 1_000_003 *
    step``, the one reseed rule.

    At step 0 this is the reference's per-process seed ``seed + rank`` (REPA train.py:151, ``set_seed(args.seed +
    accelerator.process_index)``), used by every fresh run. A resume that cannot restore the saved per-rank streams
    (a different process count, or a reference / ERW checkpoint that saved none) starts fresh streams at its step: one
    per rank, different from the streams of step 0 (so the resumed run does not redraw the noise of its first steps),
    and dependent on ``--seed`` as every other stream is. The trainer once used ``step * 1_000_003 + rank`` after a
    foreign resume, which ignored ``--seed`` (two seeds resumed from one reference checkpoint drew the same noise);
    the two rules agree at seed 0, the default."""
    return seed + rank + RESEED_STRIDE * step


def build_backend(cfg: TrainConfig) -> Backend:
    """The process backend for ``--parallel`` on ``--device`` (engine/parallel); its process group lives until
    ``backend.shutdown()``. ``cfg.deepspeed`` is the resolved DeepSpeed section (repa_fast.cli)."""
    return make_backend(cfg.run.parallel, cfg.run.device, cfg.deepspeed)


@dataclass
class Run:
    """What ``build_run`` makes from a config: nothing is wrapped, loaded or written yet."""

    cfg: TrainConfig
    backend: Backend
    micro: int  # per-process micro-batch: batch_size / (processes x accumulation)
    dataset: object  # a repa_fast.data dataset (or its --targets cached view)
    encoders: list  # frozen target encoders run every step; [] without alignment or with --targets cached
    model: torch.nn.Module  # the single-device SiT on backend.device (fp32, unwrapped)
    recipe: Recipe  # which phase each step is in (repa_fast.recipe)
    fixed: frozenset  # names of the parameters that never train (pos_embed)


def build_run(cfg: TrainConfig, backend: Backend) -> Run:
    """Dataset, target encoders (or cached targets), SiT and recipe, seeded as the module docstring says."""
    seed_everything(cfg.run.seed)  # identical initial weights (and random target encoders) on every rank
    if cfg.run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    micro = micro_batch_size(cfg, backend.world_size)
    dataset = build_dataset(cfg)
    model, encoders = build_models(cfg, dataset, backend.device)
    dataset, encoders = build_targets(cfg, dataset, encoders)  # --targets cached: checked against the encoders
    fixed = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
    return Run(cfg, backend, micro, dataset, encoders, model, build_recipe(cfg), fixed)


def build_evaluator(cfg: TrainConfig, dataset, backend: Backend):
    """The in-training evaluator (``--eval-every``: FID-N / IS of the EMA; repa_fast.eval.training), or None. Built
    with the run so that everything it needs is checked before the first write."""
    from repa_fast.eval.training import make_training_evaluator  # eval sits above engine: imported here, not there

    return make_training_evaluator(cfg, dataset, backend.device, backend.is_main, backend)  # sharded over the ranks


def build_phase(cfg: TrainConfig, backend: Backend, model, phase: Phase, fixed: frozenset):
    """Freeze what the phase does not train, then wrap for it: (train_model, optimizer, ema).

    The wrapper and a fresh optimizer are built over the phase's trainable set only (DDP and ZeRO reject parameters
    that get no gradient), and the EMA starts from the current weights, as ERW's full phase does
    (LINs-lab/ERW train.py:604-660: fresh AdamW, EMA initialised from the warmed-up weights).
    """
    for name, p in model.named_parameters():
        p.requires_grad_(name not in fixed and phase.trains(name))
    apply_speed_options(cfg, model, backend.device)  # fp8, then activation checkpointing: before compile and wrap
    train_model = parallelize(model, build_optimizer(cfg, model), cfg, backend)  # compile, then wrap/shard
    optimizer = backend.optimizer  # FSDP2 rebuilds it over its sharded parameters
    ema = backend.make_ema(model)  # after wrap: sharding backends keep EMA shards beside the parameter shards
    return train_model, optimizer, ema


def apply_speed_options(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> None:
    """``--fp8`` then ``--activation-checkpointing`` on the single-device model, in place, in the order
    engine/activation_checkpoint.py's docstring gives (fp8 conversion, checkpointing, then ``parallelize``: compile
    and wrap). Both are idempotent, so every recipe phase may call this; neither changes a parameter name, so
    checkpoints and the EMA's pairing are those of the plain model. Without the flags nothing is touched."""
    m = cfg.model
    if m.fp8 != "none":
        from repa_fast.engine.fp8 import apply_fp8

        apply_fp8(model, m.fp8, device=device)  # refuses a GPU without fp8 tensor cores (engine/fp8.py check_fp8)
    if m.activation_checkpointing != "none":
        from repa_fast.engine.activation_checkpoint import apply_activation_checkpointing

        names = apply_activation_checkpointing(model, m.activation_checkpointing)
        logger.info("activation checkpointing %s: %d modules recompute in the backward", m.activation_checkpointing,
                    len(names))  # fmt: skip


@dataclass
class Training:
    """What ``build_training`` adds to a Run once its weights are in place: the parts the loop steps."""

    train_model: torch.nn.Module  # the module to call: compiled and wrapped (DDP, FSDP2, a DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    ema: object  # engine.ema.EMA or ShardedEMA
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling (None: bf16/fp32, or DeepSpeed scales itself)
    sampler: ResumableDistributedSampler


def build_training(run: Run, phase: Phase) -> Training:
    """Wrapper, optimizer and EMA for ``phase``, then the per-process seed, the grad scaler and the data sampler."""
    cfg, backend = run.cfg, run.backend
    train_model, optimizer, ema = build_phase(cfg, backend, run.model, phase, run.fixed)
    seed_everything(rank_seed(cfg.run.seed, backend.rank))  # for everything drawn from here on
    use_scaler = cfg.run.mixed_precision == "fp16" and backend.torch_grad_scaler  # DeepSpeed scales losses itself
    if cfg.run.mixed_precision == "fp16" and backend.device.type == "cpu":
        logger.warning(
            "--mixed-precision fp16 on CPU: float16 autocast has no fast kernels on most CPUs and runs many times "
            "slower than bf16 or fp32; use --mixed-precision bf16 (the default) or no on CPU"
        )
    scaler = torch.amp.GradScaler(backend.device.type) if use_scaler else None
    sampler = ResumableDistributedSampler(
        len(run.dataset), cfg.optim.batch_size, rank=backend.rank, world_size=backend.world_size, seed=cfg.run.seed
    )
    return Training(train_model, optimizer, ema, scaler, sampler)
