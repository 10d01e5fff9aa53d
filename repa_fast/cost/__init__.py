"""Whole-step cost model of REPA training: kernels' bytes and FLOPs by part, roofline time on a card, peak memory.

Torch-free (plain arithmetic), so any command can price a configuration before building it:

    from dataclasses import replace
    from repa_fast.cost import AS_BUILT, Config, Efficiency, GPUS, memory, max_batch, predict

    cfg = Config("SiT-XL/2", ("dinov2-vit-b",), resolution=256, batch=64, world=1)
    st = replace(AS_BUILT, targets="cached")          # the step structure (repa_fast.cost.structure)
    memory(cfg, st, Efficiency()).parts_gb            # predicted peak GB per GPU by part
    max_batch(cfg, st, GPUS["h100"], Efficiency())    # the largest per-GPU batch predicted to fit
    predict(cfg, st, GPUS["h100"], Efficiency())      # img/s, FLOPs and bytes per image by part (all predicted)

train.py --dry-run: ``Setup`` (what the run's config says), ``memory_report(setup)`` -> [(part, GB), ...],
``fits(setup, gpu_gb)``, ``suggest(setup, gpu_gb)`` -> the options (micro-batch with gradient accumulation,
activation checkpointing) that make it fit.

bench/step_model.py prints the table of the reference, ours before issue 18, its cuts and what goes beyond;
tests/test_cost_crosscheck.py holds the accounting to real steps on CPU. Modules: hardware (cards, efficiencies),
structure (the switches and presets), ops (kernel records, the Linear pattern, torchao's fp8 casts), sit / heads /
losses / encoder / fixed (the step's parts), attention (head-dim padding per backend), shapes (model sizes, parameter
lists, ``Config``), memory (peak memory, the largest batch, the dry-run report), step (assembly, roofline).
"""

from repa_fast.cost.hardware import GPUS, Card, Efficiency, card
from repa_fast.cost.memory import Memory, Option, Setup, fits, max_batch, memory, memory_report, suggest
from repa_fast.cost.shapes import Config
from repa_fast.cost.step import predict, roofline, step_ops
from repa_fast.cost.structure import AS_BUILT, BEFORE_ISSUE_18, OURS, REFERENCE, StepStructure, cuts

__all__ = [
    "AS_BUILT",
    "BEFORE_ISSUE_18",
    "GPUS",
    "OURS",
    "REFERENCE",
    "Card",
    "Config",
    "Efficiency",
    "Memory",
    "Option",
    "Setup",
    "StepStructure",
    "card",
    "cuts",
    "fits",
    "max_batch",
    "memory",
    "memory_report",
    "predict",
    "roofline",
    "step_ops",
    "suggest",
]
