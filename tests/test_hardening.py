"""A user mistake is a clear error with a documented exit code, and a refused command changes nothing on disk.

Every run here goes through the CLI's main(argv) in-process (no subprocess per case).
"""

import errno
import json
import math
import os
import sys

import pytest
import torch

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.config import Range, TrainConfig, field_specs, load_config_file
from repa_fast.engine import checkpoint as ckpt
from repa_fast.io import atomic_path, write_text

from .engine.helpers import tiny_args
from .engine.test_resume_and_crash import _assert_bitwise_equal, _final_state

NUMERIC = [(name, f) for name, f in field_specs() if isinstance(f.metadata.get("check"), Range)]


def snapshot(root) -> dict:
    """Every file under ``root`` with its bytes, and every directory: a byte-for-byte picture of a tree."""
    out = {}
    for d, _dirs, files in os.walk(root):
        out[os.path.relpath(d, root) + "/"] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = f.read()
    return out


def _bad_values(check, is_int: bool) -> list:
    """Values just outside ``check``: below/at an open lower bound, above/at an open upper bound; nan/inf."""
    bad = []
    if check.lo is not None:
        bad.append(check.lo if check.lo_open else check.lo - 1)
    if check.hi is not None:
        bad.append(check.hi if check.hi_open else check.hi + (1 if is_int else 0.5))
    if not is_int:
        bad += [math.nan, math.inf]
    return [int(v) if is_int else float(v) for v in bad]


CASES = [
    pytest.param(name, value, id=f"{name}={value}")
    for name, f in NUMERIC
    for value in _bad_values(f.metadata["check"], "int" in str(f.type))
]


def test_every_numeric_option_declares_its_range():
    numeric = [
        name
        for name, f in field_specs()
        if name not in ("deepspeed",)
        and any(t in str(f.type) for t in ("int", "float"))
        and "bool" not in str(f.type)
        and not f.metadata.get("choices")  # a fixed set of values (e.g. the conv kernel size) is checked as a choice
    ]
    assert numeric and sorted(numeric) == sorted(name for name, _ in NUMERIC)
    defaults = TrainConfig().flat()
    for name, f in NUMERIC:  # the defaults themselves are valid
        assert defaults[name] is None or defaults[name] in f.metadata["check"], name


@pytest.mark.parametrize("name,value", CASES)
def test_out_of_range_option_exits_2_before_anything_is_written(tmp_path, capsys, name, value):
    out = tmp_path / "out"
    flag = "--" + name.replace("_", "-")
    assert main(tiny_args(out, flag, str(value), steps=1)) == errors.EXIT_USER
    err = capsys.readouterr().err
    check = next(f for n, f in NUMERIC if n == name).metadata["check"]
    assert f"{flag} must be {check}, got {value}" in err, err
    assert "Traceback" not in err and not out.exists()


