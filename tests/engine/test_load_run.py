"""checkpoint.load_run: every path form a user passes (run dir, checkpoint dir, a weights file, a foreign .pt) gives
the checkpoint read, its configuration and its weights; a wrong path is a CheckpointError naming it."""

import argparse
import json
import logging
import os

import pytest
import torch

from repa_fast.config import TrainConfig
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.checkpoint import load_run
from repa_fast.errors import CheckpointError, ConfigError


def _weights(seed):
    """A few SiT keys (a final layer: not an ERW warm-up file), fresh values per seed."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"pos_embed": (1, 4, 4), "blocks.0.attn.qkv.weight": (6, 4), "final_layer.linear.weight": (8, 4)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


@pytest.fixture
def run(tmp_path):
    """A run directory as training leaves it: config.json and checkpoints 2 and 4 (model != ema != other step)."""
    out = tmp_path / "exps" / "run"
    for step in (2, 4):
        ckpt.write_checkpoint(str(out), step, model_sd=_weights(step), ema_sd=_weights(10 + step), state={})
    cfg = TrainConfig()
    cfg.update({"model": "SiT-B/4", "encoder_depth": 3, "use_rope": True, "latent_scale": 1.0}, source="test")
    (out / "config.json").write_text(json.dumps(cfg.to_json()))
    return str(out)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_dir_checkpoint_dir_and_weights_files_read_the_same_checkpoint(run):
    latest = load_run(run)
    assert latest.path == ckpt.step_dir(run, 4) and latest.step == 4 and latest.format == "repa_fast"
    assert not latest.foreign and _same(latest.weights, _weights(14))
    assert latest.config_path == os.path.join(run, "config.json")
    assert latest.config.model.model == "SiT-B/4" and latest.config.model.use_rope is True
    assert latest.config.data.latent_scale == 1.0 and {"model", "use_rope", "enc_type"} <= latest.stated
    assert _same(load_run(run, which="model").weights, _weights(4))
    older = load_run(run, step=2)
    assert older.step == 2 and _same(older.weights, _weights(12))
    for path in (ckpt.step_dir(run, 2), os.path.join(ckpt.step_dir(run, 2), "ema.safetensors")):
        r = load_run(path)
        assert r.path == ckpt.step_dir(run, 2) and _same(r.weights, _weights(12))
        assert r.config.model.model == "SiT-B/4" and r.config_path == os.path.join(run, "config.json")
    r = load_run(os.path.join(ckpt.step_dir(run, 4), "model.safetensors"), which="model")
    assert _same(r.weights, _weights(4))


def test_a_checkpoint_dir_without_its_run_states_nothing(run, tmp_path):
    import shutil

    alone = tmp_path / "copied"
    shutil.copytree(ckpt.step_dir(run, 4), alone)
    r = load_run(str(alone))
    assert r.config_path is None and r.stated == frozenset() and _same(r.weights, _weights(14))
    assert r.config.model.model == TrainConfig().model.model  # defaults only


def test_foreign_file_gives_its_saved_flags_as_config(tmp_path):
    sd = _weights(1)
    ns = argparse.Namespace(model="SiT-L/2", encoder_depth=4, batch_size=64, qk_norm=True, enc_type="dinov2-vit-l")
    ema = {"module." + k: v + 1 for k, v in sd.items()}  # DDP prefix: dropped
    torch.save({"model": sd, "ema": ema, "opt": {}, "args": ns, "steps": 9}, tmp_path / "0000009.pt")
    r = load_run(str(tmp_path / "0000009.pt"))
    assert r.format == "reference" and r.foreign and r.step == 9 and r.config_path is None
    assert _same(r.weights, {k: v + 1 for k, v in sd.items()})
    assert r.stated == {"model", "encoder_depth", "qk_norm", "enc_type"}  # batch_size: not an architecture flag
    assert (r.config.model.model, r.config.model.encoder_depth, r.config.model.qk_norm) == ("SiT-L/2", 4, True)
    assert r.config.optim.batch_size == TrainConfig().optim.batch_size
    ns_bad = argparse.Namespace(model=None, encoder_depth=0)  # REPA's --model has no default; 0 is out of range
    torch.save({"model": sd, "ema": sd, "args": ns_bad}, tmp_path / "bad_args.pt")
    assert load_run(str(tmp_path / "bad_args.pt")).stated == frozenset()


def test_erw_file_states_rope_and_drops_its_tables(tmp_path):
    sd = {**_weights(2), "feat_rope.freqs_cos": torch.randn(4, 2), "feat_rope.freqs_sin": torch.randn(4, 2)}
    ns = argparse.Namespace(model="SiT-XL/2", use_rope=True, l2r_depth=4, warmup_steps=100000)
    torch.save({"model": sd, "ema": sd, "args": ns, "steps": 3}, tmp_path / "erw.pt")
    r = load_run(str(tmp_path / "erw.pt"), which="model")
    assert r.format == "erw" and r.config.model.use_rope is True and "use_rope" in r.stated
    assert _same(r.weights, _weights(2)) and sorted(r.dropped) == ["feat_rope.freqs_cos", "feat_rope.freqs_sin"]


def test_wrong_paths_are_checkpoint_errors_naming_them(run, tmp_path):
    cases = [
        (str(tmp_path / "nowhere"), {}, r"nowhere: no such file or directory: neither a checkpoint directory nor"),
        (str(tmp_path), {}, "neither a checkpoint directory"),
        (run, {"step": 3}, r"no checkpoint for step 3; available: \[2, 4\]"),
        (os.path.join(ckpt.step_dir(run, 4), "ema.safetensors"), {"step": 4}, "is a file: a step"),
        (os.path.join(ckpt.step_dir(run, 4), "ema.safetensors"), {"which": "model"}, "holds the ema weights"),
    ]
    torch.save(_weights(3), tmp_path / "last.pt")  # REPA's release: EMA weights only
    cases.append((str(tmp_path / "last.pt"), {"which": "model"}, r"last\.pt: no 'model' weights.*--weights ema"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases.append((str(tmp_path / "notes.pt"), {}, r"notes\.pt: refused to load"))
    for path, kw, msg in cases:
        with pytest.raises(CheckpointError, match=msg) as e:
            load_run(path, **kw)
        assert os.path.basename(path) in str(e.value)
    os.remove(os.path.join(ckpt.step_dir(run, 4), "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"0000004/model\.safetensors is missing"):
        load_run(ckpt.step_dir(run, 4), which="model")
    with pytest.raises(ValueError, match="which must be one of"):
        load_run(run, which="both")


def test_run_config_unknown_options_are_skipped_bad_values_refused(run, caplog):
    path = os.path.join(run, "config.json")
    raw = json.load(open(path))
    raw["trainer"]["option_from_the_future"] = 1
    json.dump(raw, open(path, "w"))
    with caplog.at_level(logging.WARNING, logger="repa_fast"):
        r = load_run(run)
    assert "option_from_the_future" in caplog.text and "option_from_the_future" not in r.stated
    raw["trainer"]["encoder_depth"] = 0
    json.dump(raw, open(path, "w"))
    with pytest.raises(ConfigError, match="encoder-depth"):
        load_run(run)
