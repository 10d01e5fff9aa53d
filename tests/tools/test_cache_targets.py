"""Target cache: bitwise losses with fp32, rounding-only with bf16/fp16, refusal of a mismatched cache, resume."""

import json
import os

import numpy as np
import pytest
import torch

from repa_fast.data import DataError, open_dataset, ref_layout
from repa_fast.data import cached_targets as cached
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.trainer import train
from repa_fast.models.encoders import load_encoders
from repa_fast.tools import cache_targets as ct
from tests.data.helpers import make_ref_dataset

from ..engine.helpers import tiny_cfg

N, BATCH = 16, 4
# 32 px images and 4x4x4 latents: SiT-T/2 has a 2x2 token grid, the toy DINOv2 runs at --encoder-grid 2.
RUN = ["--dataset", "auto", "--resolution", "32", "--num-classes", "5", "--model", "SiT-T/2", "--encoder-grid", "2"]
RUN += ["--latent-scale", "0.18215", "--mixed-precision", "no", "--batch-size", str(BATCH)]
RUN += ["--enc-type", "dinov2-vit-t", "--no-encoder-pretrained"]  # the encoder the caches below are made with
CACHE = dict(num_classes=5, encoder_pretrained=False, encoder_grid=2, batch_size=BATCH, workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "data"
    make_ref_dataset(str(root), range(N), resolution=32, latent_shape=(8, 4, 4), num_classes=5, seed=7)
    for dtype in ("fp32", "bf16", "fp16"):
        ct.cache_targets(str(root), "dinov2-vit-t", out=str(root / f"targets-{dtype}"), dtype=dtype, **CACHE)
    return root


def _train(data, out, targets, *extra, steps=5):
    cfg = tiny_cfg(out, "--data-dir", data, *RUN, "--targets", targets, *extra, steps=steps, ckpt_every=steps)
    summary = train(cfg)
    with open(os.path.join(summary["run_dir"], "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    weights = ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], steps))["model"]
    return log, weights


def _encoder_targets(root):
    """fp32 targets of every item computed here, in dataset order and batches of BATCH (as the cache pass)."""
    ds = open_dataset(str(root), num_classes=5)
    torch.manual_seed(0)
    (enc,) = load_encoders("dinov2-vit-t", 32, grid=2, pretrained=False, attn_backend="auto")
    with torch.no_grad():
        return torch.cat([enc(torch.stack([ds[i][0] for i in range(lo, lo + BATCH)])) for lo in range(0, N, BATCH)])


def test_fp32_cache_gives_bitwise_the_same_training_and_reads_no_image(data, tmp_path, monkeypatch):
    log_c, w_c = _train(data, tmp_path / "computed", "computed")

    def no_images(path):
        raise AssertionError(f"--targets cached read the image {path}")

    monkeypatch.setattr(ref_layout, "load_image_file", no_images)
    log_t, w_t = _train(data, tmp_path / "cached", "cached", "--targets-dir", data / "targets-fp32")
    assert [r["loss"] for r in log_t] == [r["loss"] for r in log_c]
    assert [r["alignment"] for r in log_t] == [r["alignment"] for r in log_c]
    assert all(np.isfinite(r["loss"]) and r["alignment"] != 0 for r in log_c)
    assert w_c.keys() == w_t.keys() and all(torch.equal(w_c[k], w_t[k]) for k in w_c)


@pytest.mark.parametrize("dtype,rel", [("bf16", 2.0**-8), ("fp16", 2.0**-11)])
def test_low_precision_cache_is_the_rounded_targets(data, tmp_path, dtype, rel):
    ref = _encoder_targets(data)  # (N, 4, 192) fp32
    cache = cached.TargetCache(str(data / f"targets-{dtype}"))
    got = torch.stack([cache.rows(i)[0] for i in range(N)])
    assert got.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert torch.equal(got, ref.to(got.dtype))  # round to nearest, nothing else
    err = (got.float() - ref).abs()
    assert err.max() > 0 and bool((err <= rel * ref.abs() + 1e-30).all())
    fp32 = torch.stack([cached.TargetCache(str(data / "targets-fp32")).rows(i)[0] for i in range(N)])
    assert torch.equal(fp32, ref)
    log_c, _ = _train(data, tmp_path / "computed", "computed", steps=3)
    log_t, _ = _train(data, tmp_path / "cached", "cached", "--targets-dir", data / f"targets-{dtype}", steps=3)
    # Cosine similarities of targets moved by at most `rel` relative: the alignment loss moves by O(rel), not 0.
    diffs = [abs(a["alignment"] - b["alignment"]) for a, b in zip(log_c, log_t)]
    assert max(diffs) > 0 and max(diffs) <= 4 * rel


def test_mismatched_cache_is_refused_naming_the_difference(data, tmp_path):
    ds = open_dataset(str(data), num_classes=5)
    torch.manual_seed(1)  # other random weights than the cache's seed 0
    other_weights = load_encoders("dinov2-vit-t", 32, grid=2, pretrained=False)
    with pytest.raises(DataError, match=r"encoders\.weights_sha256|weights_sha256"):
        cached.open_cached_targets(ds, other_weights, str(data / "targets-fp32"))
    torch.manual_seed(0)
    other_name = load_encoders("dinov2reg-vit-t", 32, grid=2, pretrained=False)
    with pytest.raises(DataError, match="dinov2reg-vit-t"):
        cached.open_cached_targets(ds, other_name, str(data / "targets-fp32"))
    torch.manual_seed(0)
    other_grid = load_encoders("dinov2-vit-t", 32, grid=1, pretrained=False)
    with pytest.raises(DataError, match=r"grid: cache 2, this run 1"):
        cached.open_cached_targets(ds, other_grid, str(data / "targets-fp32"))
    # Through the trainer: another seed draws other random encoder weights; no cache at all names the fix.
    with pytest.raises(DataError, match="weights_sha256"):
        _train(data, tmp_path / "a", "cached", "--targets-dir", data / "targets-fp32", "--seed", "1", steps=1)
    with pytest.raises(DataError, match="cache_targets"):
        _train(data, tmp_path / "b", "cached", "--targets-dir", tmp_path / "nothing", steps=1)


def test_other_data_is_refused(data, tmp_path):
    other = tmp_path / "other"
    make_ref_dataset(str(other), range(N + 4), resolution=32, latent_shape=(8, 4, 4), num_classes=5, seed=7)
    torch.manual_seed(0)
    encs = load_encoders("dinov2-vit-t", 32, grid=2, pretrained=False)
    with pytest.raises(DataError, match=r"count: cache 16, this run 20"):
        cached.open_cached_targets(open_dataset(str(other), num_classes=5), encs, str(data / "targets-fp32"))


def test_interrupted_and_two_rank_runs_give_the_same_cache(data, tmp_path, monkeypatch):
    out = tmp_path / "targets"
    calls = {"n": 0}
    real = ct._to_storage

    def dies_on_third_batch(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(ct, "_to_storage", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        ct.cache_targets(str(data), "dinov2-vit-t", out=str(out), dtype="fp32", shard_size=2 * BATCH, **CACHE)
    assert not out.exists() and (tmp_path / "targets.tmp" / ct.PROGRESS_DIR / "shard-000000.done").exists()
    monkeypatch.setattr(ct, "_to_storage", real)
    with pytest.raises(DataError, match="made differently.*dtype"):  # resuming with other options is refused
        ct.cache_targets(str(data), "dinov2-vit-t", out=str(out), dtype="bf16", shard_size=2 * BATCH, **CACHE)
    ct.cache_targets(str(data), "dinov2-vit-t", out=str(out), dtype="fp32", shard_size=2 * BATCH, **CACHE)
    want = np.load(data / "targets-fp32" / "dinov2-vit-t.npy")
    assert np.array_equal(np.load(out / "dinov2-vit-t.npy"), want) and np.abs(want).max() > 0
    # Two ranks sharing the shards (what torchrun does, run here one after the other).
    torch.manual_seed(0)
    ds = open_dataset(str(data), num_classes=5)
    encs = load_encoders("dinov2-vit-t", 32, grid=2, pretrained=False)
    job = ct.Job(ds, encs, str(tmp_path / "two"), dtype="fp32", compute="no", batch_size=BATCH, shard_size=BATCH)
    job.prepare()
    assert job.run_shards(1, 2) == N // 2 and job.pending_shards(0, 1) == [0, 2]
    assert job.run_shards(0, 2) == N // 2
    job.finalize()
    assert np.array_equal(np.load(tmp_path / "two" / "dinov2-vit-t.npy"), want)
    with open(tmp_path / "two" / ct.HEADER_FILE) as f:
        header = json.load(f)
    assert header["encoders"][0]["tokens"] == 4 and header["dtype"] == "fp32" and header["dataset"]["count"] == N


def test_targets_dir_without_cached_targets_is_an_error(data, tmp_path):
    from repa_fast.config import ConfigError

    with pytest.raises(ConfigError, match="--targets-dir is only read with --targets cached"):
        _train(data, tmp_path, "computed", "--targets-dir", data / "targets-fp32", steps=1)


def test_cli_writes_a_cache_training_accepts(data, tmp_path, capsys):
    out = tmp_path / "cli-targets"
    argv = [str(data), "--enc-type", "dinov2-vit-t", "--dtype", "fp32", "--out", str(out), "--batch-size", str(BATCH)]
    argv += ["--num-classes", "5", "--encoder-grid", "2", "--no-encoder-pretrained", "--workers", "0"]
    assert ct.main(argv) == 0 and f"{out}: done" in capsys.readouterr().out
    assert np.array_equal(np.load(out / "dinov2-vit-t.npy"), np.load(data / "targets-fp32" / "dinov2-vit-t.npy"))
    assert ct.main(argv) == 0  # complete: nothing to do
    assert ct.main([*argv[:-2], "--workers", "0", "--dtype", "bf16"]) == 2  # a different cache already there
    assert "dtype: cache 'fp32', this run 'bf16'" in capsys.readouterr().err
