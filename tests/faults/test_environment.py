"""Fault tests, environment class (issue 20 items 6 and 8): the machine, the shell or the paths given are unusable.

Each case runs a command's main(argv) in-process and asserts its exit code (repa_fast.errors), the key words of its
message, that no traceback is printed, and that nothing was written where it refused (the tree is byte-identical).
Cases: WORLD_SIZE without a launcher; HOME not usable as a cache; an output path under a file or onto an existing
directory; a read-only file system; dataset.json entries that are not [file, label] pairs; a run's config.json or a
damaged .pt as --ckpt (never torch's advice to retry with weights_only=False).
"""

import json
import os

import pytest
import torch

from repa_fast import errors, export, generate
from repa_fast import io as rio
from repa_fast.cli import main as train_main
from repa_fast.data import DataError, open_dataset
from repa_fast.engine.trainer import train
from repa_fast.evaluate import main as evaluate_main
from tests.data.helpers import make_ref_dataset
from tests.test_hardening import snapshot

from ..engine.helpers import tiny_args, tiny_cfg

LAUNCHER = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train(tiny_cfg(tmp_path_factory.mktemp("env"), steps=1, ckpt_every=1))["run_dir"]


def refused(capsys, code, rc, *words):
    """The command exited ``code`` with one message holding ``words`` and no traceback; returns the message."""
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def gen_args(ckpt, sample_dir, *extra):
    return ["--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--num-fid-samples", "2", "--num-steps", "2", *extra]


# -- WORLD_SIZE without a launcher --------------------------------------------------------------------------------


