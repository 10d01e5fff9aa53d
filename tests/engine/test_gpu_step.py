"""GPU-only checks of the training step (skipped without CUDA; run them on a GPU machine with `pytest -m gpu`)."""

import pytest
import torch

from .helpers import StepRig, tiny_cfg

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_training_step_makes_no_host_sync(tmp_path, precision):
    rig = StepRig(tiny_cfg(tmp_path, "--device", "cuda", "--mixed-precision", precision), "cuda")
    for _ in range(2):  # warm-up: lazy initialisation may sync once
        rig.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            rig.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rig.meter.read(rig.backend)["loss"] > 0
