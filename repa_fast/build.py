"""The one assembly module: a TrainConfig becomes the pieces of a run (STYLE.md "one assembly module").

Everything that builds from a config calls these factories: training (``engine/trainer.py``), the target-cache
writer (``tools/cache_targets.py``), layer features / CKNNA / linear probes (``eval/layer_features.py``), in-training
evaluation and ``bench/throughput.py``. The user-facing switch names become the code's names here only
(``--kernels`` -> ``impl``, ``--fused-attn`` -> ``attn_backend``: ``model_kwargs`` / ``encoder_kwargs``), so every
entry point builds the same model and encoders from the same config.

Order and seeding (docs/architecture.md): ``seed_everything(seed)`` first (identical initial SiT weights and
random-weight target encoders on every rank), then ``build_dataset`` -> ``build_encoders`` (the token grid comes from
the data) -> ``build_model`` (``z_dims`` from the encoders) -> ``build_targets`` (``--targets cached`` swaps the
encoders for the stored targets) -> ``build_optimizer`` over the trainable set; the backend wraps the model and makes
the EMA (``engine/parallel``); then every rank reseeds with ``seed + rank`` (the reference's per-process seed) for
everything drawn during training.
"""

import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from repa_fast.config import ConfigError, ModelConfig, TrainConfig
from repa_fast.data import DigitsDataset, open_dataset
from repa_fast.engine.stop import ignore_in_worker
from repa_fast.models.encoders import load_encoders
from repa_fast.models.sit import build_sit, parse_model_name

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

    dataset = open_cached_targets(dataset, encoders, cfg.target.targets_dir)
    logger.info("targets: cached in %s (the encoders do not run, images are not read)", dataset.cache.dir)
    return dataset, []


def build_loader(cfg: TrainConfig, dataset, sampler, micro: int, device: torch.device, rank: int):
    """DALI or torch DataLoader (--loader; repa_fast.data.dali_loader.choose_loader logs why), same sample order."""
    from repa_fast.data.dali_loader import DALILoader, choose_loader

    if choose_loader(cfg.data.loader, dataset, device) == "dali":
        return DALILoader(dataset, sampler, micro, device=device, num_threads=max(1, cfg.data.num_workers))
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
        impl=m.kernels,
        use_rope=m.use_rope,
    )


def encoder_kwargs(m: ModelConfig) -> dict:
    """Target-encoder keywords from the model options. The encoders have no Triton op: ``--kernels ref`` pins them to
    plain SDPA (a reference run end to end), otherwise ``repa_fast.kernels.attention`` picks its fastest backend."""
    return dict(attn_backend="sdpa" if m.kernels == "ref" else "auto")


def build_encoders(cfg: TrainConfig, resolution: int, device: torch.device, enc_type: str | None = None) -> list:
    """The frozen target encoders of the run (none when it does not align: ``--proj-coeff 0`` or no ``--enc-type``),
    built exactly as training builds them. ``enc_type`` picks a subset (e.g. one encoder for CKNNA); random-weight
    encoders (``--no-encoder-pretrained``) are drawn from the global RNG, so call ``seed_everything`` first."""
    names = enc_type or cfg.target.enc_type
    if not names or (enc_type is None and cfg.loss.proj_coeff == 0):
        return []
    return load_encoders(
        names,
        resolution,
        cfg.target.encoder_checkpoint_dir,
        grid=cfg.target.encoder_grid or None,
        pretrained=cfg.target.encoder_pretrained,
        device=device,
        **encoder_kwargs(cfg.model),
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


def build_models(cfg: TrainConfig, dataset, device: torch.device):
    """SiT sized from the data, and the frozen target encoders on the matching token grid."""
    if dataset.latent_shape[1] != dataset.latent_shape[2]:  # before any encoder is loaded
        raise ConfigError(f"latents of shape {dataset.latent_shape} are not square; SiT needs square inputs")
    encoders = build_encoders(cfg, dataset.resolution, device)
    model = build_model(cfg, dataset.latent_shape, dataset.num_classes, [e.embed_dim for e in encoders]).to(device)
    check_token_grids(cfg, model, encoders, dataset.latent_shape[1])
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