def test_out_of_range_in_config_file_names_file_option_and_range(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"trainer": {"adam_beta1": 1.5, "dataset": "digits"}}))
    assert main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'adam_beta1' (--adam-beta1) must be in [0, 1), got 1.5" in err


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"trainer": [1, 2]}, "the 'trainer' section must be a JSON object"),
        ({"trainer": {}, "deepspeed": "zero2"}, "the 'deepspeed' section must be a JSON object"),
        ([{"trainer": {}}], "must be a JSON object with a 'trainer' section, got a list"),
    ],
)
def test_config_sections_have_their_type(tmp_path, raw, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(errors.ConfigError, match=message):
        load_config_file(str(path))


def test_refused_resume_leaves_the_run_directory_byte_identical(tmp_path, capsys):
    assert main(tiny_args(tmp_path, steps=2, ckpt_every=1)) == 0
    before = snapshot(tmp_path)
    assert main(tiny_args(tmp_path, "--resume", "--model", "SiT-T/2", "--encoder-grid", "8", steps=3)) == 2
    err = capsys.readouterr().err
    assert "was trained with --model SiT-T/4 (this run: SiT-T/2)" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before
    # The written config.json still continues the run.
    assert main(["--config", str(tmp_path / "run" / "config.json"), "--resume", "--max-train-steps", "3"]) == 0


def test_disk_full_mid_checkpoint_is_clear_and_the_previous_checkpoint_resumes_bitwise(tmp_path, capsys, monkeypatch):
    assert main(tiny_args(tmp_path / "a", steps=4, ckpt_every=2)) == 0
    real_save, calls = ckpt.save_file, {"n": 0}

    def full_disk(tensors, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # checkpoint 4, its ema file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    assert main(tiny_args(tmp_path / "b", steps=4, ckpt_every=2)) == errors.EXIT_WRITE
    err = capsys.readouterr().err
    run = str(tmp_path / "b" / "run")
    assert f"could not write {ckpt.step_dir(run, 4)}: No space left on device (needs about" in err
    assert f"previous checkpoint {ckpt.step_dir(run, 2)} is intact" in err and "Traceback" not in err
    assert ckpt.list_checkpoints(run) == [2]
    assert not [d for d in os.listdir(ckpt.checkpoint_root(run)) if d.startswith(".")]
    monkeypatch.undo()
    assert main(tiny_args(tmp_path / "b", "--resume", steps=4, ckpt_every=2)) == 0
    _assert_bitwise_equal(_final_state(str(tmp_path / "a" / "run"), 4), _final_state(run, 4))


def test_atomic_path_failure_removes_the_partial_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "x.bin"
    write_text(str(path), "old")
    with pytest.raises(errors.WriteError, match=r"x.bin: No space left on device \(needs about 3.0 MB, .* free"):
        with atomic_path(str(path), size_hint=3_000_000, intact="x.bin keeps its old content.") as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.bin"]
    with pytest.raises(KeyError):  # a bug inside the body stays itself (no WriteError), the temp still goes
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").close()
            raise KeyError("bug")
    assert os.listdir(tmp_path) == ["x.bin"]


def test_export_to_a_full_disk_and_of_a_truncated_file(tmp_path, capsys, monkeypatch):
    from repa_fast import export

    assert main(tiny_args(tmp_path, steps=1, ckpt_every=1)) == 0
    run, out = str(tmp_path / "run"), tmp_path / "exp"
    out.mkdir()

    def full(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.torch, "save", full)
    assert export.main([run, str(out / "ema.pt"), "--ref-layout"]) == errors.EXIT_WRITE
    assert "could not write" in capsys.readouterr().err and os.listdir(out) == []
    monkeypatch.undo()
    ema = os.path.join(ckpt.step_dir(run, 1), "ema.safetensors")
    with open(ema, "r+b") as f:
        f.truncate(os.path.getsize(ema) // 2)
    assert export.main([run, str(out / "ema.pt"), "--ref-layout"]) == errors.EXIT_USER
    err = capsys.readouterr().err
    assert f"{ema} has {os.path.getsize(ema)} bytes, the manifest says" in err and "Traceback" not in err  # verified


def test_named_model_without_data_dir_is_an_error_and_the_demo_is_still_the_default(tmp_path, capsys):
    assert main(["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--model SiT-XL/2 --enc-type dinov2-vit-b given without --data-dir" in err and "--preset demo" in err
    assert main(["--dry-run"]) == 0  # `python train.py` alone: the demo recipe
    t = json.loads(capsys.readouterr().out)["trainer"]
    assert (t["model"], t["dataset"], t["max_train_steps"], t["exp_name"]) == ("SiT-T/2", "digits", 400, "demo")
    assert main(["--preset", "demo", "--model", "SiT-T/4", "--encoder-grid", "4", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["trainer"]["model"] == "SiT-T/4"
    assert main(["--max-train-steps", "7", "--dry-run"]) == 0  # other flags tweak the demo
    assert json.loads(capsys.readouterr().out)["trainer"]["max_train_steps"] == 7


def test_runtime_mistakes_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(tiny_args(out, "--device", "cuda", steps=1)) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert main(tiny_args(out, "--vae", str(tmp_path / "no-vae"), steps=1)) == 2
    assert f"{tmp_path / 'no-vae'}: no VAE weights" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*tiny_args(out, steps=1), "--report-to", "tensorboard"]) == 2
    assert "needs tensorboard: pip install 'repa_fast[logging]'" in capsys.readouterr().err
    assert not out.exists()


def test_debug_flag_and_environment_show_the_traceback(capsys, monkeypatch):
    assert main(["--learning-rate", "-1", "--dry-run"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--learning-rate", "-1", "--dry-run", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "--learning-rate must be > 0, got -1.0" in err
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert main(["--learning-rate", "-1", "--dry-run"]) == 2
    assert "Traceback" in capsys.readouterr().err


class _Corrupt(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from repa_fast.data import DataError

        raise DataError(f"/data/row{i}.npy: moments have NaN values; re-encode that sample")


def test_data_error_from_a_dataloader_worker_is_the_original_message(capsys):
    loader = torch.utils.data.DataLoader(_Corrupt(), batch_size=2, num_workers=1)

    @errors.entry_point("demo-cmd")
    def cmd(argv):
        next(iter(loader))

    assert cmd([]) == errors.EXIT_USER
    err = capsys.readouterr().err
    assert err.startswith("demo-cmd: error: /data/row0.npy: moments have NaN values; re-encode that sample")
    assert "(in DataLoader worker process 0)" in err and "Traceback" not in err and err.count("\n") == 1


def test_generate_checks_its_numeric_flags(capsys):
    from repa_fast.generate import main as generate_main

    assert generate_main(["--ckpt", "x", "--num-fid-samples", "0"]) == 2
    assert "--num-fid-samples must be >= 1, got 0" in capsys.readouterr().err
    assert generate_main(["--ckpt", "x", "--guidance-low", "0.8", "--guidance-high", "0.7"]) == 2
    assert "needs low <= high" in capsys.readouterr().err


def test_zero_max_grad_norm_means_no_clipping(tmp_path, monkeypatch):
    from repa_fast.engine import trainer
    from repa_fast.engine.parallel import Backend

    seen = []
    real = Backend.clip_and_step
    monkeypatch.setattr(Backend, "clip_and_step", lambda self, m, n, s=None: seen.append(n) or real(self, m, n, s))
    assert main(tiny_args(tmp_path, "--max-grad-norm", "0", steps=1, ckpt_every=1)) == 0
    assert seen == [math.inf] and trainer.optimizer_step is not None
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(5) * 100
    grads = [p.grad.clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, math.inf, foreach=True)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # bit for bit unchanged


def test_help_shows_ranges_and_literal_percent_signs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and "effective 19% at 0.1" in out and "'option_strings'" not in out
    assert "AdamW beta1 [in [0, 1)] (default: 0.9)" in out and "--debug" in out


def test_pack_on_a_full_disk_keeps_its_work_area_and_continues(tmp_path, capsys, monkeypatch):
    from repa_fast.data import packed
    from repa_fast.tools.pack import main as pack_main

    from .data.helpers import make_ref_dataset

    make_ref_dataset(tmp_path / "ref", [0, 1, 2], num_classes=3)
    src, dst = str(tmp_path / "ref"), str(tmp_path / "packed")
    real = packed.write_json

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(packed, "write_json", full)  # the index, the last file written
    assert pack_main([src, dst, "--num-classes", "3", "--workers", "0"]) == errors.EXIT_WRITE
    err = capsys.readouterr().err
    assert f"could not write {dst}.tmp/index.json: No space left on device" in err
    assert f"The work area {dst}.tmp keeps the rows already written" in err and "Traceback" not in err
    assert not os.path.exists(dst)
    monkeypatch.setattr(packed, "write_json", real)
    assert pack_main([src, dst, "--num-classes", "3", "--workers", "0"]) == 0
    assert os.path.isfile(os.path.join(dst, "index.json")) and not os.path.exists(dst + ".tmp")
