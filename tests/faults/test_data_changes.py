"""Data that changed between runs, bad samples and permissions (issue 20 item 5): a resume on changed data is refused
before anything is written, with the choices spelled out; --on-bad-sample skip is logged, bounded, deterministic and
resume-safe; a permission problem is said as such."""

import json
import os

import numpy as np
import pytest
import torch

from repa_fast import errors
from repa_fast.cli import main

from ..data.helpers import feature_path, image_path, make_ref_dataset
from .common import ckpt, refused, snapshot, tiny_args

N = 40


def _args(tmp_path, *extra, out="out", steps=4, ckpt_every=2):
    data = tmp_path / "data"
    return tiny_args(tmp_path / out, "--dataset", "auto", "--data-dir", data, "--num-classes", "10", *extra,
                     steps=steps, ckpt_every=ckpt_every)  # fmt: skip


@pytest.fixture
def data(tmp_path):
    make_ref_dataset(tmp_path / "data", range(N), resolution=16, latent_shape=(6, 16, 16), num_classes=10)
    return tmp_path / "data"


def _run(tmp_path, out="out") -> str:
    return str(tmp_path / out / "run")


def test_resume_on_a_changed_dataset_is_refused_with_the_choices(tmp_path, capsys, data):
    assert main([str(a) for a in _args(tmp_path)]) == 0
    os.remove(feature_path(data, 7))  # the advice "delete the sample's files", followed
    os.remove(image_path(data, 7))
    refused(capsys, tmp_path, _args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "the dataset changed since", f"{N} samples", f"now has {N - 1} samples", "restore the data",
            "--reset-data-position", "nothing was written")  # fmt: skip
    capsys.readouterr()
    assert main([str(a) for a in _args(tmp_path, "--resume", "--reset-data-position", steps=6)]) == 0
    assert "--reset-data-position: the data order restarts at epoch 1" in capsys.readouterr().err
    assert ckpt.read_checkpoint(ckpt.step_dir(_run(tmp_path), 6))["state"]["data"]["num_samples"] == N - 1


def test_same_size_but_different_files_is_a_changed_dataset(tmp_path, capsys, data):
    assert main([str(a) for a in _args(tmp_path)]) == 0
    for path in (image_path(data, 3), feature_path(data, 3)):  # sample 3 renamed 99: same count, other files
        os.rename(path, path.replace("00000003", "00000099"))
    for sub in ("images", "vae-sd"):
        p = data / sub / "dataset.json"
        p.write_text(json.dumps(json.loads(p.read_text())).replace("00000003", "00000099"))
    refused(capsys, tmp_path, _args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "the dataset changed since", f"now has {N} samples (checksum")  # fmt: skip


def _corrupt(data, i):
    with open(feature_path(data, i), "wb") as f:
        f.write(b"\x93NUMPY garbage")


def test_bad_samples_stop_by_default_and_are_skipped_within_the_budget(tmp_path, capsys, data):
    bad = (5, 17)
    for i in bad:
        _corrupt(data, i)
    before = snapshot(data)
    capsys.readouterr()
    assert main([str(a) for a in _args(tmp_path, steps=10)]) == errors.EXIT_USER  # default: error, naming the file
    assert "cannot read moments .npy" in capsys.readouterr().err
    capsys.readouterr()
    assert main([str(a) for a in _args(tmp_path, "--on-bad-sample", "skip", "--bad-sample-budget", "2",
                                       out="s", steps=10)]) == 0  # fmt: skip
    log = open(os.path.join(_run(tmp_path, "s"), "train.log")).read()
    for i in bad:  # 10 steps x 8 = 2 epochs of 40: each bad sample met, logged once with its path and reason
        assert log.count(f"skipped bad sample {i}: {feature_path(data, i)}: cannot read moments") == 1
    assert snapshot(data) == before  # nothing in the data is touched
    capsys.readouterr()
    assert main([str(a) for a in _args(tmp_path, "--on-bad-sample", "skip", "--bad-sample-budget", "1",
                                       out="t", steps=10)]) == errors.EXIT_USER  # fmt: skip
    assert "more than 1 bad samples, the --bad-sample-budget" in capsys.readouterr().err


