"""The training loop: REPA/SiT on any backend, resumable bit for bit, with no host sync inside a step.

One optimizer step = ``gradient_accumulation_steps`` micro-batches per process:
    x0 = (mean + std * eps) * latent_scale           posterior sample on device (docs/objective.md §Latents)
    z_k = encoder_k(image)                           frozen targets under no_grad (§Alignment targets)
    loss = L_den + proj_coeff * L_proj               repa_fast.objective.training_loss (§Losses)
then unscale (fp16) -> clip -> fused AdamW step (skipped on non-finite gradients) -> EMA (not on skipped steps).
Losses stay on device and are read every ``log_every`` steps. Everything that can refuse a command (options,
resume compatibility, data, weights) is checked before the first write to the run directory. SIGTERM / SIGINT /
SIGUSR1 stop the run after the current step with a checkpoint (engine/stop.py).

This module runs the loop; repa_fast/build.py assembles what it runs (``build_run``, then ``build_training`` once the
weights are in place, in the order and with the seeding documented there), and ``checkpoint.Checkpointer`` decides
when a save is due and writes it: the loop only asks.
"""

import logging
import os
import time
from dataclasses import dataclass

import torch

from repa_fast.build import (
    AMP_DTYPES,
    Run,
    build_backend,
    build_evaluator,
    build_loader,
    build_phase,
    build_run,
    build_training,
    loss_kwargs,
    rank_seed,
    seed_everything,
)
from repa_fast.config import ConfigError, TrainConfig, run_dir
from repa_fast.data import ResumableDistributedSampler
from repa_fast.data.sampler import dataset_fingerprint
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine import compat, resume_policy, run_lock
from repa_fast.engine.ema import EMA
from repa_fast.engine.metrics import LogSinks, LossMeter, setup_logging
from repa_fast.engine.parallel import Backend
from repa_fast.engine.parallel.process_group import launch_env
from repa_fast.engine.preview import Previewer, plot_loss_curve
from repa_fast.engine.stop import StopRequest
from repa_fast.errors import TrainingDiverged, TrainingStopped
from repa_fast.io import write_json
from repa_fast.objective import sample_posterior, training_loss, warmup_loss
from repa_fast.recipe import Phase, Recipe

logger = logging.getLogger("repa_fast")


