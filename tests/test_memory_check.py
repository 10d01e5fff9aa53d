"""train.py --dry-run's memory check (repa_fast/memory_check.py): the per-part table of the cost model's predicted
peak memory, and the refusal (exit 2) of a configuration predicted not to fit, with the options that fit."""

import json
from dataclasses import replace

import pytest

from repa_fast.cli import main, resolve_config
from repa_fast.cost.memory import Setup, fits, memory_report
from repa_fast.memory_check import check_memory, setup_from_config

XL = ["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--data-dir", "/data/imagenet256", "--dry-run"]
PARTS = ("weights", "grads", "optimizer", "ema", "activations", "encoder")


def _cfg(*extra):
    return resolve_config([*XL, *extra])[0]


def test_setup_follows_the_config():
    s = setup_from_config(_cfg("--batch-size", "64", "--gradient-accumulation-steps", "2"), world=1)
    assert (s.model, s.enc_types, s.batch, s.accumulation, s.world, s.parallel) == (
        "SiT-XL/2",
        ("dinov2-vit-b",),
        32,
        2,
        1,
        "none",
    )
    s = setup_from_config(_cfg("--activation-checkpointing", "mlp", "--targets", "cached", "--batch-size", "64"), 8)
    assert (s.act_ckpt, s.targets, s.batch, s.parallel) == ("mlp", "cached", 8, "ddp")
    s = setup_from_config(_cfg("--batch-size", "64", "--parallel", "fsdp", "--kernels", "ref"), 4)
    assert (s.parallel, s.impl, s.batch) == ("fsdp", "ref", 16)
    assert setup_from_config(_cfg("--proj-coeff", "0")).enc_types == ()
    s = setup_from_config(_cfg("--cls", "0.03"))  # REG: the class token is costed
    assert (s.reg, s.projection_layer_type) == (True, "mlp")
    s = setup_from_config(_cfg("--projection-layer-type", "conv", "--proj-kwargs-kernel-size", "5"))
    assert (s.reg, s.projection_layer_type, s.proj_kernel_size) == (False, "conv", 5)
    reg, plain = (memory_report(setup_from_config(_cfg(*a))) for a in (["--cls", "0.03"], []))
    assert dict(reg)["total"] > dict(plain)["total"]  # one more token per image, REG's extra layers


def test_dry_run_prints_the_table_by_part_and_a_fit_verdict(capsys):
    assert main([*XL, "--batch-size", "32", "--gpu-memory-gb", "80"]) == 0
    captured = capsys.readouterr()
    memory = json.loads(captured.out)["memory"]
    gb = memory["predicted_gb_per_gpu"]
    expected = dict(memory_report(Setup(batch=32)))
    assert set(PARTS) <= set(gb) and gb["total"] == pytest.approx(expected["total"], abs=1e-3)
    assert memory["fits"] is True and memory["gpu_gb"] == 80.0 and memory["options"] == []
    table = captured.err
    for part in PARTS:
        assert f"  {part}" in table
    assert f"{expected['activations']:9.2f}" in table and "fits the 80.0 GB of --gpu-memory-gb" in table


def test_a_batch_that_cannot_fit_is_refused_with_the_options_that_fit(capsys):
    batch = 256  # SiT-XL/2 at 256 per GPU: ~110 GB predicted
    assert not fits(Setup(batch=batch), 80)
    assert main([*XL, "--batch-size", str(batch), "--gpu-memory-gb", "80"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the 80.0 GB of --gpu-memory-gb" in err
    assert "  activations" in err  # the table comes with the refusal
    assert "global batch 256 unchanged" in err and "--gradient-accumulation-steps" in err
    assert "--activation-checkpointing" in err
    # Each option offered does fit, at the same global batch.
    check = check_memory(_cfg("--batch-size", str(batch), "--gpu-memory-gb", "80"))
    assert check.fits is False and check.options
    for o in check.options:
        assert o.batch * o.accumulation == batch
        assert fits(replace(check.setup, batch=o.batch, accumulation=o.accumulation, act_ckpt=o.act_ckpt), 80)
        assert o.predicted_gb <= 80


def test_a_real_run_with_a_stated_budget_is_refused_before_anything_is_written(tmp_path, capsys):
    """--gpu-memory-gb without --dry-run: the same refusal, before the run directory exists (check_runtime)."""
    argv = [a for a in XL if a != "--dry-run"] + ["--batch-size", "256", "--gpu-memory-gb", "80"]
    assert main([*argv, "--output-dir", str(tmp_path / "exps")]) == 2
    assert "does not fit the 80.0 GB of --gpu-memory-gb" in capsys.readouterr().err
    assert not (tmp_path / "exps").exists()


def test_an_option_offered_is_accepted_by_the_dry_run(capsys):
    check = check_memory(_cfg("--batch-size", "256", "--gpu-memory-gb", "80"))
    flags = check.options[0].flags.split()
    assert main([*XL, "--batch-size", "256", "--gpu-memory-gb", "80", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["fits"] is True


def test_no_gpu_and_no_override_prints_without_a_verdict(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*XL, "--batch-size", "4096"]) == 0  # nothing to compare with: printed, not refused
    out = capsys.readouterr()
    assert json.loads(out.out)["memory"]["fits"] is None and "pass --gpu-memory-gb N" in out.err


def test_visible_gpu_memory_is_the_default_budget(monkeypatch, capsys):
    import torch

    class Props:
        total_memory, name = 24e9, "Fake 24GB"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert main([*XL, "--batch-size", "64"]) == 2
    assert "does not fit the 24.0 GB of cuda:0 (Fake 24GB)" in capsys.readouterr().err
    assert main([*XL, "--batch-size", "64", "--gpu-memory-gb", "141"]) == 0  # the override wins
    capsys.readouterr()


def test_the_demo_is_not_predicted(capsys):
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["memory"]["predicted"] is False and "not predicted (the digits demo" in out.err