def test_skipping_is_deterministic_and_resume_safe(tmp_path, data):
    _corrupt(data, 11)
    skip = ("--on-bad-sample", "skip", "--bad-sample-budget", "0.1")  # a fraction: 4 of 40
    assert main([str(a) for a in _args(tmp_path, *skip, out="a", steps=8, ckpt_every=8)]) == 0
    assert main([str(a) for a in _args(tmp_path, *skip, out="b", steps=4, ckpt_every=4)]) == 0
    assert main([str(a) for a in _args(tmp_path, *skip, "--resume", out="b", steps=8, ckpt_every=4)]) == 0
    a, b = (ckpt.read_checkpoint(ckpt.step_dir(_run(tmp_path, r), 8))["model"] for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_permission_errors_are_permission_errors(tmp_path, capsys, data, monkeypatch):
    denied = feature_path(data, 2)
    real_load = np.load

    def load(path, *a, **kw):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_load(path, *a, **kw)

    monkeypatch.setattr(np, "load", load)
    before = snapshot(data)
    capsys.readouterr()  # met mid-epoch, with skipping on: never skipped, never called corruption
    assert main([str(a) for a in _args(tmp_path, "--on-bad-sample", "skip", steps=10)]) == errors.EXIT_USER
    err = capsys.readouterr().err
    assert f"{denied}: permission denied" in err and "not corruption" in err and "Traceback" not in err
    assert snapshot(data) == before
    assert "corrupt" not in err.replace("not corruption", "") and "delete" not in err


def test_an_unreadable_folder_is_not_an_empty_dataset(tmp_path, capsys, data, monkeypatch):
    folder = str(data / "vae-sd" / "00000")
    real_scandir = os.scandir

    def scandir(path="."):  # what os.walk meets in a folder without read permission (also as root)
        if os.fspath(path) == folder:
            raise PermissionError(13, "Permission denied", folder)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    err = refused(capsys, tmp_path, _args(tmp_path), errors.EXIT_USER, f"{folder}: permission denied", "chmod")
    assert "empty" not in err


@pytest.mark.parametrize(
    "extra,words",
    [
        (("--on-bad-sample", "skip", "--loader", "dali"), "DALI loader does not"),
        (("--bad-sample-budget", "5"), "read with --on-bad-sample skip"),
        (("--reset-data-position",), "applies to --resume / --resume-step only"),
    ],
    ids=["skip-with-dali", "budget-without-skip", "reset-on-a-new-run"],
)
def test_data_policy_options_where_they_are_not_read_are_refused_before_anything(tmp_path, data, capsys, extra, words):
    before = snapshot(tmp_path)
    assert main([str(a) for a in _args(tmp_path, *extra)]) == errors.EXIT_USER
    assert words in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_skip_with_loader_auto_picks_the_dataloader(monkeypatch):
    """--loader auto would pick DALI on a GPU; with --on-bad-sample skip it must pick the per-sample DataLoader."""
    from repa_fast import build
    from repa_fast.config import TrainConfig
    from repa_fast.data import dali_loader

    asked = []
    monkeypatch.setattr(dali_loader, "choose_loader", lambda loader, ds, dev: asked.append(loader) or "dataloader")
    cfg = TrainConfig()
    cfg.data.on_bad_sample, cfg.data.num_workers = "skip", 0
    build.build_loader(cfg, list(range(8)), None, 2, torch.device("cpu"), 0)
    cfg.data.on_bad_sample = "error"
    build.build_loader(cfg, list(range(8)), None, 2, torch.device("cpu"), 0)
    assert asked == ["dataloader", "auto"]