@dataclass
class State:
    """Everything the loop mutates, in one place."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    ema: EMA  # or ema.ShardedEMA (same interface)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: ResumableDistributedSampler
    step: int = 0
    nonfinite_total: int = 0
    skipped_total: int = 0  # optimizer steps skipped on non-finite gradients (--max-skipped-steps bounds a streak)
    stop: StopRequest | None = None  # signals asking for a graceful stop (engine/stop.py)
    stopped_by: str = ""  # set when the loop ended early on a signal
    recipe: Recipe | None = None  # which phase each step is in (repa_fast.recipe)
    phase: Phase | None = None  # the phase the wrapper, optimizer and EMA were built for
    fixed: frozenset = frozenset()  # parameters that never train (pos_embed)
    evaluator: object = None  # repa_fast.eval.training.TrainingEvaluator when --eval-every is set
    seed: int = 0  # --seed: the base of the reseed rule after a resume without RNG streams (build.rank_seed)


def train(cfg: TrainConfig, resume_command: str | None = None) -> dict:
    """Run training as configured; returns a summary (final step, run directory, last logged metrics; after a
    signal also ``stopped_by``, ``checkpoint`` and ``resume_command``, the command that continues the run).

    ``cfg.validate`` runs first (the CLI's checks, for library callers too). A collective that fails because another
    process died or hung (bounded by REPA_FAST_DIST_TIMEOUT) is raised as ``PeerFailure``; the process group is
    destroyed on every exit path.
    """
    cfg.validate(launch_env()[1])
    backend = build_backend(cfg)
    clean = False
    lock = run_lock.RunLock(run_dir(cfg), enabled=backend.is_main)  # taken by prepare_run_dir (one trainer per run)
    try:
        summary = _train(cfg, backend, resume_command or "the same command with --resume", lock)
        clean = True
        return summary
    except Exception as e:
        good = ckpt.list_checkpoints(run_dir(cfg))
        failure = backend.peer_failure(e, ckpt.step_dir(run_dir(cfg), good[-1]) if good else None)
        if failure is None or failure is e:
            raise
        raise failure from e
    finally:
        lock.release()
        backend.shutdown(clean=clean)


def check_resume(
    cfg: TrainConfig, backend: Backend, resume_command: str = "the same command with --resume"
) -> tuple[str | None, dict | None, bool]:
    """(path, contents, foreign) of the checkpoint to resume from, refused before anything is written if it does not
    fit. A reference / ERW ``.pt`` file (``foreign``) is read once the model exists (``compat.read_as_saved``). A
    damaged checkpoint is refused naming the newest intact one and the command that resumes from it."""
    resume_from, foreign = compat.resolve_any_resume(run_dir(cfg), cfg.run.resume, cfg.run.resume_step)
    if foreign:
        return resume_from, None, True
    try:
        saved = ckpt.read_checkpoint(resume_from, rank=backend.rank) if resume_from else None
    except ckpt.CheckpointDamaged as e:
        raise ckpt.refuse_damaged(run_dir(cfg), e, ckpt.resume_hint(resume_command)) from e
    if saved is not None:
        ckpt.check_compatible(resume_from, saved["state"].get("config", {}), cfg.flat())
    return resume_from, saved, False


def check_data(cfg: TrainConfig, path: str, saved: dict, dataset) -> None:
    """Refuse (before anything is written) a resume on data whose size or checksum differs from the checkpoint's,
    unless --reset-data-position asks to restart the data order (docs/run_directories.md §Data)."""
    had = saved["state"].get("data") or {"num_samples": saved["state"]["sampler"]["num_samples"]}
    now = dataset_fingerprint(dataset)
    same = had["num_samples"] == now["num_samples"] and had.get("checksum", now["checksum"]) == now["checksum"]
    if same or cfg.run.reset_data_position:
        return
    what = f"{had['num_samples']} samples" + (f" (checksum {had['checksum']})" if had.get("checksum") else "")
    now_sum = f" (checksum {now['checksum']})" if now["checksum"] else ""
    raise ckpt.CheckpointError(
        f"the dataset changed since {path}: it was trained on {what}, --data-dir "
        f"{cfg.data.data_dir or cfg.data.dataset} now has {now['num_samples']} samples"
        f"{now_sum}, so the saved data position does not apply. "
        "Either restore the data as it was and resume, or add --reset-data-position to keep the weights, EMA and "
        "optimizer and restart the data order at the next epoch (nothing was written)"
    )


def prepare_run_dir(cfg: TrainConfig, backend: Backend, lock: run_lock.RunLock | None = None) -> str:
    out = run_dir(cfg)
    if backend.is_main:
        try:
            os.makedirs(out, exist_ok=True)
            if lock is not None:
                lock.acquire()  # a second trainer is refused here, having written nothing
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


def _train(cfg: TrainConfig, backend: Backend, resume_command: str, lock: run_lock.RunLock | None = None) -> dict:
    setup_logging(backend.is_main)  # stderr only: nothing is written before every check has passed
    _report_launcher(cfg, backend)
    if backend.is_main:
        run_lock.check_unlocked(run_dir(cfg))  # another trainer here: refused before any work (and any write)
    resume_from, saved, foreign = check_resume(cfg, backend, resume_command)
    run = build_run(cfg, backend)  # seed, dataset, encoders / cached targets, SiT, recipe (repa_fast.build)
    if foreign:  # a reference / ERW .pt file (weights_only: no class unpickled but the reference's Namespace)
        saved = compat.read_as_saved(resume_from, run.model, cfg.run.resume_step, lambda s: run.recipe.phase(s).name)
    elif saved is not None:
        check_data(cfg, resume_from, saved, run.dataset)
        if cfg.run.reset_data_position:  # weights, EMA and optimizer continue; the data order restarts
            sampler = saved["state"]["sampler"]
            epoch = int(sampler["epoch"]) + 1
            saved["state"]["sampler"] = {**sampler, "epoch": epoch, "consumed": 0, "num_samples": len(run.dataset)}
    evaluator = build_evaluator(cfg, run.dataset, backend)  # checked before any write
    init_sd = compat.init_weights(cfg.run.init_from, run.model) if cfg.run.init_from and saved is None else None
    init_ema, ema_source = (None, "")
    if init_sd is not None:  # --init-ema-from: the file's EMA (when it has one) or its weights start our EMA
        init_ema, ema_source = compat.init_ema_weights(cfg.run.init_from, run.model, cfg.run.init_ema_from)
    out = prepare_run_dir(cfg, backend, lock)  # the first write to the run directory (and the run's lock)
    setup_logging(backend.is_main, out)
    if backend.is_main:
        save_resolved_config(cfg, out)
        _log_setup(run)
    if saved is not None:  # full fp32 weights into the plain model: every backend then shards/copies them as usual
        backend.load_model_state_dict(run.model, saved["model"])
    elif init_sd is not None:  # a new run (step 0) from existing weights; the EMA starts from them
        backend.load_model_state_dict(run.model, init_sd)
        logger.info("initialised the model from %s", cfg.run.init_from)
    state = start_state(run, saved, resume_from, evaluator)
    if init_sd is not None:
        if init_ema is not None:
            backend.load_ema_state_dict(state.ema, init_ema)
        logger.info("the EMA starts from %s", ema_source if init_ema is not None else f"the weights ({ema_source})")
    if saved is not None and cfg.run.reset_data_position and not foreign:
        logger.warning("--reset-data-position: the data order restarts at epoch %d", state.sampler.epoch)
    if saved is not None:  # options that apply on resume (engine/resume_policy.py): set on the restored state
        saved_cfg, flat = saved["state"].get("config", {}), cfg.flat()
        resume_policy.apply_to_optimizer(state.optimizer, flat)
        resume_policy.log_applied(
            resume_from,
            saved_cfg,
            flat,
            [k for k in resume_policy.APPLIED if k in saved_cfg and saved_cfg[k] != flat[k]],
        )
    loader = build_loader(cfg, run.dataset, state.sampler, run.micro, backend.device, backend.rank)
    sinks = LogSinks(out, cfg.run.report_to, cfg.flat(), enabled=backend.is_main)
    previewer = None
    if backend.is_main and cfg.run.sampling_steps:
        previewer = _make_previewer(cfg, run.dataset, backend.device)
    checkpointer = ckpt.Checkpointer(
        out,
        every=cfg.run.checkpointing_steps,
        last_step=cfg.run.max_train_steps,
        boundaries=run.recipe.boundaries(),  # the end of a phase is always saved
        keep=cfg.run.checkpoints_total_limit,
        config=cfg.flat(),
        data=dataset_fingerprint(run.dataset),
    )
    try:
        with StopRequest() as state.stop:
            last = run_loop(cfg, state, backend, loader, run.encoders, sinks, previewer, checkpointer)
    finally:
        sinks.close()
    return _summary(state, backend, out, last, resume_command)


def start_state(run: Run, saved: dict | None, resume_from: str | None, evaluator) -> State:
    """The loop's State at the first step: a fresh run's, or the checkpoint's (``load_state``)."""
    phase = run.recipe.phase(int(saved["state"]["step"]) if saved else 0)
    t = build_training(run, phase)  # wrap, optimizer, EMA; then seed + rank (repa_fast.build)
    state = State(
        run.model,
        t.train_model,
        t.ema,
        t.optimizer,
        t.scaler,
        t.sampler,
        recipe=run.recipe,
        phase=phase,
        fixed=run.fixed,
        evaluator=evaluator,
        seed=run.cfg.run.seed,
    )
    if saved is not None:
        load_state(state, resume_from, saved, run.backend)
    return state


def _summary(state: State, backend: Backend, out: str, last: dict, resume_command: str) -> dict:
    if backend.is_main and os.path.exists(os.path.join(out, "log.jsonl")):
        plot_loss_curve(os.path.join(out, "log.jsonl"), os.path.join(out, "loss_curve.png"))
    summary = {"step": state.step, "run_dir": out, "metrics": last, "nonfinite_losses": state.nonfinite_total}
    summary["skipped_steps"] = state.skipped_total
    if state.stopped_by:
        summary.update(stopped_by=state.stopped_by, checkpoint=ckpt.step_dir(out, state.step))
        summary["resume_command"] = resume_command
        logger.warning(
            "stopped by %s at step %d, checkpoint %s; continue with: %s",
            state.stopped_by,
            state.step,
            summary["checkpoint"],
            resume_command,
        )
    return summary


def change_phase(cfg: TrainConfig, state: State, backend: Backend, phase: Phase) -> None:
    """The step crossed a phase boundary: rebuild wrapper, optimizer and EMA for the new phase. Under FSDP2 / ZeRO-3
    the shards are first gathered into a plain module (``backend.unshard``), which is then wrapped and sharded again
    for the new phase: what a resume from the boundary checkpoint does, so the two agree bit for bit."""
    state.train_model = state.optimizer = state.ema = None  # release the old wrapper (and its DDP hooks) first
    state.model = backend.unshard(state.model)  # the module itself, except where it was sharded in place
    state.train_model, state.optimizer, state.ema = build_phase(cfg, backend, state.model, phase, state.fixed)
    state.train_model.train()
    state.phase = phase
    n = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    logger.info(
        "step %d: phase %s (%.2fM trainable params): fresh optimizer, EMA restarts from the weights",
        state.step,
        phase.name,
        n / 1e6,
    )


def _report_launcher(cfg: TrainConfig, backend: Backend) -> None:
    """`accelerate launch` (REPA's README launcher) sets the same RANK/WORLD_SIZE/LOCAL_RANK as torchrun; its
    mixed-precision setting is not ours to follow: a disagreement is reported and --mixed-precision wins."""
    acc = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if backend.is_main and acc and acc != "no" and acc != cfg.run.mixed_precision:
        logger.warning(
            "ACCELERATE_MIXED_PRECISION=%s (from accelerate launch) differs from --mixed-precision %s: training uses "
            "--mixed-precision %s; pass --mixed-precision %s to train in accelerate's precision",
            acc,
            cfg.run.mixed_precision,
            cfg.run.mixed_precision,
            acc,
        )


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


def _log_setup(run: Run) -> None:
    cfg, model, dataset, backend = run.cfg, run.model, run.dataset, run.backend
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
        run.micro,
    )
    logger.info(
        "data: %s (%d samples, %s, latents %s)",
        type(dataset).__name__,
        len(dataset),
        f"{dataset.resolution}px",
        tuple(dataset.latent_shape),
    )
    for e in run.encoders:
        kind = "pretrained weights" if cfg.target.encoder_pretrained else "RANDOM weights (demo/test only)"
        logger.info("target encoder %s: %s, %d tokens x %d", e.enc_name, kind, e.grid**2, e.embed_dim)


