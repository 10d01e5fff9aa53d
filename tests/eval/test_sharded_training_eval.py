"""The in-training evaluation sharded over 2 processes (gloo, CPU) equals the one-process evaluation.

The same EMA weights (a tiny SiT whose weights are the seeded initialisation plus seeded noise, so that it does not
return its input) are evaluated by ``repa_fast.eval.training.TrainingEvaluator`` once in this process and once under
torchrun with 2 ranks (the production DDP backend's process group and ``gather_objects``): each rank samples only
its round-robin share of the sampling batches, the features are gathered to rank 0, and FD-digits / IS-digits are
the one-process values exactly, with the ODE sampler and with the SDE sampler (whose noise is keyed by the batch).

    python tests/eval/test_sharded_training_eval.py OUT_DIR REF.npz CACHE_DIR     (a rank; torchrun starts two)
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SAMPLES, BATCH = 10, 4  # 3 sampling batches (4, 4, 2): rank 0 samples batches 0 and 2, rank 1 batch 1
MODES = ("ode", "sde")


def _evaluate(out_dir, ref, cache, mode, backend=None):
    """(metrics, batches sampled here) of one evaluation of the fixed weights."""
    from repa_fast.build import build_dataset, build_model, seed_everything
    from repa_fast.eval.training import make_training_evaluator
    from tests.engine.helpers import tiny_cfg

    flags = ["--eval-every", 1, "--eval-samples", SAMPLES, "--eval-batch-size", BATCH, "--eval-num-steps", 3]
    flags += ["--eval-mode", mode, "--eval-cfg-scale", 1.5, "--fid-reference", ref, "--eval-feature-net", "digits"]
    cfg = tiny_cfg(os.path.join(out_dir, mode), *flags, "--eval-cache-dir", cache, "--proj-coeff", 0, steps=2)
    dataset = build_dataset(cfg)
    seed_everything(0)
    model = build_model(cfg, dataset.latent_shape, dataset.num_classes, [])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised final layer would make v = 0: give every weight a value
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    is_main = backend is None or backend.is_main
    ev = make_training_evaluator(cfg, dataset, torch.device("cpu"), is_main, backend)
    seen = []
    real = ev.sample_batch
    ev.sample_batch = lambda m, b: (seen.append(b), real(m, b))[1]
    return ev(model, 1), seen


def _private_cache(tmp_path, digits_cache):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.join(digits_cache, "digits_classifier.safetensors"), cache / "digits_classifier.safetensors")
    return str(cache)


@pytest.mark.multiproc
def test_two_ranks_sample_their_share_and_give_the_one_process_fid(tmp_path, digits_cache):
    from repa_fast.eval.digits import digits_images
    from tests.engine import parallel_helpers as H

    images, _ = digits_images(16)
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, images[:120].permute(0, 2, 3, 1).numpy())
    cache = _private_cache(tmp_path, digits_cache)
    one = {}
    for mode in MODES:
        one[mode], seen = _evaluate(str(tmp_path / "one"), ref, cache, mode)
        assert seen == [0, 1, 2]  # one process samples every batch
        assert one[mode]["FD-digits-10"] > 0 and one[mode]["IS-digits-10"] >= 1.0
    assert one["ode"]["FD-digits-10"] != one["sde"]["FD-digits-10"]

    H.check_ok(H.torchrun([str(tmp_path / "two"), ref, cache], script=os.path.abspath(__file__)))
    with open(tmp_path / "two" / "result.json") as f:
        two = json.load(f)
    assert two["batches"] == {mode: [[0, 2], [1]] for mode in MODES}  # each rank sampled only its share
    for mode in MODES:
        assert two["metrics"][mode] == one[mode], mode  # exactly: the same samples and features, in batch order


def _rank_main(out_dir, ref, cache):
    from repa_fast.engine.parallel import make_backend

    backend = make_backend("ddp", "cpu")
    try:
        metrics, batches = {}, {}
        for mode in MODES:
            metrics[mode], seen = _evaluate(out_dir, ref, cache, mode, backend)
            batches[mode] = backend.gather_objects(seen)
            assert (metrics[mode] != {}) == backend.is_main
        if backend.is_main:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump({"metrics": metrics, "batches": batches}, f)
    finally:
        backend.shutdown()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
