"""End-to-end training on every data layout, NaN handling, disk-full saves, export and the EMA."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine import trainer as trainer_mod
from repa_fast.engine.ema import EMA
from repa_fast.engine.trainer import TrainingStopped, train
from repa_fast.export import main as export_main
from repa_fast.models.sit import SiT_models
from repa_fast.tools.pack import pack

from ..data.helpers import make_ref_dataset
from .helpers import StepRig, tiny_cfg


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _latent_args(data_dir, out):
    # 64px images, 8x8x8 moments, SiT-S/2 -> 4x4 tokens; the encoder's default grid is 64 // 16 = 4.
    return [
        "--data-dir",
        str(data_dir),
        "--dataset",
        "auto",
        "--resolution",
        "64",
        "--num-classes",
        "5",
        "--model",
        "SiT-S/2",
        "--encoder-depth",
        "2",
        "--projector-dim",
        "64",
        "--latent-scale",
        "0.18215",
        "--encoder-grid",
        "4",
    ]


@pytest.fixture(scope="module")
def ref_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    make_ref_dataset(str(root), range(24), resolution=64, latent_shape=(8, 8, 8), num_classes=5)
    return root


@pytest.mark.parametrize("layout,workers", [("digits", 0), ("ref", 0), ("ref", 2), ("packed", 0)])
def test_tiny_end_to_end_on_each_layout(layout, workers, ref_data, tmp_path):
    if layout == "digits":
        extra = []
    elif layout == "ref":
        extra = _latent_args(ref_data, tmp_path)
    else:
        packed = tmp_path / "packed"
        pack(str(ref_data), str(packed), num_classes=5, progress=False, workers=0)
        extra = _latent_args(packed, tmp_path)
    cfg = tiny_cfg(tmp_path, *extra, "--num-workers", workers, steps=4, ckpt_every=2)
    summary = train(cfg)
    run = summary["run_dir"]
    assert summary["step"] == 4 and ckpt.list_checkpoints(run) == [2, 4]
    records = _log(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and -1 <= r["alignment"] <= 1
        assert abs(r["loss"] - (r["denoising"] + 0.5 * r["alignment"])) < 1e-4 * abs(r["loss"]) + 1e-6
    # Trained weights moved, EMA moved less (decay 0.99), frozen pos_embed identical in both.
    first, final = (ckpt.read_checkpoint(ckpt.step_dir(run, s)) for s in (2, 4))
    assert final["model"]["pos_embed"].equal(final["ema"]["pos_embed"])
    key = "blocks.0.attn.qkv.weight"
    assert (final["model"][key] - first["model"][key]).abs().max() > 0
    assert (final["model"][key] - final["ema"][key]).abs().max() > 0
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["trainer"]["max_train_steps"] == 4


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    real = trainer_mod.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's loss is NaN
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    monkeypatch.setattr(trainer_mod, "training_loss", poisoned)
    cfg = tiny_cfg(tmp_path, steps=3, ckpt_every=1)
    summary = train(cfg)
    records = _log(summary["run_dir"])
    assert [r["nonfinite_losses"] for r in records] == [0, 1, 0]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0]
    assert summary["nonfinite_losses"] == 1
    # The skipped step changed nothing: weights and EMA of checkpoint 2 equal those of checkpoint 1.
    c1, c2 = (ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], s)) for s in (1, 2))
    for k in c1["model"]:
        assert torch.equal(c1["model"][k], c2["model"][k]) and torch.equal(c1["ema"][k], c2["ema"][k])
    steps = {n: s["step"] for n, s in c2["state"]["optimizer"]["state"].items()}
    assert all(float(v) == 1.0 for v in steps.values())  # AdamW's step counter did not advance either


@pytest.mark.parametrize("log_every", [1, 10])  # 10: the NaN is found by the check before saving, not by a log read
def test_on_nan_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch, log_every):
    real = trainer_mod.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return {k: v * float("inf") for k, v in out.items()} if calls["n"] == 3 else out

    monkeypatch.setattr(trainer_mod, "training_loss", poisoned)
    cfg = tiny_cfg(tmp_path, "--on-nan", "stop", "--log-every", log_every, steps=6, ckpt_every=2)
    with pytest.raises(TrainingStopped, match=r"non-finite loss.*Last good checkpoint: .*0000002"):
        train(cfg)
    assert ckpt.list_checkpoints(str(tmp_path / "run")) == [2]


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = ckpt.save_file
    calls = {"n": 0}

    def failing_save(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # second checkpoint, its ema file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    cfg = tiny_cfg(tmp_path, steps=4, ckpt_every=2)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device.*previous checkpoint .*0000002 is intact"):
        train(cfg)
    run = str(tmp_path / "run")
    assert ckpt.list_checkpoints(run) == [2]
    assert not [d for d in os.listdir(ckpt.checkpoint_root(run)) if d.startswith(".tmp")]
    assert ckpt.read_checkpoint(ckpt.step_dir(run, 2))["state"]["step"] == 2


def test_export_ref_layout_loads_strictly_into_sit(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, steps=2, ckpt_every=2)
    run = train(cfg)["run_dir"]
    out = tmp_path / "ref.pt"
    assert export_main([run, str(out), "--ref-layout"]) == 0
    sd = torch.load(out, weights_only=True)["ema"]
    ema = load_file(os.path.join(ckpt.step_dir(run, 2), "ema.safetensors"))
    assert sd.keys() == ema.keys() and all(torch.equal(sd[k], ema[k]) for k in sd)
    model = SiT_models["SiT-T/4"](
        input_size=16,
        in_channels=3,
        num_classes=10,
        z_dims=[ema["projectors.0.4.weight"].shape[0]],  # the demo target's width
        encoder_depth=2,
        projector_dim=256,
    )
    model.load_state_dict(sd, strict=True)
    assert export_main([str(tmp_path / "nope"), str(out), "--ref-layout"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err


def test_ema_update_matches_reference_loop_and_skips():
    torch.manual_seed(0)
    model = SiT_models["SiT-S/4"](input_size=8, z_dims=[8], encoder_depth=1, depth=1)
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: p.clone() for n, p in ema.module.named_parameters()}
    src = dict(model.named_parameters())
    for n, p in expected.items():  # the reference update_ema (train.py:81-91), trainable parameters only
        if src[n].requires_grad:
            p.mul_(0.9).add_(src[n].detach(), alpha=0.1)
    before = {n: p.clone() for n, p in ema.module.named_parameters()}
    ema.update(model, 0.9, skip=torch.tensor(True))
    for n, p in ema.module.named_parameters():
        assert torch.equal(p, before[n])
    ema.update(model, 0.9, skip=torch.tensor(False))
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[n], atol=1e-6, rtol=1e-6)
    assert torch.equal(ema.module.pos_embed, before["pos_embed"])  # frozen: no drift
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_fp16_scaler_overflow_skips_step_and_ema(tmp_path):
    """fp16 + GradScaler on CPU: an overflowing first scale skips the update and the EMA (reference bug fixed)."""
    from repa_fast.engine.parallel import Backend

    model = SiT_models["SiT-S/4"](input_size=8, z_dims=[], depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    backend = Backend("cpu")
    backend.wrap(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    ema = EMA(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 1000, (2,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, _ = model(x, t, y)
    backend.backward((out - x).pow(2).mean() * 1e10, scaler)
    grad_norm, skipped = backend.clip_and_step(model, 1.0, scaler)
    ema.update(model, 0.5, skip=skipped)
    assert bool(skipped) and scaler.get_scale() < 2.0**127
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    for n, p in ema.module.named_parameters():
        assert torch.equal(p, before[n])


def test_compile_per_block_matches_eager(tmp_path):
    eager = train(tiny_cfg(tmp_path / "eager", steps=3, ckpt_every=3))
    compiled = train(
        tiny_cfg(tmp_path / "compiled", "--compile", "--compile-backend", "aot_eager", steps=3, ckpt_every=3)
    )
    logs = _log(eager["run_dir"]), _log(compiled["run_dir"])
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    sd = ckpt.read_checkpoint(ckpt.step_dir(compiled["run_dir"], 3))["model"]
    assert "blocks.0.attn.qkv.weight" in sd  # compiling in place keeps the reference key names


@pytest.mark.parametrize("legacy,expected", [(False, 0.5), (True, 0.75)])
def test_cfg_prob_sets_label_dropout_and_legacy_drops_twice(tmp_path, legacy, expected):
    rig = StepRig(tiny_cfg(tmp_path, "--cfg-prob", "0.5", *(["--legacy"] if legacy else [])))
    seen = []
    rig.model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    rig.model.train()
    for _ in range(60):
        rig.micro_step()
    labels = torch.cat(seen)
    rate = (labels == 10).float().mean().item()
    se = (expected * (1 - expected) / labels.numel()) ** 0.5
    assert abs(rate - expected) < 4 * se, (rate, expected)


def test_plain_sit_without_alignment(tmp_path):
    """--proj-coeff 0: no encoder is built or run, no projector exists, the loss is the denoising loss."""
    summary = train(tiny_cfg(tmp_path, "--proj-coeff", "0", steps=2, ckpt_every=2))
    records = _log(summary["run_dir"])
    assert all(r["alignment"] == 0 and r["loss"] == r["denoising"] > 0 for r in records)
    weights = ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], 2))["model"]
    assert not any(k.startswith("projectors.") for k in weights)