def save_resolved_config(cfg: TrainConfig, out: str) -> None:
    data = cfg.to_json()
    if "deepspeed" in data:  # derived from batch / (processes x accumulation): the file stays valid at any world size
        data["deepspeed"] = {**data["deepspeed"], "train_micro_batch_size_per_gpu": "auto"}
    write_json(os.path.join(out, "config.json"), data, indent=2)


def get_batch(data_iter, device, need_images: bool = True):
    """Next (image, moments, label) on ``device``; images stay on the host when no encoder needs them."""
    image, moments, label = next(data_iter)
    if isinstance(image, list):  # cached targets, one (B, T, D) tensor per encoder
        image = [z.to(device, non_blocking=True) for z in image]
    elif isinstance(image, dict):  # cached targets with REG's class tokens: {"patch": [...], "cls": [...]}
        image = {k: [z.to(device, non_blocking=True) for z in v] for k, v in image.items()}
    elif need_images:
        image = image.to(device, non_blocking=True)
    return image, moments.to(device, non_blocking=True), label.to(device, non_blocking=True)


def micro_step(cfg: TrainConfig, state: State, backend: Backend, batch, encoders, amp_dtype, last: bool) -> dict:
    """Forward and backward of one micro-batch; returns the (device) loss dict."""
    image, moments, labels = batch
    phase = state.phase
    x0 = sample_posterior(moments, cfg.data.latent_scale)
    targets, cls_targets = step_targets(cfg, phase, image, encoders, amp_dtype)
    if cfg.model.legacy:  # reference --legacy: labels dropped here and again inside the model
        drop = torch.rand(labels.shape[0], device=labels.device) < cfg.model.cfg_prob
        labels = torch.where(drop, state.model.num_classes, labels)
    weight = phase.align_weight(state.step)  # a host float from the step: no sync
    with backend.no_sync(state.train_model, last):
        if phase.clean_input:  # ERW warm-up
            losses = warmup_loss(
                state.train_model,
                x0,
                labels,
                targets,
                num_blocks=phase.num_blocks,
                proj_coeff=weight,
                autocast_dtype=amp_dtype,
                impl=state.model.impl,  # the alignment-loss kernel follows the model's switch (model_kwargs)
                cls_targets=cls_targets,
                **loss_kwargs(cfg),
            )
        else:
            losses = training_loss(
                state.train_model,
                x0,
                labels,
                targets,
                path_type=cfg.loss.path_type,
                prediction=cfg.loss.prediction,
                weighting=cfg.loss.weighting,
                proj_coeff=weight,
                autocast_dtype=amp_dtype,
                impl=state.model.impl,  # the alignment-loss kernel follows the model's switch (model_kwargs)
                cls_targets=cls_targets,
                cls_coeff=cfg.loss.cls,
                **loss_kwargs(cfg),
            )
        backend.backward(losses["loss"] / cfg.optim.gradient_accumulation_steps, state.scaler)
    return losses


