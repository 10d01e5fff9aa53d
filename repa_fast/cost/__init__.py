"""Whole-step cost model of REPA training: kernels' bytes and FLOPs by part, roofline time on a card, peak memory.

Torch-free (plain arithmetic), so any command can price a configuration before building it:

    from dataclasses import replace
    from repa_fast.cost import OURS, Config, Efficiency, GPUS, memory, max_batch, predict

    cfg = Config("SiT-XL/2", ("dinov2-vit-b",), resolution=256, batch=64, world=1)
    st = replace(OURS, targets="cached")              # the step structure (repa_fast.cost.structure)
    memory(cfg, st, Efficiency()).parts_gb            # predicted peak GB per GPU by part (train.py --dry-run)
    max_batch(cfg, st, GPUS["h100"], Efficiency())    # the largest per-GPU batch predicted to fit
    predict(cfg, st, GPUS["h100"], Efficiency())      # img/s, FLOPs and bytes per image by part (all predicted)

bench/step_model.py prints the table of the reference, ours and issue 18's cuts; tests/test_cost_crosscheck.py
holds the accounting to real steps on CPU. Modules: hardware (cards, efficiencies), structure (the switches and
presets), ops (kernel records, the Linear pattern), sit / encoder / fixed (the step's parts), attention (head-dim
padding per backend), shapes (model sizes, parameter lists), step (assembly, roofline, memory).
"""

from repa_fast.cost.hardware import GPUS, Card, Efficiency, card
from repa_fast.cost.step import Config, Memory, max_batch, memory, predict, roofline, step_ops
from repa_fast.cost.structure import OURS, REFERENCE, StepStructure, cuts

__all__ = [
    "GPUS",
    "OURS",
    "REFERENCE",
    "Card",
    "Config",
    "Efficiency",
    "Memory",
    "StepStructure",
    "card",
    "cuts",
    "max_batch",
    "memory",
    "predict",
    "roofline",
    "step_ops",
]
