"""``train.py`` for the multi-process tests, with process-count-invariant random draws.

The production loop draws t and the noise from per-rank streams (seed + rank, as the reference), so a 2-process run
cannot reproduce a 1-process run's numbers. Here, and only here, those two draws are replaced by draws keyed by
(seed, step, micro-batch, position of the sample in the GLOBAL batch): every sample gets the same t and noise (and
REG's class-token noise) whatever the number of processes, the accumulation split or the backend, so 1- and
N-process trajectories are comparable number for number. Everything else (model, data order, reduction, clipping,
AdamW, EMA, checkpoints) is the production path. Label dropout must be off (--cfg-prob 0): it is drawn inside the
model.

``REPA_FAST_TEST_NAN_STEP=k``: the micro-batch holding global sample 0 returns a NaN loss at optimizer step k (one
rank only under several processes): every backend must skip that step (weights, moments, step count, EMA unchanged).

``REPA_FAST_TEST_DUMP_LOADED=FILE``: right after a resume has loaded its checkpoint, gather the full model, EMA and
optimizer state back through the running backend (the production gather code) and save them to FILE (rank 0), so a
test can check that load -> shard -> gather is bit-exact on any backend and process count.

``REPA_FAST_FAULT="<point>:<step>"``: a SIGKILL at that point (tests/engine/faults.py).

    python tests/engine/parallel_entry.py <train.py flags>     (also under torchrun / deepspeed)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from repa_fast.cli import main  # noqa: E402
from repa_fast.engine import trainer  # noqa: E402
from repa_fast.objective import sample_time  # noqa: E402
from tests.engine import faults  # noqa: E402

_ctx = {"step": -1, "micro": 0}
_real_micro_step, _real_loss, _real_load = trainer.micro_step, trainer.training_loss, trainer.load_state


def _micro_step(cfg, state, backend, batch, encoders, amp_dtype, last):
    if state.step != _ctx["step"]:
        _ctx.update(step=state.step, micro=0)
    _ctx.update(cfg=cfg, rank=backend.rank, world=backend.world_size)
    try:
        return _real_micro_step(cfg, state, backend, batch, encoders, amp_dtype, last)
    finally:
        _ctx["micro"] += 1


def _loss(model, x0, y, targets, **kw):
    cfg, b = _ctx["cfg"], x0.shape[0]
    g = cfg.optim.batch_size  # global batch; rank r holds [r L, (r+1) L), micro-batch m is [m b, (m+1) b) of that
    offset = _ctx["rank"] * (g // _ctx["world"]) + (_ctx["micro"] % cfg.optim.gradient_accumulation_steps) * b
    gen = torch.Generator().manual_seed(1_000_003 * cfg.run.seed + _ctx["step"])
    t_all = sample_time(g, cfg.loss.weighting, cfg.loss.path_type, generator=gen)
    noise_all = torch.randn((g, *x0.shape[1:]), generator=gen)
    kw["t"] = t_all[offset : offset + b].to(x0.device)
    kw["noise"] = noise_all[offset : offset + b].to(x0.device, x0.dtype)
    cls = kw.get("cls_targets")
    if cls is not None and kw.get("cls_noise") is None:  # REG: the class token's noise, keyed the same way
        cls_all = torch.randn((g, *cls[0].shape[1:]), generator=gen)
        kw["cls_noise"] = cls_all[offset : offset + b].to(cls[0].device, cls[0].dtype)
    out = _real_loss(model, x0, y, targets, **kw)
    if offset == 0 and _ctx["step"] + 1 == int(os.environ.get("REPA_FAST_TEST_NAN_STEP", -1)):
        out = {k: v * float("nan") for k, v in out.items()}
    return out


def _load_state(state, path, saved, backend):
    _real_load(state, path, saved, backend)
    dump = os.environ.get("REPA_FAST_TEST_DUMP_LOADED")
    if dump:
        loaded = {
            "model": backend.full_state_dict(state.model),
            "ema": backend.full_ema_state_dict(state.ema),
            "optimizer": backend.optimizer_state_dict(state.model),
        }  # collectives: every rank
        if backend.is_main:
            torch.save(loaded, dump)


trainer.micro_step, trainer.training_loss, trainer.load_state = _micro_step, _loss, _load_state
faults.install()  # REPA_FAST_FAULT (tests/engine/faults.py)

if __name__ == "__main__":
    sys.exit(main())