def step_targets(cfg: TrainConfig, phase: Phase, image, encoders, amp_dtype) -> tuple[list, list | None]:
    """(patch-token targets, REG's class tokens or None) of a micro-batch: computed by the encoders or read from the
    target cache (a list of patch rows, or with class tokens {"patch": [...], "cls": [...]}). With REG the class
    tokens are read in every phase (the token is sampled jointly: docs/methods.md §HASTE-style stop); the patch
    targets only where the phase aligns. Class tokens are fp32, as the cache gives them (REG's noise is drawn like
    them, objective.training_loss)."""
    reg = cfg.model.reg
    if not (phase.align or reg):
        return [], None
    if isinstance(image, dict):  # --targets cached with class tokens (tools/cache_targets.py --with-cls)
        patch, cls = [z.float() for z in image["patch"]], [c.float() for c in image["cls"]]
    elif isinstance(image, list):  # --targets cached: stored fp32/fp16/bf16 rows (repa_fast.tools.cache_targets)
        patch, cls = [z.float() for z in image], None
    else:
        with torch.no_grad(), torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outs = [enc(image, with_cls=True) if reg else enc(image) for enc in encoders]
        patch = [o[0] for o in outs] if reg else outs
        cls = [o[1].float() for o in outs] if reg else None
    return (patch if phase.align else []), (cls if reg else None)


