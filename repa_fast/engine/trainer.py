"""The training loop: REPA/SiT on any backend, resumable bit for bit, with no host sync inside a step.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per process:
    x0 = (mean + std * eps) * latent_scale           posterior sample on device (SPEC 1)
    z_k = encoder_k(image)                           frozen targets under no_grad (SPEC 5)
    loss = L_den + proj_coeff * L_proj               repa_fast.objective.training_loss (SPEC 6)
then unscale (fp16) -> clip -> fused AdamW step (skipped on non-finite gradients) -> EMA (not on skipped steps).
Losses stay on device and are read every ``log_every`` steps.
"""

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from repa_fast.config import ConfigError, TrainConfig, micro_batch_size, run_dir
from repa_fast.data import DigitsDataset, ResumableDistributedSampler, open_dataset
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.ema import EMA
from repa_fast.engine.faults import maybe_kill
from repa_fast.engine.metrics import LogSinks, LossMeter, setup_logging
from repa_fast.engine.parallel import Backend, make_backend
from repa_fast.engine.preview import Previewer, plot_loss_curve
from repa_fast.eval.training import make_training_evaluator
from repa_fast.models.encoders import load_encoders
from repa_fast.models.sit import build_sit
from repa_fast.objective import training_loss

logger = logging.getLogger("repa_fast")

