"""The target cache with REG's class tokens (``--with-cls``): cached and computed REG targets train identically, a
cache without class tokens is refused for a REG run, naming the option to rebuild it."""

import json
import os

import numpy as np
import pytest
import torch

from repa_fast.data import DataError
from repa_fast.data import cached_targets as cached
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.trainer import train
from repa_fast.tools import cache_targets as ct
from tests.data.helpers import make_ref_dataset

from ..engine.helpers import tiny_cfg
from .test_cache_targets import BATCH, CACHE, RUN, N


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-cls") / "data"
    make_ref_dataset(str(root), range(N), resolution=32, latent_shape=(8, 4, 4), num_classes=5, seed=11)
    ct.cache_targets(str(root), "dinov2-vit-t", out=str(root / "with-cls"), dtype="fp32", with_cls=True, **CACHE)
    ct.cache_targets(str(root), "dinov2-vit-t", out=str(root / "patch-only"), dtype="fp32", **CACHE)
    return root


def _train(data, out, *extra, steps=3):
    cfg = tiny_cfg(out, "--data-dir", data, *RUN, "--cls", "0.03", *extra, steps=steps, ckpt_every=steps)
    summary = train(cfg)
    with open(os.path.join(summary["run_dir"], "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return log, ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], steps))["model"]


def test_cached_class_tokens_give_the_computed_reg_training(data, tmp_path):
    log_c, w_c = _train(data, tmp_path / "computed", "--targets", "computed")
    log_t, w_t = _train(data, tmp_path / "cached", "--targets", "cached", "--targets-dir", data / "with-cls")
    for key in ("loss", "denoising", "alignment", "cls"):
        assert [r[key] for r in log_t] == [r[key] for r in log_c], key
    assert all(r["cls"] > 0 and r["alignment"] != 0 for r in log_c)
    assert w_c.keys() == w_t.keys() and all(torch.equal(w_c[k], w_t[k]) for k in w_c)


def test_stored_class_tokens_are_the_encoders(data):
    cache = cached.TargetCache(str(data / "with-cls"))
    assert cache.has_class_tokens and cache.header["encoders"][0]["cls_file"] == "dinov2-vit-t.cls.npy"
    from repa_fast.data import open_dataset
    from repa_fast.models.encoders import load_encoders

    ds = open_dataset(str(data), num_classes=5)
    torch.manual_seed(0)
    (enc,) = load_encoders("dinov2-vit-t", 32, grid=2, pretrained=False, attn_backend="auto")
    with torch.no_grad():
        patch, cls = enc(torch.stack([ds[i][0] for i in range(BATCH)]), with_cls=True)
    torch.testing.assert_close(torch.stack([cache.cls_rows(i)[0] for i in range(BATCH)]), cls, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack([cache.rows(i)[0] for i in range(BATCH)]), patch, rtol=0, atol=0)
    assert np.load(data / "with-cls" / "dinov2-vit-t.cls.npy").shape == (N, 192)


def test_reg_run_on_a_cache_without_class_tokens_is_refused(data, tmp_path):
    assert "class_tokens" not in cached.read_header(str(data / "patch-only"))  # the header of caches before REG
    with pytest.raises(DataError, match="--with-cls"):
        _train(data, tmp_path / "r", "--targets", "cached", "--targets-dir", data / "patch-only")
    assert not os.path.exists(tmp_path / "r" / "run")  # refused before anything is written


def test_a_plain_run_reads_a_cache_with_class_tokens(data, tmp_path):
    cfg = tiny_cfg(tmp_path, "--data-dir", data, *RUN, "--targets", "cached", "--targets-dir", data / "with-cls")
    cfg.run.max_train_steps = cfg.run.checkpointing_steps = 1
    log = train(cfg)["metrics"]
    assert np.isfinite(log["loss"]) and log["cls"] == 0