def optimizer_step(cfg: TrainConfig, state: State, backend: Backend, meter: LossMeter) -> None:
    max_norm = cfg.optim.max_grad_norm or float("inf")  # 0 = no clipping (the norm is still computed and logged)
    grad_norm, skipped = backend.clip_and_step(state.model, max_norm, state.scaler)
    backend.update_ema(state.ema, state.model, cfg.optim.ema_decay, skipped)
    meter.add_step(grad_norm, skipped, state.step + 1)  # the step number feeds the on-device skip streak
    state.sampler.advance()
    state.step += 1


def run_loop(cfg, state: State, backend, loader, encoders, sinks, previewer, checkpointer: ckpt.Checkpointer) -> dict:
    """Steps until --max-train-steps (or --epochs, or a stop signal); asks ``checkpointer`` after every step whether a
    save is due. Returns the last logged metrics."""
    out = checkpointer.run_dir
    amp_dtype = AMP_DTYPES[cfg.run.mixed_precision]
    meter = LossMeter(backend.device, max_skipped=cfg.run.max_skipped_steps)
    accum, last_metrics = cfg.optim.gradient_accumulation_steps, {}
    progress = _progress(cfg, state, backend)
    t_last, step_last = time.perf_counter(), state.step
    data_iter = iter(loader)
    state.train_model.train()
    while state.step < cfg.run.max_train_steps and state.sampler.epoch < cfg.run.epochs:
        phase = state.recipe.phase(state.step)
        if phase is not state.phase:
            change_phase(cfg, state, backend, phase)
        for i in range(accum):
            batch = _next_batch(data_iter, backend.device, bool(encoders))
            if batch is None:  # epoch over (the sampler has already rolled to the next one)
                data_iter = iter(loader)
                batch = _next_batch(data_iter, backend.device, bool(encoders))
            meter.add_losses(micro_step(cfg, state, backend, batch, encoders, amp_dtype, last=i == accum - 1))
        optimizer_step(cfg, state, backend, meter)
        progress.update(1)
        step = state.step
        if step % cfg.run.log_every == 0 or step == cfg.run.max_train_steps:
            metrics = meter.read(backend, stop=state.stop is not None and state.stop.requested)  # the one sync
            now = time.perf_counter()
            metrics["img_per_s"] = (step - step_last) * cfg.optim.batch_size / (now - t_last)
            t_last, step_last, last_metrics = now, step, metrics
            _check_nonfinite(cfg, state, metrics, out)
            sinks.log(step, metrics)
            _check_diverged(cfg, state, meter.diverged_at, out)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.1f}")
        stopping = _stop_agreed(state, backend, meter) and step < cfg.run.max_train_steps
        t_last += _between_steps(cfg, state, backend, meter, checkpointer, sinks, previewer, stopping)
        if stopping:
            state.stopped_by = state.stop.name or "a signal to another process"
            break
    progress.close()
    return last_metrics


