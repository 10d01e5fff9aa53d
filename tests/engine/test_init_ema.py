"""--init-from starts our EMA from the file's EMA when it has one (issue 20 item 7; REPA's train.py keeps one beside
the weights), or from the raw weights with --init-ema-from weights; --mixed-precision fp16 on CPU warns."""

import os

import pytest
import torch
from safetensors.torch import load_file

from repa_fast.cli import main
from repa_fast.engine import checkpoint as ckpt

from .helpers import tiny_args

DECAY = 0.5  # a strong EMA step: after one step EMA = d * EMA_0 + (1 - d) * weights_1, far from either start


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step run whose raw weights and EMA differ, and the same two as a REPA train.py-layout .pt file."""
    out = tmp_path_factory.mktemp("src")
    assert main(tiny_args(out, "--ema-decay", "0.9", "--learning-rate", "1e-2", steps=2, ckpt_every=2)) == 0
    run = str(out / "run")
    model = load_file(os.path.join(ckpt.step_dir(run, 2), "model.safetensors"))
    ema = load_file(os.path.join(ckpt.step_dir(run, 2), "ema.safetensors"))
    gap = max((model[k] - ema[k]).abs().max().item() for k in model if model[k].is_floating_point())
    assert gap > 1e-3  # the two starts are told apart below at 1e-5
    torch.save({"model": model, "ema": ema, "steps": 2}, out / "repa_train.pt")
    return run, str(out / "repa_train.pt"), model, ema


def _first_step(tmp_path, init_from, *extra):
    out = tmp_path / "b"
    args = tiny_args(out, "--init-from", init_from, "--ema-decay", str(DECAY), *extra, steps=1, ckpt_every=1)
    assert main(args) == 0
    d = ckpt.step_dir(str(out / "run"), 1)
    return load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(d, "ema.safetensors"))


def _assert_ema_started_from(start, model1, ema1):
    for k, v in ema1.items():
        if v.is_floating_point():
            expected = DECAY * start[k].float() + (1 - DECAY) * model1[k].float()
            torch.testing.assert_close(v.float(), expected, atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["run_dir", "repa_file"])
def test_init_from_starts_the_ema_from_the_files_ema(source, tmp_path, kind, capsys):
    run, pt, model0, ema0 = source
    capsys.readouterr()
    model1, ema1 = _first_step(tmp_path, run if kind == "run_dir" else pt)
    _assert_ema_started_from(ema0, model1, ema1)
    assert "the EMA starts from the file's EMA" in capsys.readouterr().err  # the run's log says which


def test_init_ema_from_weights_starts_it_from_the_raw_weights(source, tmp_path):
    run, pt, model0, ema0 = source
    model1, ema1 = _first_step(tmp_path, pt, "--init-ema-from", "weights")
    _assert_ema_started_from(model0, model1, ema1)


def test_init_ema_from_without_init_from_is_refused(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "o", "--init-ema-from", "weights", steps=1)) == 2
    assert "--init-ema-from weights only applies with --init-from" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fp16_on_cpu_warns_that_it_is_slow(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "o", "--mixed-precision", "bf16", "--device", "cpu", steps=1)) == 0
    assert "fp16 on CPU" not in capsys.readouterr().err
    assert main(tiny_args(tmp_path / "p", "--mixed-precision", "fp16", "--device", "cpu", steps=1)) == 0
    err = capsys.readouterr().err
    assert "--mixed-precision fp16 on CPU" in err and "slower" in err


def test_init_from_a_run_with_a_damaged_ema_is_refused_not_replaced_by_the_weights(source, tmp_path, capsys):
    """A manifest mismatch in the EMA file is damage: it is refused (exit 2, naming the file), never read as 'no EMA'
    (which would start the EMA from the raw weights in silence)."""
    import shutil

    run = str(tmp_path / "copy")
    shutil.copytree(source[0], run)
    ema = os.path.join(ckpt.step_dir(run, 2), "ema.safetensors")
    data = bytearray(open(ema, "rb").read())
    data[-9] ^= 0xFF  # a flipped byte inside the last tensor
    open(ema, "wb").write(bytes(data))
    out = tmp_path / "b"
    assert main(tiny_args(out, "--init-from", run, steps=1, ckpt_every=1)) == 2
    err = capsys.readouterr().err
    assert "ema.safetensors" in err and "has no EMA" not in err