def test_world_size_without_a_launcher_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, run_dir):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in LAUNCHER:
        monkeypatch.delenv(var, raising=False)
    before = snapshot(tmp_path)
    rc = train_main(tiny_args(tmp_path / "out", steps=1))
    refused(capsys, errors.EXIT_USER, rc, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not", "torchrun")
    rc = generate.main(gen_args(run_dir, tmp_path / "samples"))
    refused(capsys, errors.EXIT_USER, rc, "WORLD_SIZE=2", "unset WORLD_SIZE")
    assert snapshot(tmp_path) == before
    monkeypatch.setenv("RANK", "0")  # one variable less missing: the message names only the others
    rc = generate.main(gen_args(run_dir, tmp_path / "samples"))
    err = refused(capsys, errors.EXIT_USER, rc, "MASTER_ADDR, MASTER_PORT are not")
    assert "RANK," not in err.split("are not")[0]


# -- HOME not usable as a cache -----------------------------------------------------------------------------------


def test_home_that_is_a_file_names_home_and_the_flag(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file, not a directory")
    monkeypatch.setenv("HOME", str(home))
    out = tmp_path / "out"
    rc = train_main(tiny_args(out, steps=1))  # the demo's digits-ssl encoder is cached under ~/.cache by default
    refused(capsys, errors.EXIT_USER, rc, f"HOME='{home}'", "--encoder-checkpoint-dir", "Not a directory")
    assert not out.exists() and home.read_text() == "a file, not a directory"


def test_evaluate_cache_dir_under_a_file(tmp_path, capsys):
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    (tmp_path / "f").write_text("x")
    before = snapshot(tmp_path)
    args = [str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--feature-net", "digits"]
    rc = evaluate_main([*args, "--cache-dir", str(tmp_path / "f" / "cache")])
    refused(capsys, errors.EXIT_USER, rc, "cannot create the cache folder", "--cache-dir", "Not a directory")
    assert snapshot(tmp_path) == before


# -- output paths -------------------------------------------------------------------------------------------------


def test_output_under_a_file_or_onto_a_directory(tmp_path, capsys, run_dir):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    before = snapshot(tmp_path)
    rc = generate.main(gen_args(run_dir, tmp_path / "f" / "samples"))
    refused(capsys, errors.EXIT_USER, rc, "--sample-dir", f"{tmp_path / 'f'} is a file, not a directory")
    rc = generate.main(gen_args(run_dir, tmp_path / "f"))
    refused(capsys, errors.EXIT_USER, rc, "--sample-dir", "a file of that name is in the way")
    rc = generate.main(gen_args(run_dir, tmp_path / "samples", "--png-dir", str(tmp_path / "f" / "png")))
    refused(capsys, errors.EXIT_USER, rc, "--png-dir", "is a file, not a directory")
    rc = export.main(["--ref-layout", run_dir, str(tmp_path / "f" / "ema.pt")])
    refused(capsys, errors.EXIT_USER, rc, "OUT", "is a file, not a directory")
    rc = export.main(["--ref-layout", run_dir, str(tmp_path / "d")])
    refused(capsys, errors.EXIT_USER, rc, f"OUT {tmp_path / 'd'} is an existing directory", "give a file name")
    rc = train_main(tiny_args(tmp_path / "f" / "out", steps=1))
    refused(capsys, errors.EXIT_USER, rc, "--output-dir", "not a writable directory")
    assert snapshot(tmp_path) == before


class _ReadOnly:
    """os.statvfs as the kernel answers it for a read-only mount (ST_RDONLY set), for paths under ``root``."""

    def __init__(self, root):
        self.root, self.real = str(root), os.statvfs

    def __call__(self, path):
        st = self.real(path)
        if not os.path.abspath(path).startswith(self.root):
            return st
        return os.statvfs_result((*st[:8], st.f_flag | os.ST_RDONLY, st.f_namemax))


def test_read_only_file_system_is_a_write_failure_before_any_work(tmp_path, capsys, monkeypatch, run_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(rio.os, "statvfs", _ReadOnly(ro))
    loaded = []
    monkeypatch.setattr(export, "load_run", lambda *a, **k: loaded.append(a))
    rc = export.main(["--ref-layout", run_dir, str(ro / "ema.pt")])
    refused(capsys, errors.EXIT_WRITE, rc, f"{ro} is on a read-only file system", "write somewhere else")
    rc = generate.main(gen_args(run_dir, ro / "samples"))
    refused(capsys, errors.EXIT_WRITE, rc, "--sample-dir", "read-only file system")
    assert not loaded and os.listdir(ro) == []


def test_read_only_failure_inside_torch_save_is_exit_5_without_disk_space_advice(
    tmp_path, capsys, monkeypatch, run_dir
):
    def read_only(obj, f, *a, **kw):  # torch's own words when its zip writer cannot open the file (torch 2.x)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only file system"
        )

    monkeypatch.setattr(export.torch, "save", read_only)
    rc = export.main(["--ref-layout", run_dir, str(tmp_path / "ema.pt")])
    err = refused(capsys, errors.EXIT_WRITE, rc, "could not write", "read-only: write somewhere else")
    assert "Free disk space" not in err and "free on that file system" not in err
    assert os.listdir(tmp_path) == []


# -- inputs that are not what they claim ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries, words",
    [
        ({"00000/img-mean-std-00000000.npy": 1}, "'labels' is a dict"),
        ([["00000/img-mean-std-00000000.npy", 1], "00000/img-mean-std-00000001.npy"], 'labels[1] is "00000/img'),
        ([["00000/img-mean-std-00000000.npy", 1], ["a", 1, 2]], 'labels[1] is ["a", 1, 2]'),
        ([[3, 1]], "labels[0] is [3, 1]"),
    ],
)
def test_dataset_json_entries_that_are_not_file_label_pairs(tmp_path, entries, words):
    make_ref_dataset(tmp_path, range(2))
    path = tmp_path / "vae-sd" / "dataset.json"
    path.write_text(json.dumps({"labels": entries}))
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        open_dataset(str(tmp_path))
    assert e.value.exit_code == errors.EXIT_USER
    assert str(path) in str(e.value) and words in str(e.value) and "[file name, integer label] pair" in str(e.value)
    assert snapshot(tmp_path) == before


def test_config_json_as_ckpt_points_to_the_run_directory(tmp_path, capsys, run_dir):
    rc = generate.main(gen_args(os.path.join(run_dir, "config.json"), tmp_path / "s"))
    err = refused(capsys, errors.EXIT_USER, rc, "run's configuration (JSON), not a checkpoint", f"--ckpt {run_dir}")
    assert "pickles" not in err
    assert not (tmp_path / "s").exists()


def test_damaged_or_foreign_pt_never_suggests_unsafe_loading(tmp_path, capsys):
    import zipfile

    torch.save({"ema": {"w": torch.randn(4, 3)}}, tmp_path / "good.pt")
    data = bytearray((tmp_path / "good.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.pt") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    at = bytes(data).find(pkl)
    data[at + 2 : at + 12] = b"\xff" * 10  # the pickle stream inside the (stored, uncompressed) zip member
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:200])
    (tmp_path / "notes.pt").write_text('{"just": "json"}')
    for name, words in (("bad.pt", "damaged"), ("cut.pt", "damaged or truncated"), ("notes.pt", "a JSON file")):
        rc = generate.main(gen_args(tmp_path / name, tmp_path / "s", "--model", "SiT-T/4"))
        err = refused(capsys, errors.EXIT_USER, rc, f"{tmp_path / name}", words)
        assert "pickles objects" not in err and "weights_only" not in err
    assert not (tmp_path / "s").exists()