def _between_steps(cfg, state: State, backend, meter, checkpointer, sinks, previewer, stopping: bool) -> float:
    """The checkpoint, preview and evaluation due after ``state.step``; returns the seconds they took (img/s counts
    training time only, not checkpoints and previews)."""
    step, out = state.step, checkpointer.run_dir
    save_due = checkpointer.due(step, stopping)
    preview_due = cfg.run.sampling_steps and (step % cfg.run.sampling_steps == 0 or step == cfg.run.max_train_steps)
    if (save_due or preview_due) and backend.device.type == "cuda":
        torch.cuda.synchronize()  # both sync anyway; without this the step's queued GPU work counts as pause
    t_pause = time.perf_counter()
    if save_due:
        if cfg.run.on_nan == "stop":  # never save after an unread non-finite loss (one sync, at save time only)
            _check_nonfinite(cfg, state, {"nonfinite_losses": meter.pending_nonfinite(backend)}, out)
        if cfg.run.max_skipped_steps:  # a diverged run stops instead of saving (one sync, at save time only)
            _check_diverged(cfg, state, meter.pending_divergence(backend), out)
        checkpointer.save(state, backend)
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
    if state.evaluator is not None and state.evaluator.due(step):  # FID-N / IS of the EMA, sampled on every rank
        sinks.log(step, state.evaluator(backend.ema_module(state.ema, all_ranks=True), step))
    return time.perf_counter() - t_pause


