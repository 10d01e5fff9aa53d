"""What ``--resume`` does with an option whose value differs from the checkpoint's (docs/run_directories.md §Resume).

Every TrainConfig option has one class, declared here (the one source; tests/engine/faults/test_resume_options.py
walks the option list, so a new option without a class fails):
    applied   takes effect on the restored state (optimizer hyper-parameters are set on the restored AdamW groups,
              clipping and EMA decay are read every step, the sampler cuts the remaining epoch into the new batch);
              each difference is logged once
    free      logging, cadence, paths, speed and parallelism: no effect on what the checkpoint means
    refused   defines the weights (config field metadata ``weights``) or the objective, recipe, data or seed: a
              different value is refused before anything is written
An option missing from the checkpoint's saved config (an older repa_fast) is not compared.
"""

import logging

from repa_fast.config import field_specs, weight_options
from repa_fast.errors import CheckpointError

logger = logging.getLogger("repa_fast")

APPLIED = (
    "learning_rate",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "ema_decay",
    "batch_size",
)
FREE = (
    # model speed options (same math)
    "fused_attn",
    "kernels",
    "compile",
    "compile_backend",
    # where things are, how they are read
    "encoder_checkpoint_dir",
    "targets",
    "targets_dir",
    "data_dir",
    "num_workers",
    "loader",
    "vae",
    "gradient_accumulation_steps",
    # the run's length, cadence, logging, precision and machine
    "output_dir",
    "exp_name",
    "max_train_steps",
    "epochs",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "sampling_steps",
    "preview_num_steps",
    "preview_cfg_scale",
    "log_every",
    "resume_step",
    "resume",
    "init_from",
    "mixed_precision",
    "allow_tf32",
    "report_to",
    "logging_dir",
    "on_nan",
    "parallel",
    "device",
    "eval_every",
    "eval_samples",
    "fid_reference",
    "eval_feature_net",
    "inception_weights",
    "eval_cache_dir",
    "eval_mode",
    "eval_num_steps",
    "eval_cfg_scale",
    "eval_batch_size",
    # speed and memory options (issue 18): the same training, computed another way
    "fp8",
    "activation_checkpointing",
    "attn_backend",
    "gpu_memory_gb",
    "init_ema_from",  # read with --init-from only (a new run), never on --resume
    # reliability options (issue 20)
    "max_skipped_steps",
    "on_bad_sample",
    "bad_sample_budget",
    "reset_data_position",
)
REFUSED_EXTRA = (  # beyond the weight-defining options: the objective, the recipe, the data and the seed
    "cfg_prob",
    "legacy",
    "l2r_depth",
    "encoder_pretrained",
    "dataset",
    "latent_scale",
    "path_type",
    "prediction",
    "weighting",
    "proj_coeff",
    "warmup_steps",
    "proj_coeff_schedule",
    "proj_coeff_start",
    "proj_half_life",
    "align_stop_step",
    "seed",
    # REG / iREPA (issue 19): the objective's terms and the targets' normalisation
    "cls",
    "spnorm_method",
    "zscore_alpha",
)


def resume_class(name: str) -> str | None:
    """ "applied", "free" or "refused" for option ``name``; None when it has no class (a test fails on that)."""
    if name in APPLIED:
        return "applied"
    if name in FREE:
        return "free"
    if name in REFUSED_EXTRA or name in weight_options():
        return "refused"
    return None


def table() -> dict[str, str]:
    """Every option and its class (None = unclassified)."""
    return {name: resume_class(name) for name, _ in field_specs()}


def _flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def check_resume_options(path: str, saved: dict, config: dict) -> list[str]:
    """Refuse (CheckpointError) when a refused option differs; returns the applied options that differ. An option
    without a class is refused too (the safe default until it is classified)."""
    diff = [k for k in config if k in saved and saved[k] != config[k]]
    refused = [k for k in diff if resume_class(k) in ("refused", None)]
    if refused:
        pairs = ", ".join(f"{_flag(k)} {saved[k]} (this run: {config[k]})" for k in refused)
        raise CheckpointError(
            f"{path} was trained with {pairs}; these options define the weights, the objective or the data and "
            "cannot change on --resume. Resume with the checkpoint's values, or start a new run with another "
            "--exp-name (--init-from the checkpoint keeps its weights)"
        )
    return [k for k in diff if resume_class(k) == "applied"]


def log_applied(path: str, saved: dict, config: dict, applied: list[str]) -> None:
    for k in applied:
        logger.info("--resume: %s %s applied (the checkpoint %s had %s)", _flag(k), config[k], path, saved[k])


def apply_to_optimizer(optimizer, config: dict) -> None:
    """Set the run's AdamW hyper-parameters on a restored optimizer (load_state_dict restores the saved ones)."""
    for group in optimizer.param_groups:
        group["lr"] = config["learning_rate"]
        group["betas"] = (config["adam_beta1"], config["adam_beta2"])
        group["eps"] = config["adam_epsilon"]
        group["weight_decay"] = config["adam_weight_decay"]  # one group, as build.build_optimizer makes
