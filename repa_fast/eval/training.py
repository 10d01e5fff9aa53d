"""FID-N and IS of the EMA model during training (``--eval-every K --eval-samples N --fid-reference REF.npz``).

Every K steps the N class-balanced samples are drawn from the EMA model in eval mode with the configured sampler
(``--eval-mode``, ``--eval-num-steps``, ``--eval-cfg-scale``; the same noise and labels each time, so successive
values differ by the model only), decoded (pixel space, or ``--vae``), and scored exactly as
``python -m repa_fast.evaluate`` does (same feature network, same reference statistics cache). The values are
logged as ``FID-N`` and ``IS-N`` (``FD-digits-N``/``IS-digits-N`` with ``--eval-feature-net digits``) together with
the sampler settings, to log.jsonl, TensorBoard and wandb. Everything the evaluation needs (reference file,
weights, a decoder) is checked when training starts, not at the first evaluation.

Sharded over the processes of the run: the N samples are cut into sampling batches of ``--eval-batch-size`` (batch b
holds samples [b B, (b + 1) B)), and rank r samples, decodes and featurises batches r, r + world, ... Everything a
batch draws is its own: its rows of the fixed initial noise, its labels, and with ``--eval-mode sde`` a generator
seeded by (seed, b) for the sampler's noise; so a batch's samples and features are the same whichever rank computes
it. The features are gathered to rank 0 in batch order, which computes FID and IS: the values equal the one-process
ones for the same seed (tests/eval/test_sharded_training_eval.py). Every rank needs the full EMA module (the backend
assembles it from its shards: ``Backend.ema_module(ema, all_ranks=True)``) and the feature network.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from repa_fast.config import ConfigError, TrainConfig, check_eval

logger = logging.getLogger("repa_fast")


def eval_options(cfg: TrainConfig):
    """The evaluation options of the run's ``--eval-*`` flags (the feature network of ``python -m repa_fast.evaluate``
    and its caches)."""
    from repa_fast.options import DEFAULT_CACHE, EvalOptions

    r = cfg.run
    return EvalOptions(
        feature_net=r.eval_feature_net,
        inception_weights=r.inception_weights,
        cache_dir=r.eval_cache_dir or DEFAULT_CACHE,
        batch_size=r.eval_batch_size,
    )


class TrainingEvaluator:
    """Checks at construction; ``__call__(ema_model, step)`` (every rank, collective with ``backend``) returns the
    metrics to log on rank 0, {} elsewhere. ``backend`` (its rank, world size and ``gather_objects``) shards the
    sampling; without one, this process samples everything."""

    def __init__(self, cfg: TrainConfig, dataset, device: torch.device, is_main: bool, backend=None):
        from repa_fast.evaluate import prepare_evaluation, reference_statistics

        r = cfg.run
        check_eval(cfg)  # the options' rules live with the config (TrainConfig.validate runs them too)
        c = dataset.latent_shape[0] // 2
        if cfg.data.vae is None and c != 3:
            raise ConfigError("--eval-every on latent data needs --vae DIR to decode the samples into images")
        self.cfg, self.device, self.is_main, self.backend = cfg, device, is_main, backend
        self.rank, self.world = (backend.rank, backend.world_size) if backend is not None else (0, 1)
        self.options = eval_options(cfg)
        self.net = prepare_evaluation(self.options, r.fid_reference, device, need="--fid-reference REF.npz")
        o = self.options
        self.ref = (
            reference_statistics(r.fid_reference, self.net, device, batch_size=o.batch_size, cache_dir=o.cache_dir)
            if is_main
            else None
        )
        self.vae = None
        if cfg.data.vae:  # every rank decodes its own batches
            from repa_fast.data.vae import load_vae

            self.vae = load_vae(cfg.data.vae, device)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        self.noise = torch.randn(r.eval_samples, c, dataset.latent_shape[1], dataset.latent_shape[2], generator=gen)
        self.gen, self.cls_noise = gen, None  # REG: the class token's noise, drawn after the image's, once
        self.settings = f"{r.eval_mode}{r.eval_num_steps}-cfg{r.eval_cfg_scale}"

    def due(self, step: int) -> bool:
        return bool(self.cfg.run.eval_every) and step % self.cfg.run.eval_every == 0

    def batches(self, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the sampling batches that ``rank`` of ``world`` computes (round robin)."""
        n = -(-self.cfg.run.eval_samples // self.cfg.run.eval_batch_size)
        return list(range(rank, n, world))

    @torch.no_grad()
    def sample_batch(self, ema_model, b: int) -> np.ndarray:
        """uint8 (B, H, W, 3) samples of sampling batch ``b``: its noise rows, labels and SDE generator only."""
        from repa_fast.sample import SAMPLERS, class_balanced_labels, decode_to_uint8, reg_cls_latents

        r, scale = self.cfg.run, self.cfg.data.latent_scale
        if self.cls_noise is None:  # REG: all N class-token noise rows, drawn once after the image noise
            self.cls_noise = reg_cls_latents(ema_model, r.eval_samples, self.gen)
        i = b * r.eval_batch_size
        z = self.noise[i : i + r.eval_batch_size].to(self.device)
        labels = class_balanced_labels(r.eval_samples, ema_model.num_classes, device=self.device)[i : i + len(z)]
        kw = dict(num_steps=r.eval_num_steps, cfg_scale=r.eval_cfg_scale, path_type=self.cfg.loss.path_type)
        if r.eval_mode == "sde":  # the sampler's noise, keyed by the batch: the same on any rank, each evaluation
            kw["generator"] = torch.Generator(device=self.device).manual_seed(r.seed + 1 + 1_000_003 * b)
        if self.cls_noise is not None:  # REG samples the class token jointly, from batch b's rows
            kw["cls_latents"] = self.cls_noise[i : i + len(z)].to(self.device)
        x = SAMPLERS[r.eval_mode](ema_model, z, labels, **kw).float()
        x = self.vae.decode(x / scale).sample if self.vae is not None else x / scale
        return decode_to_uint8(x).cpu().numpy()

    def samples(self, ema_model, rank: int = 0, world: int = 1) -> dict[int, np.ndarray]:
        """{batch index: uint8 (B, H, W, 3) samples} of the batches ``rank`` computes, the EMA model in eval mode."""
        was_training = ema_model.training
        ema_model.eval()
        try:
            return {b: self.sample_batch(ema_model, b) for b in self.batches(rank, world)}
        finally:
            ema_model.train(was_training)

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The feature-network outputs FID and IS read (pool features, logits) of one sampling batch (chunks of 64, as
        python -m repa_fast.evaluate); the spatial features are not kept, so the gather to rank 0 stays small."""
        from repa_fast.eval.inception import extract

        feats = [extract(self.net, images[i : i + 64], self.device) for i in range(0, len(images), 64)]
        return {k: np.concatenate([f[k] for f in feats]) for k in feats[0] if k in ("pool", "logits")}

    def _gather(self, part):
        return self.backend.gather_objects(part) if self.backend is not None and self.world > 1 else [part]

    def __call__(self, ema_model, step: int) -> dict:
        from repa_fast.evaluate import compute_metrics

        try:  # this rank's batches: (batch index, features), or why it has none
            part = {b: self.features(x) for b, x in self.samples(ema_model, self.rank, self.world).items()}
        except ValueError as e:  # non-finite samples: the run diverged; say so and keep training (--on-nan decides)
            part = str(e)
        parts = self._gather(part)  # collective: every rank, whatever happened on it
        if not self.is_main:
            return {}
        failed = [p for p in parts if isinstance(p, str)]
        if failed:
            logger.warning("step %d: in-training evaluation skipped: %s", step, failed[0])
            return {}
        by_batch = {b: f for p in parts for b, f in p.items()}
        order = [by_batch[b] for b in sorted(by_batch)]
        feats = {k: np.concatenate([f[k] for f in order]) for k in order[0]}
        m = compute_metrics(feats, self.ref, self.net, which=("fid", "is"))
        n = len(feats[next(iter(feats))])
        out = {f"{k}-{n}": v for k, v in m.items() if v is not None}
        out["eval_sampler"] = self.settings
        logger.info("step %d: %s (%s)", step, ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "eval_sampler"),
                    self.settings)  # fmt: skip
        return out


def make_training_evaluator(cfg: TrainConfig, dataset, device, is_main: bool, backend=None) -> TrainingEvaluator | None:
    """None when ``--eval-every`` is 0; otherwise a checked evaluator (ConfigError on any missing piece), sharded over
    ``backend``'s processes when given."""
    if not cfg.run.eval_every:  # its range (>= 0) is checked on the field (config.py)
        return None
    return TrainingEvaluator(cfg, dataset, device, is_main, backend)