def _stop_agreed(state: State, backend: Backend, meter: LossMeter) -> bool:
    """One process stops after any step; several stop together at the --log-every read (engine/stop.py)."""
    if backend.world_size == 1:
        return state.stop is not None and state.stop.requested
    return meter.stop_agreed


def _next_batch(data_iter, device, need_images):
    try:
        return get_batch(data_iter, device, need_images)
    except StopIteration:
        return None


def _check_diverged(cfg, state: State, started: int, out: str) -> None:
    """--max-skipped-steps consecutive skipped steps from step ``started`` (-1: none): stop with exit code 7."""
    if started < 0:
        return
    good = ckpt.newest_intact(out)
    where = f"the newest intact checkpoint is {ckpt.step_dir(out, good)}" if good else "no checkpoint was saved yet"
    raise TrainingDiverged(
        f"training diverged at step {started}: {cfg.run.max_skipped_steps} consecutive steps from there were skipped "
        f"(non-finite loss or gradients; --max-skipped-steps {cfg.run.max_skipped_steps}); stopped at step "
        f"{state.step} with nothing saved after the divergence, {where}. Resume from it with a lower "
        "--learning-rate or --max-grad-norm, or check the data (a sample with extreme values)"
    )


def _check_nonfinite(cfg, state: State, metrics: dict, out: str) -> None:
    n = metrics["nonfinite_losses"]
    state.nonfinite_total += n
    state.skipped_total += metrics.get("skipped_steps", 0)
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


def load_state(state: State, path: str, saved: dict, backend: Backend) -> None:
    """Everything but the model weights (loaded before ``wrap``): EMA, optimizer, scaler, data position, RNG.

    A checkpoint written at the end of a phase (``phase`` differs from the step's) continues into the next phase as
    an uninterrupted run does: weights only, EMA from the weights and a fresh optimizer.
    """
    if saved["state"].get("phase", state.phase.name) == state.phase.name:
        backend.load_ema_state_dict(state.ema, saved["ema"])
        backend.load_optimizer_state_dict(state.model, saved["state"]["optimizer"])
    else:
        logger.info(
            "%s ends phase %s: phase %s starts from its weights (EMA restarts from them, fresh optimizer)",
            path,
            saved["state"]["phase"],
            state.phase.name,
        )
    if state.scaler is not None and saved["state"].get("scaler"):
        state.scaler.load_state_dict(saved["state"]["scaler"])
    state.step = int(saved["state"]["step"])
    if saved["state"].get("foreign"):  # the reference saved no data position or RNG: fresh, distinct streams
        seed_everything(rank_seed(state.seed, backend.rank, state.step))
        logger.info(  # again, now that train.log exists: the file was read before the run directory was written
            "resumed from %s at step %d (data order restarts at epoch 0); not restored: %s",
            path,
            state.step,
            ", ".join(saved["state"]["foreign"]),
        )
        return
    state.sampler.load_state_dict(saved["state"]["sampler"])
    state.nonfinite_total = int(saved["state"].get("nonfinite_total", 0))
    state.skipped_total = int(saved["state"].get("skipped_total", 0))
    same_world = int(saved["state"].get("world_size", 1)) == backend.world_size
    if "rng" in saved and same_world:
        ckpt.set_rng_state(saved["rng"])
    else:  # a different process count (or an older checkpoint without this rank's file): fresh, distinct streams
        seed_everything(rank_seed(int(saved["state"]["config"]["seed"]), backend.rank, state.step))
        if same_world:
            logger.warning(
                "%s has no RNG file for rank %d (an older repa_fast): random streams are reseeded, so this resume "
                "is not bitwise identical to an uninterrupted run",
                path,
                backend.rank,
            )
        else:
            logger.warning(
                "resumed with %d processes from a %s-process checkpoint: data order is exact, random streams are "
                "reseeded",
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
