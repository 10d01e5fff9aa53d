"""GPU-only checks of the training step (skipped without CUDA; run them on a GPU machine with `pytest -m gpu`)."""

import pytest
import torch

from repa_fast.engine import trainer as T
from repa_fast.engine.ema import EMA
from repa_fast.engine.metrics import LossMeter
from repa_fast.engine.parallel import Backend

from .helpers import tiny_cfg

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_training_step_makes_no_host_sync(tmp_path, precision):
    cfg = tiny_cfg(tmp_path, "--device", "cuda", "--mixed-precision", precision)
    device = torch.device("cuda")
    dataset = T.build_dataset(cfg)
    model, encoders = T.build_models(cfg, dataset, device)
    backend = Backend("cuda")
    opt = T.build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    sampler = T.ResumableDistributedSampler(len(dataset), cfg.optim.batch_size)
    state = T.State(model, backend.wrap(model, opt), EMA(model), opt, scaler, sampler)
    meter = LossMeter(device)
    items = [dataset[i] for i in range(cfg.optim.batch_size)]
    batch = tuple(torch.stack([it[k] for it in items]).to(device) for k in range(3))
    amp = T.AMP_DTYPES[precision]
    for _ in range(2):  # warm-up: lazy initialisation may sync once
        meter.add_losses(T.micro_step(cfg, state, backend, batch, encoders, amp, last=True))
        T.optimizer_step(cfg, state, backend, meter)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            meter.add_losses(T.micro_step(cfg, state, backend, batch, encoders, amp, last=True))
            T.optimizer_step(cfg, state, backend, meter)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter.read(backend)["loss"] > 0
