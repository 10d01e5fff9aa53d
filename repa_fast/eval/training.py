"""FID-N and IS of the EMA model during training (``--eval-every K --eval-samples N --fid-reference REF.npz``).

Every K steps, rank 0 draws N class-balanced samples from the EMA model in eval mode with the configured sampler
(``--eval-mode``, ``--eval-num-steps``, ``--eval-cfg-scale``; the same noise and labels each time, so successive
values differ by the model only), decodes them (pixel space, or ``--vae``), and computes FID and IS exactly as
``python -m repa_fast.evaluate`` does (same feature network, same reference statistics cache). The values are
logged as ``FID-N`` and ``IS-N`` (``FD-digits-N``/``IS-digits-N`` with ``--eval-feature-net digits``) together with
the sampler settings, to log.jsonl, TensorBoard and wandb. Everything the evaluation needs (reference file,
weights, a decoder) is checked when training starts, not at the first evaluation.
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
    """Checks at construction; ``__call__(ema_model, step)`` returns the metrics to log (rank 0) or {}."""

    def __init__(self, cfg: TrainConfig, dataset, device: torch.device, is_main: bool):
        from repa_fast.evaluate import prepare_evaluation, reference_statistics

        r = cfg.run
        check_eval(cfg)  # the options' rules live with the config (TrainConfig.validate runs them too)
        c = dataset.latent_shape[0] // 2
        if cfg.data.vae is None and c != 3:
            raise ConfigError("--eval-every on latent data needs --vae DIR to decode the samples into images")
        self.cfg, self.device, self.is_main = cfg, device, is_main
        self.options = eval_options(cfg)
        self.net = prepare_evaluation(self.options, r.fid_reference, device, need="--fid-reference REF.npz")
        o = self.options
        self.ref = (
            reference_statistics(r.fid_reference, self.net, device, batch_size=o.batch_size, cache_dir=o.cache_dir)
            if is_main
            else None
        )
        self.vae = None
        if cfg.data.vae and is_main:
            from repa_fast.data.vae import load_vae

            self.vae = load_vae(cfg.data.vae, device)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        self.noise = torch.randn(r.eval_samples, c, dataset.latent_shape[1], dataset.latent_shape[2], generator=gen)
        self.gen, self.cls_noise = gen, None  # REG: the class token's noise, drawn after the image's, once
        self.settings = f"{r.eval_mode}{r.eval_num_steps}-cfg{r.eval_cfg_scale}"

    def due(self, step: int) -> bool:
        return bool(self.cfg.run.eval_every) and step % self.cfg.run.eval_every == 0

    @torch.no_grad()
    def samples(self, ema_model) -> np.ndarray:
        """uint8 (N, H, W, 3) samples of the EMA model."""
        from repa_fast.sample import SAMPLERS, class_balanced_labels, decode_to_uint8, reg_cls_latents

        r, scale = self.cfg.run, self.cfg.data.latent_scale
        labels = class_balanced_labels(r.eval_samples, ema_model.num_classes, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(r.seed + 1)  # SDE noise: the same each evaluation
        if self.cls_noise is None:
            self.cls_noise = reg_cls_latents(ema_model, r.eval_samples, self.gen)
        was_training = ema_model.training
        ema_model.eval()
        out = []
        for i in range(0, r.eval_samples, r.eval_batch_size):
            z = self.noise[i : i + r.eval_batch_size].to(self.device)
            kw = dict(num_steps=r.eval_num_steps, cfg_scale=r.eval_cfg_scale, path_type=self.cfg.loss.path_type)
            if r.eval_mode == "sde":
                kw["generator"] = gen
            if self.cls_noise is not None:  # REG samples the class token jointly
                kw["cls_latents"] = self.cls_noise[i : i + len(z)].to(self.device)
            x = SAMPLERS[r.eval_mode](ema_model, z, labels[i : i + len(z)], **kw).float()
            x = self.vae.decode(x / scale).sample if self.vae is not None else x / scale
            out.append(decode_to_uint8(x).cpu().numpy())
        ema_model.train(was_training)
        return np.concatenate(out)

    def __call__(self, ema_model, step: int) -> dict:
        if not self.is_main:
            return {}
        from repa_fast.eval.inception import extract
        from repa_fast.evaluate import compute_metrics

        try:
            images = self.samples(ema_model)
        except ValueError as e:  # non-finite samples: the run diverged; say so and keep training (--on-nan decides)
            logger.warning("step %d: in-training evaluation skipped: %s", step, e)
            return {}
        feats = [extract(self.net, images[i : i + 64], self.device) for i in range(0, len(images), 64)]
        feats = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}
        m = compute_metrics(feats, self.ref, self.net, which=("fid", "is"))
        n = len(images)
        out = {f"{k}-{n}": v for k, v in m.items() if v is not None}
        out["eval_sampler"] = self.settings
        logger.info("step %d: %s (%s)", step, ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "eval_sampler"),
                    self.settings)  # fmt: skip
        return out


def make_training_evaluator(cfg: TrainConfig, dataset, device, is_main: bool) -> TrainingEvaluator | None:
    """None when ``--eval-every`` is 0; otherwise a checked evaluator (ConfigError on any missing piece)."""
    if not cfg.run.eval_every:  # its range (>= 0) is checked on the field (config.py)
        return None
    return TrainingEvaluator(cfg, dataset, device, is_main)
