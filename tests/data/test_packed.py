"""Packed layout: pack == reference folder bit for bit, resumable + atomic pack, cheap/full checks, bad inputs."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from repa_fast.data import DataError, PackedDataset, open_dataset, verify_packed
from repa_fast.data.packed import sample_rows, write_index
from repa_fast.tools import pack as pack_mod
from tests.data.helpers import make_ref_dataset

N = 21  # sample_rows() takes 16 of them: some rows are outside the cheap checksum


@pytest.fixture
def ref(tmp_path):
    root = tmp_path / "ref"
    truth = make_ref_dataset(root, list(range(N)), resolution=32, latent_shape=(8, 4, 4), num_classes=7)
    return str(root), truth


@pytest.fixture
def packed(ref, tmp_path):
    dst = str(tmp_path / "packed")
    pack_mod.pack(ref[0], dst, num_classes=7, workers=0, batch_size=4, progress=False)
    return dst, ref[1]


def _edit_index(path, fn):
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    fn(index)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


def test_pack_fp32_is_bitwise_the_reference_dataset(packed):
    dst, truth = packed
    ds = open_dataset(dst, num_classes=7)
    assert isinstance(ds, PackedDataset)
    assert (len(ds), ds.resolution, ds.latent_shape, ds.latent_dtype) == (N, 32, (8, 4, 4), "float32")
    for i in range(N):
        image, moments, label = ds[i]
        assert image.dtype == torch.uint8 and moments.dtype == torch.float32 and label.dtype == torch.int64
        np.testing.assert_array_equal(image.numpy(), truth[i][0])
        np.testing.assert_array_equal(moments.numpy(), truth[i][1])
        assert int(label) == truth[i][2]
    assert not os.path.exists(dst + ".tmp")


def test_pack_fp16(ref, tmp_path):
    dst = str(tmp_path / "p16")
    pack_mod.pack(ref[0], dst, latent_dtype="fp16", num_classes=7, workers=0, progress=False)
    ds = open_dataset(dst, num_classes=7)
    assert np.load(os.path.join(dst, "moments.npy"), mmap_mode="r").dtype == np.float16
    for i in (0, 7, N - 1):
        np.testing.assert_array_equal(ds[i][1].numpy(), ref[1][i][1].astype(np.float16).astype(np.float32))


def test_fp16_overflow_is_refused(tmp_path):
    root = tmp_path / "ref"
    truth = make_ref_dataset(root, [0, 1, 2], num_classes=3)
    big = truth[1][1].copy()
    big[0, 0, 0] = 1e6
    np.save(root / "vae-sd" / "00000" / "img-mean-std-00000001.npy", big)
    with pytest.raises(DataError, match=r"img-mean-std-00000001.npy: moments overflow float16 .* --latent-dtype fp32"):
        pack_mod.pack(str(root), str(tmp_path / "p"), latent_dtype="fp16", num_classes=3, workers=0, progress=False)


def test_pack_resumes_after_a_crash(ref, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    pack_mod.pack(ref[0], straight, num_classes=7, workers=0, batch_size=4, progress=False)
    dst = str(tmp_path / "resumed")
    real, calls = pack_mod._to_latent_dtype, []

    def crash_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    monkeypatch.setattr(pack_mod, "_to_latent_dtype", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        pack_mod.pack(ref[0], dst, num_classes=7, workers=0, batch_size=4, flush_every=4, progress=False)
    assert not os.path.exists(dst)  # atomic: nothing at DST until finished
    with open(os.path.join(dst + ".tmp", "progress.json")) as f:
        assert json.load(f)["done"] == 8  # two flushed batches
    calls.clear()
    monkeypatch.setattr(pack_mod, "_to_latent_dtype", lambda *a: (calls.append(1), real(*a))[1])
    pack_mod.pack(ref[0], dst, num_classes=7, workers=0, batch_size=4, progress=False)
    assert len(calls) == 4  # rows 8..20 only: ceil(13 / 4) batches
    for name in ("images", "moments", "labels"):
        np.testing.assert_array_equal(
            np.load(os.path.join(dst, f"{name}.npy")), np.load(os.path.join(straight, f"{name}.npy"))
        )


def test_resume_with_other_options_is_refused(ref, tmp_path, monkeypatch):
    dst = str(tmp_path / "p")
    monkeypatch.setattr(pack_mod, "write_index", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pack_mod.pack(ref[0], dst, num_classes=7, workers=0, progress=False)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"p.tmp: left by an interrupted pack of different inputs or options"):
        pack_mod.pack(ref[0], dst, latent_dtype="fp16", num_classes=7, workers=0, progress=False)


def test_cli_pack_and_verify(ref, tmp_path, capsys):
    dst = str(tmp_path / "cli")
    assert pack_mod.main([ref[0], dst, "--workers", "0", "--num-classes", "7"]) == 0
    assert pack_mod.main(["--verify", dst, "--num-classes", "7"]) == 0
    assert f"{dst}: OK ({N} samples" in capsys.readouterr().out
    assert pack_mod.main([ref[0], dst, "--workers", "0", "--num-classes", "7"]) == 2
    assert "already exists (a packed dataset); pick a new destination" in capsys.readouterr().err


def test_pickles_without_memmaps_and_loads_in_workers(packed):
    dst, truth = packed
    ds = open_dataset(dst, num_classes=7)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the arrays are reopened in the worker, never shipped
    np.testing.assert_array_equal(pickle.loads(blob)[3][1].numpy(), truth[3][1])  # spawn-style workers
    batches = list(torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2))
    moments = torch.cat([b[1] for b in batches])
    np.testing.assert_array_equal(moments.numpy(), np.stack([truth[i][1] for i in range(N)]))


def test_index_with_wrong_dtype(packed):
    dst, _ = packed
    _edit_index(dst, lambda ix: ix["fields"]["moments"].update(dtype="float64"))
    with pytest.raises(DataError, match=r"index.json: field 'moments' has dtype float64, expected one of"):
        open_dataset(dst, num_classes=7)


def test_index_with_wrong_shape(packed):
    dst, _ = packed
    _edit_index(dst, lambda ix: ix["fields"]["images"].update(shape=[N, 3, 32, 31]))
    with pytest.raises(DataError, match=r"field 'images' has shape \[21, 3, 32, 31\], expected \[21, 3, 32, 32\]"):
        open_dataset(dst, num_classes=7)


def test_file_disagrees_with_index(packed):
    dst, _ = packed
    np.save(os.path.join(dst, "labels.npy"), np.zeros(N, np.int32))
    with pytest.raises(
        DataError,
        match=r"labels.npy: holds int32 \[21\] but index.json says int64 \[21\] for "
        r"field 'labels'",
    ):
        open_dataset(dst, num_classes=7)


def test_field_row_count_mismatch(packed):
    dst, _ = packed
    np.save(os.path.join(dst, "images.npy"), np.zeros((N - 1, 3, 32, 32), np.uint8))
    with pytest.raises(
        DataError,
        match=r"images.npy: holds uint8 \[20, 3, 32, 32\] but index.json says uint8 "
        r"\[21, 3, 32, 32\] for field 'images'; the files do not belong together",
    ):
        open_dataset(dst, num_classes=7)


def test_truncated_field_file(packed):
    dst, _ = packed
    path = os.path.join(dst, "moments.npy")
    open(path, "r+b").truncate(os.path.getsize(path) - 64)
    with pytest.raises(DataError, match=r"moments.npy: cannot open field 'moments' .* truncated or corrupt"):
        open_dataset(dst, num_classes=7)


def test_missing_field_file(packed):
    dst, _ = packed
    os.remove(os.path.join(dst, "images.npy"))
    with pytest.raises(DataError, match=r"images.npy: cannot open field 'images'"):
        open_dataset(dst, num_classes=7)


def test_version_mismatch(packed):
    dst, _ = packed
    _edit_index(dst, lambda ix: ix.update(version=99))
    with pytest.raises(DataError, match=r"'version' is 99, this repa_fast reads version 1"):
        open_dataset(dst, num_classes=7)


def test_label_range_checked_on_open(packed):
    dst, truth = packed
    top = max(t[2] for t in truth.values())
    with pytest.raises(DataError, match=rf"field 'labels'.*label {top} is outside \[0, {top}\)"):
        open_dataset(dst, num_classes=top)


def test_wrong_resolution(packed):
    with pytest.raises(DataError, match=r"images are 32x32 but resolution 64 was asked for"):
        open_dataset(packed[0], num_classes=7, resolution=64)


def test_checksum_mismatch_on_a_sampled_row(packed):
    dst, _ = packed
    mm = np.load(os.path.join(dst, "images.npy"), mmap_mode="r+")
    mm[sample_rows(N)[3], 0, 5, 5] ^= 1
    mm.flush()
    del mm
    with pytest.raises(DataError, match=r"index.json: checksum mismatch .*pack --verify"):
        open_dataset(dst, num_classes=7)


def test_checksum_mismatch_on_an_edited_index(packed):
    dst, _ = packed
    _edit_index(dst, lambda ix: ix["source"].update(path="/elsewhere"))
    with pytest.raises(DataError, match=r"checksum mismatch"):
        open_dataset(dst, num_classes=7)


def test_unsampled_corruption_found_per_sample_and_by_verify(packed):
    dst, _ = packed
    row = sorted(set(range(N)) - set(sample_rows(N)))[0]
    mm = np.load(os.path.join(dst, "moments.npy"), mmap_mode="r+")
    mm[row, 2, 1, 1] = np.nan
    mm.flush()
    del mm
    ds = open_dataset(dst, num_classes=7)  # the cheap checks cannot see this row
    with pytest.raises(DataError, match=rf"packed: row {row}, field 'moments': moments contain 1 NaN/inf"):
        ds[row]
    with pytest.raises(DataError, match=r"moments.npy: SHA-256 differs from index.json \(field 'moments'\)"):
        verify_packed(dst)


def test_unsampled_bad_label_found_per_sample_and_by_verify(packed):
    dst, _ = packed
    row = sorted(set(range(N)) - set(sample_rows(N)))[1]
    labels = np.load(os.path.join(dst, "labels.npy"), mmap_mode="r+")
    labels[row] = 99
    labels.flush()
    del labels
    ds = open_dataset(dst, num_classes=7)
    ds[row - 1]
    with pytest.raises(DataError, match=rf"row {row}, field 'labels': label 99 is outside \[0, 7\)"):
        ds[row]
    with pytest.raises(DataError, match=r"labels.npy: SHA-256 differs from index.json"):
        verify_packed(dst, num_classes=7)


def test_verify_scans_every_row_for_non_finite_moments(packed):
    dst, _ = packed
    row = sorted(set(range(N)) - set(sample_rows(N)))[2]
    mm = np.load(os.path.join(dst, "moments.npy"), mmap_mode="r+")
    mm[row, 0, 0, 0] = np.inf
    mm.flush()
    del mm
    # A writer that stored a non-finite row and indexed it consistently: hashes and checksum all agree.
    with open(os.path.join(dst, "index.json")) as f:
        index = json.load(f)
    specs = {k: {kk: vv for kk, vv in v.items() if kk != "sha256"} for k, v in index["fields"].items()}
    write_index(dst, specs, resolution=32, latent_shape=(8, 4, 4), source=index["source"])
    open_dataset(dst, num_classes=7)
    with pytest.raises(DataError, match=rf"field 'moments', row {row} has NaN/inf values"):
        verify_packed(dst, num_classes=7)