AMP_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (--on-nan stop); the message says why and which checkpoint is good."""


@dataclass
class State:
    """Everything the loop mutates, in one place."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    ema: EMA  # or parallel.ShardedEMA (same update / state_dict interface)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: ResumableDistributedSampler
    step: int = 0
    nonfinite_total: int = 0
    evaluator: object = None  # repa_fast.eval.training.TrainingEvaluator when --eval-every is set


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary (final step, run directory, last logged metrics).

    A collective that fails because another process died or hung (bounded by REPA_FAST_DIST_TIMEOUT) is raised as
    ``PeerFailure``; the process group is destroyed on every exit path.
    """
    backend = make_backend(cfg.run.parallel, cfg.run.device, cfg)
    clean = False
    try:
        summary = _train(cfg, backend)
        clean = True
        return summary
    except Exception as e:
        good = ckpt.list_checkpoints(run_dir(cfg))
        failure = backend.peer_failure(e, ckpt.step_dir(run_dir(cfg), good[-1]) if good else None)
        if failure is None or failure is e:
            raise
        raise failure from e
    finally:
        backend.shutdown(clean=clean)


def prepare_run_dir(cfg: TrainConfig, backend: Backend) -> str:
    out = run_dir(cfg)
    if backend.is_main:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test-{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(
                f"--output-dir {cfg.run.output_dir}: cannot write to {out} ({e.strerror}); "
                "choose a writable --output-dir"
            ) from e
        ckpt.clean_stale_tmp(out)
    backend.barrier()
    return out


def build_dataset(cfg: TrainConfig):
    d = cfg.data
    if d.dataset == "digits":
        return DigitsDataset(resolution=d.resolution, num_classes=d.num_classes)
    return open_dataset(d.data_dir, num_classes=d.num_classes, resolution=d.resolution)


def build_models(cfg: TrainConfig, dataset, device: torch.device):
    """SiT sized from the data, and the frozen target encoders on the matching token grid."""
    two_c, h, w = dataset.latent_shape
    if h != w:
        raise ConfigError(f"latents of shape {dataset.latent_shape} are not square; SiT needs square inputs")
    m = cfg.model
    encoders = []
    if cfg.loss.proj_coeff != 0 and cfg.target.enc_type:
        grid = cfg.target.encoder_grid or None
        encoders = load_encoders(
            cfg.target.enc_type,
            dataset.resolution,
            cfg.target.encoder_checkpoint_dir,
            grid=grid,
            pretrained=cfg.target.encoder_pretrained,
            kernels=m.kernels,
            device=device,
        )
    model = build_sit(
        m.model,
        input_size=h,
        in_channels=two_c // 2,
        num_classes=dataset.num_classes,
        class_dropout_prob=m.cfg_prob,
        z_dims=[e.embed_dim for e in encoders],
        encoder_depth=m.encoder_depth,
        projector_dim=m.projector_dim,
        qk_norm=m.qk_norm,
        fused_attn=m.fused_attn,
        kernels=m.kernels,
        use_rope=m.use_rope,
    ).to(device)
    for e in encoders:
        if e.grid != model.x_embedder.grid_size:
            g = model.x_embedder.grid_size
            raise ConfigError(
                f"{m.model} on {h}x{h} inputs has a {g}x{g} token grid but encoder {e.enc_name} gives "
                f"{e.grid}x{e.grid} tokens; REPA aligns token by token: use patch size {h // e.grid} "
                f"(e.g. {m.model.split('/')[0]}/{h // e.grid}) or set --encoder-grid {g}"
            )
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
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: TrainConfig, backend: Backend) -> dict:
    out = prepare_run_dir(cfg, backend)
    setup_logging(backend.is_main, out)
    seed_everything(cfg.run.seed)  # identical initial weights (and random target encoders) on every rank
    if cfg.run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = backend.device
    micro = micro_batch_size(cfg, backend.world_size)
    dataset = build_dataset(cfg)
    model, encoders = build_models(cfg, dataset, device)
    evaluator = make_training_evaluator(cfg, dataset, device, backend.is_main)  # checked before any step
    if backend.is_main:
        save_resolved_config(cfg, out)
        _log_setup(cfg, model, encoders, dataset, backend, micro)
    resume_from = ckpt.resolve_resume(out, cfg.run.resume, cfg.run.resume_step)
    saved = ckpt.read_checkpoint(resume_from, rank=backend.rank) if resume_from else None
    if saved is not None:  # full fp32 weights into the plain model: every backend then shards/copies them as usual
        ckpt.check_compatible(resume_from, saved["state"].get("config", {}), cfg.flat())
        backend.load_model_state_dict(model, saved["model"])
    train_model = backend.wrap(model, build_optimizer(cfg, model))
    optimizer = backend.optimizer  # FSDP2 rebuilds it over its sharded parameters
    ema = backend.make_ema(model)  # after wrap: sharding backends keep EMA shards beside the parameter shards
    seed_everything(cfg.run.seed + backend.rank)  # reference: seed + process index, for everything drawn from here on
    use_scaler = cfg.run.mixed_precision == "fp16" and backend.torch_grad_scaler  # DeepSpeed scales losses itself
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    sampler = ResumableDistributedSampler(
        len(dataset), cfg.optim.batch_size, rank=backend.rank, world_size=backend.world_size, seed=cfg.run.seed
    )
    state = State(model, train_model, ema, optimizer, scaler, sampler, evaluator=evaluator)
    if saved is not None:
        load_state(state, resume_from, saved, backend)
    if cfg.model.compile:
        for block in model.blocks:
            block.compile(backend=cfg.model.compile_backend)  # in place: state-dict keys unchanged
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.run.seed + backend.rank),
    )
    sinks = LogSinks(out, cfg.run.report_to, cfg.flat(), enabled=backend.is_main)
    previewer = _make_previewer(cfg, dataset, device) if backend.is_main and cfg.run.sampling_steps else None
    try:
        last = run_loop(cfg, state, backend, loader, encoders, sinks, previewer, out)
    finally:
        sinks.close()
    if backend.is_main and os.path.exists(os.path.join(out, "log.jsonl")):
        plot_loss_curve(os.path.join(out, "log.jsonl"), os.path.join(out, "loss_curve.png"))
    return {"step": state.step, "run_dir": out, "metrics": last, "nonfinite_losses": state.nonfinite_total}


def _make_previewer(cfg: TrainConfig, dataset, device):
    return Previewer(
        dataset.latent_shape,
        dataset.num_classes,
        cfg.data.latent_scale,
        cfg.loss.path_type,
        device,
        seed=cfg.run.seed,
        vae_path=cfg.data.vae,
        n=min(32, max(dataset.num_classes, 16)),
    )


def _log_setup(cfg, model, encoders, dataset, backend, micro) -> None:
    n = sum(p.numel() for p in model.parameters())
    logger.info(
        "run %s: %s (%.2fM params), %d process(es) [%s] on %s, global batch %d = %d x %d x %d",
        cfg.run.exp_name,
        cfg.model.model,
        n / 1e6,
        backend.world_size,
        backend.name,
        backend.device,
        cfg.optim.batch_size,
        backend.world_size,
        cfg.optim.gradient_accumulation_steps,
        micro,
    )
    logger.info(
        "data: %s (%d samples, %s, latents %s)",
        type(dataset).__name__,
        len(dataset),
        f"{dataset.resolution}px",
        tuple(dataset.latent_shape),
    )
    for e in encoders:
        kind = "pretrained weights" if cfg.target.encoder_pretrained else "RANDOM weights (demo/test only)"
        logger.info("target encoder %s: %s, %d tokens x %d", e.enc_name, kind, e.grid**2, e.embed_dim)


def save_resolved_config(cfg: TrainConfig, out: str) -> None:
    import json

    data = cfg.to_json()
    if "deepspeed" in data:  # derived from batch / (processes x accumulation): the file stays valid at any world size
        data["deepspeed"] = {**data["deepspeed"], "train_micro_batch_size_per_gpu": "auto"}
    tmp = os.path.join(out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, os.path.join(out, "config.json"))


def get_batch(data_iter, device, need_images: bool = True):
    """Next (image, moments, label) on ``device``; images stay on the host when no encoder needs them."""
    image, moments, label = next(data_iter)
    image = image.to(device, non_blocking=True) if need_images else image
    return image, moments.to(device, non_blocking=True), label.to(device, non_blocking=True)


def sample_posterior(moments: torch.Tensor, scale: float) -> torch.Tensor:
    """x0 = (mean + std * eps) * scale with [mean, std] stacked on the channel axis (reference train.py:71-77)."""
    mean, std = moments.float().chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * scale


def micro_step(cfg: TrainConfig, state: State, backend: Backend, batch, encoders, amp_dtype, last: bool) -> dict:
    """Forward and backward of one micro-batch; returns the (device) loss dict."""
    image, moments, labels = batch
    x0 = sample_posterior(moments, cfg.data.latent_scale)
    with torch.no_grad(), torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        targets = [enc(image) for enc in encoders]
    if cfg.model.legacy:  # reference --legacy: labels dropped here and again inside the model
        drop = torch.rand(labels.shape[0], device=labels.device) < cfg.model.cfg_prob
        labels = torch.where(drop, state.model.num_classes, labels)
    with backend.no_sync(state.train_model, last):
        losses = training_loss(
            state.train_model,
            x0,
            labels,
            targets,
            path_type=cfg.loss.path_type,
            prediction=cfg.loss.prediction,
            weighting=cfg.loss.weighting,
            proj_coeff=cfg.loss.proj_coeff,
            autocast_dtype=amp_dtype,
            kernels=cfg.model.kernels,
        )
        backend.backward(losses["loss"] / cfg.optim.gradient_accumulation_steps, state.scaler)
    return losses


def optimizer_step(cfg: TrainConfig, state: State, backend: Backend, meter: LossMeter) -> None:
    grad_norm, skipped = backend.clip_and_step(state.model, cfg.optim.max_grad_norm, state.scaler)
    backend.update_ema(state.ema, state.model, cfg.optim.ema_decay, skipped)
    meter.add_step(grad_norm, skipped)
    state.sampler.advance()
    state.step += 1


def run_loop(cfg, state: State, backend, loader, encoders, sinks, previewer, out) -> dict:
    amp_dtype = AMP_DTYPES[cfg.run.mixed_precision]
    meter = LossMeter(backend.device)
    accum, last_metrics = cfg.optim.gradient_accumulation_steps, {}
    progress = _progress(cfg, state, backend)
    t_last, step_last = time.perf_counter(), state.step
    data_iter = iter(loader)
    state.train_model.train()
    while state.step < cfg.run.max_train_steps and state.sampler.epoch < cfg.run.epochs:
        for i in range(accum):
            batch = _next_batch(data_iter, backend.device, bool(encoders))
            if batch is None:  # epoch over (the sampler has already rolled to the next one)
                data_iter = iter(loader)
                batch = _next_batch(data_iter, backend.device, bool(encoders))
            meter.add_losses(micro_step(cfg, state, backend, batch, encoders, amp_dtype, last=i == accum - 1))
        optimizer_step(cfg, state, backend, meter)
        maybe_kill("after_step", state.step)
        progress.update(1)
        step = state.step
        if step % cfg.run.log_every == 0 or step == cfg.run.max_train_steps:
            metrics = meter.read(backend)  # the interval's one host sync
            now = time.perf_counter()
            metrics["img_per_s"] = (step - step_last) * cfg.optim.batch_size / (now - t_last)
            t_last, step_last, last_metrics = now, step, metrics
            _check_nonfinite(cfg, state, metrics, out)
            sinks.log(step, metrics)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}")
        save_due = step % cfg.run.checkpointing_steps == 0 or step == cfg.run.max_train_steps
        preview_due = cfg.run.sampling_steps and (step % cfg.run.sampling_steps == 0 or step == cfg.run.max_train_steps)
        if (save_due or preview_due) and backend.device.type == "cuda":
            torch.cuda.synchronize()  # both sync anyway; without this the step's queued GPU work counts as pause
        t_pause = time.perf_counter()
        if save_due:
            if cfg.run.on_nan == "stop":  # never save after an unread non-finite loss (one sync, at save time only)
                _check_nonfinite(cfg, state, {"nonfinite_losses": meter.pending_nonfinite(backend)}, out)
            save_state(cfg, state, backend, out)
        if preview_due:
            ema_model = backend.ema_module(state.ema)  # all ranks: gathers the EMA shards under FSDP2 / ZeRO-3
            if previewer is not None:
                path = previewer(
                    ema_model,
                    os.path.join(out, "samples", f"{step:07d}.png"),
                    num_steps=cfg.run.preview_num_steps,
                    cfg_scale=cfg.run.preview_cfg_scale,
                )
                sinks.add_image("samples", path, step)
        if state.evaluator is not None and state.evaluator.due(step):  # FID-N / IS of the EMA (rank 0 computes)
            sinks.log(step, state.evaluator(backend.ema_module(state.ema), step))
        t_last += time.perf_counter() - t_pause  # img/s counts training time only, not checkpoints and previews
    progress.close()
    return last_metrics


def _next_batch(data_iter, device, need_images):
    try:
        return get_batch(data_iter, device, need_images)
    except StopIteration:
        return None


def _check_nonfinite(cfg, state: State, metrics: dict, out: str) -> None:
    n = metrics["nonfinite_losses"]
    state.nonfinite_total += n
    if n and cfg.run.on_nan == "stop":
        good = ckpt.list_checkpoints(out)
        where = ckpt.step_dir(out, good[-1]) if good else "none was saved yet"
        raise TrainingStopped(
            f"{n} non-finite loss value(s) in the steps up to {state.step} (--on-nan stop); "
            f"those updates were skipped and nothing was saved after them. Last good checkpoint: "
            f"{where}"
        )
    if n:
        logger.warning(
            "%d non-finite loss(es) up to step %d: those steps were skipped (%d in total)",
            n,
            state.step,
            state.nonfinite_total,
        )


def _progress(cfg, state, backend):
    from tqdm import tqdm

    return tqdm(
        total=cfg.run.max_train_steps,
        initial=state.step,
        disable=not backend.is_main,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )


def save_state(cfg: TrainConfig, state: State, backend: Backend, out: str) -> None:
    model_sd = backend.full_state_dict(state.model)
    ema_sd = backend.full_ema_state_dict(state.ema)
    opt_sd = backend.optimizer_state_dict(state.model)
    rngs = backend.gather_objects(ckpt.rng_state())
    if backend.is_main:
        extra = {
            "optimizer": opt_sd,
            "scaler": state.scaler.state_dict() if state.scaler else None,
            "sampler": state.sampler.state_dict(),
            "config": cfg.flat(),
            "world_size": backend.world_size,
            "nonfinite_total": state.nonfinite_total,
        }
        path = ckpt.write_checkpoint(
            out,
            state.step,
            model_sd=model_sd,
            ema_sd=ema_sd,
            state=extra,
            rng=dict(enumerate(rngs)),
            keep=cfg.run.checkpoints_total_limit,
        )
        logger.info("saved checkpoint %s", path)
    backend.barrier()


def load_state(state: State, path: str, saved: dict, backend: Backend) -> None:
    """Everything but the model weights (loaded before ``wrap``): EMA, optimizer, scaler, data position, RNG."""
    backend.load_ema_state_dict(state.ema, saved["ema"])
    backend.load_optimizer_state_dict(state.model, saved["state"]["optimizer"])
    if state.scaler is not None and saved["state"].get("scaler"):
        state.scaler.load_state_dict(saved["state"]["scaler"])
    state.sampler.load_state_dict(saved["state"]["sampler"])
    state.step = int(saved["state"]["step"])
    state.nonfinite_total = int(saved["state"].get("nonfinite_total", 0))
    same_world = int(saved["state"].get("world_size", 1)) == backend.world_size
    if "rng" in saved and same_world:
        ckpt.set_rng_state(saved["rng"])
    else:  # a different process count: no per-rank stream to continue, so derive fresh, distinct ones
        seed_everything(int(saved["state"]["config"]["seed"]) + backend.rank + 1_000_003 * state.step)
        logger.warning(
            "resumed with %d processes from a %s-process checkpoint: data order is exact, random streams are reseeded",
            backend.world_size,
            saved["state"].get("world_size"),
        )
    logger.info(
        "resumed from %s at step %d (epoch %d, %d samples into it)",
        path,
        state.step,
        state.sampler.epoch,
        state.sampler.consumed,
    )
