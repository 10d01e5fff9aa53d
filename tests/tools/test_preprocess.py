"""Preprocessing: ADM crop per docs/objective.md §Latents, ImageFolder order, SD-VAE [mean, std] vs diffusers, resume,
multi-process."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from repa_fast.data import DataError, PackedDataset, RefFolderDataset, open_dataset
from repa_fast.data.transforms import adm_center_crop
from repa_fast.tools import preprocess as pp
from repa_fast.tools.preprocess import PreprocessConfig, preprocess, scan_image_folder
from tests.data.helpers import make_jpeg_folder, make_tiny_vae

CLASSES = {"n02": [(50, 40), (33, 70), (100, 100)], "n01": [(64, 48), (40, 40)], "n03": [(90, 35), (32, 32)]}
ORDER = [("n01", 0), ("n01", 1), ("n02", 0), ("n02", 1), ("n02", 2), ("n03", 0), ("n03", 1)]
LABELS = [0, 0, 1, 1, 1, 2, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions on a shared 2-core box: OpenMP spinning makes 2 threads ~100x slower than 1.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    vae = make_tiny_vae(str(root / "vae"))  # 32 px -> (8, 4, 4) moments
    make_jpeg_folder(str(root / "src"), CLASSES)
    return root, vae


def cfg(root, name, **kw):
    base = dict(
        source=str(root / "src"),
        dest=str(root / name),
        vae=str(root / "vae"),
        resolution=32,
        batch_size=2,
        shard_size=3,
        loader_workers=0,
        progress=False,
    )
    return PreprocessConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ref_out(env):
    root, _ = env
    return preprocess(cfg(root, "ref"))


@pytest.fixture(scope="module")
def packed_out(env):
    root, _ = env
    return preprocess(cfg(root, "packed", layout="packed"))


def crop_oracle(img: PIL.Image.Image, s: int, round_fn=round) -> np.ndarray:
    """docs/objective.md §Latents step by step: BOX-halve while min side >= 2S, BICUBIC to short side S, center crop."""
    img = img.convert("RGB")
    w, h = img.size
    while min(w, h) >= 2 * s:
        w, h = w // 2, h // 2
        img = img.resize((w, h), PIL.Image.Resampling.BOX)
    k = s / min(w, h)
    img = img.resize((round_fn(w * k), round_fn(h * k)), PIL.Image.Resampling.BICUBIC)
    a = np.asarray(img)
    t, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    return a[t : t + s, left : left + s]


@pytest.mark.parametrize(
    "w,h,s", [(600, 400, 32), (50, 40, 32), (31, 90, 32), (256, 256, 256), (513, 300, 128), (100, 64, 40)]
)
def test_adm_center_crop(w, h, s):
    img = PIL.Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = adm_center_crop(img, s)
    assert out.shape == (s, s, 3) and out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, crop_oracle(img, s))


def test_adm_crop_rounds_ties_to_even_like_the_reference():
    """100x64 -> S=40: width 100 * 0.625 = 62.5 rounds to 62 (Python round); round-half-up (63) gives other pixels."""
    img = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 100, 3), dtype=np.uint8))
    half_up = crop_oracle(img, 40, round_fn=lambda x: int(x + 0.5))
    assert not np.array_equal(half_up, crop_oracle(img, 40))  # the case really distinguishes the two
    np.testing.assert_array_equal(adm_center_crop(img, 40), crop_oracle(img, 40))


def test_grey_and_rgba_sources_become_rgb():
    grey = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8))
    out = adm_center_crop(grey, 32)
    assert out.shape == (32, 32, 3) and np.array_equal(out[..., 0], out[..., 2])


def test_scan_labels_as_the_reference_dataset_tool(tmp_path):
    # REPA dataset_tools.py open_image_folder: sorted paths, label = index among top-level folders WITH images.
    make_jpeg_folder(str(tmp_path), {"b": [(8, 8)], "a": [(8, 8), (8, 8)], "a_empty": [], "c": [(8, 8)]})
    os.makedirs(tmp_path / "b" / "sub")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "b" / "sub" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    files, labels, classes = scan_image_folder(str(tmp_path))
    assert classes == ["a", "b", "c"]  # the empty folder is no class: "b" and "c" keep labels 1 and 2
    assert files == ["a/a_000.JPEG", "a/a_001.JPEG", "b/b_000.JPEG", "b/sub/x.png", "c/c_000.JPEG"]
    assert labels == [0, 0, 1, 1, 2]
    # Names where class-major order and sorted paths differ ("-" sorts before "/"): labels still follow the names.
    other = tmp_path / "other"
    make_jpeg_folder(str(other), {"x": [(8, 8)], "x-y": [(8, 8)]})
    files, labels, classes = scan_image_folder(str(other))
    assert files == ["x-y/x-y_000.JPEG", "x/x_000.JPEG"] and classes == ["x", "x-y"] and labels == [1, 0]


def test_ref_layout_output(env, ref_out):
    root, vae = env
    ds = open_dataset(ref_out, num_classes=3)
    assert isinstance(ds, RefFolderDataset) and (len(ds), ds.resolution, ds.latent_shape) == (7, 32, (8, 4, 4))
    for i, (cls, k) in enumerate(ORDER):
        image, moments, label = ds[i]
        with PIL.Image.open(root / "src" / cls / f"{cls}_{k:03d}.JPEG") as im:
            expect = crop_oracle(im, 32)
        np.testing.assert_array_equal(image.numpy(), expect.transpose(2, 0, 1))
        x = torch.from_numpy(expect.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, 32, 32), batch of one
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        torch.testing.assert_close(moments[:4], dist.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moments[4:], torch.exp(0.5 * dist.logvar[0]), atol=1e-5, rtol=1e-5)
        assert int(label) == LABELS[i]
    with open(os.path.join(ref_out, "images", "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"][2] == ["00000/img00000002.png", 1] and meta["classes"] == ["n01", "n02", "n03"]
    assert not os.path.exists(os.path.join(ref_out, ".progress"))


def test_packed_output_equals_ref_output(ref_out, packed_out):
    a, b = open_dataset(ref_out, num_classes=3), open_dataset(packed_out, num_classes=3)
    assert isinstance(b, PackedDataset) and not os.path.exists(packed_out + ".tmp")
    for i in range(7):
        for x, y in zip(a[i], b[i]):
            assert torch.equal(x, y)


def test_rerun_of_a_finished_job_is_a_no_op(env, ref_out, capsys):
    root, _ = env
    assert preprocess(cfg(root, "ref")) == ref_out
    assert "already complete, nothing to do" in capsys.readouterr().out


def test_finished_dataset_made_differently_is_not_touched(env, ref_out, packed_out):
    root, _ = env
    with pytest.raises(
        DataError,
        match=r"ref: already holds a finished dataset made with different latent_shape, "
        r"resolution; choose",
    ):
        preprocess(cfg(root, "ref", resolution=16))
    with pytest.raises(DataError, match=r"packed: already holds a finished dataset made with different latent_dtype"):
        preprocess(cfg(root, "packed", layout="packed", latent_dtype="fp16"))
    record = os.path.join(ref_out, "preprocess.json")
    os.rename(record, record + ".away")  # as if made by the reference's dataset_tools.py
    try:
        with pytest.raises(DataError, match=r"ref: already holds a finished dataset made by another tool"):
            preprocess(cfg(root, "ref"))
    finally:
        os.rename(record + ".away", record)


def test_resume_skips_finished_shards(env, ref_out, monkeypatch):
    root, _ = env
    real, encoded = pp.encode_moments, []

    def counting(vae, images):
        encoded.append(len(images))
        if len(encoded) == 3:  # first batch of shard 1 (shards: [0, 1, 2], [3, 4, 5], [6]; batches of 2)
            raise KeyboardInterrupt("simulated kill")
        return real(vae, images)

    monkeypatch.setattr(pp, "encode_moments", counting)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg(root, "resumed"))
    assert sorted(os.listdir(root / "resumed" / ".progress")) == ["plan.json", "shard-000000.done"]
    encoded.clear()
    monkeypatch.setattr(pp, "encode_moments", lambda vae, images: (encoded.append(len(images)), real(vae, images))[1])
    preprocess(cfg(root, "resumed"))
    assert encoded == [2, 1, 1]  # shards 1 and 2 only
    a, b = open_dataset(ref_out, num_classes=3), open_dataset(root / "resumed", num_classes=3)
    for i in range(7):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i]))


def test_resume_with_other_arguments_is_refused(env, monkeypatch):
    root, _ = env
    monkeypatch.setattr(pp.Job, "finalize", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg(root, "changed", layout="packed"))
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"changed.tmp: holds an unfinished run with different latent_dtype; rerun"):
        preprocess(cfg(root, "changed", layout="packed", latent_dtype="fp16"))


def test_cli(env, capsys):
    root, _ = env
    code = pp.main(
        [
            "--source",
            str(root / "src"),
            "--dest",
            str(root / "cli"),
            "--vae",
            str(root / "vae"),
            "--resolution",
            "32",
            "--batch-size",
            "4",
            "--layout",
            "packed",
            "--latent-dtype",
            "fp16",
            "--loader-workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0 and f"{root / 'cli'}: done" in capsys.readouterr().out
    ds = open_dataset(root / "cli", num_classes=3)
    assert ds.latent_dtype == "float16" and len(ds) == 7


@pytest.mark.multiproc
def test_worker_processes_give_the_same_dataset(env, ref_out):
    root, _ = env
    out = preprocess(cfg(root, "workers", workers=2))
    a, b = open_dataset(ref_out, num_classes=3), open_dataset(out, num_classes=3)
    for i in range(7):
        assert torch.equal(a[i][0], b[i][0]) and int(a[i][2]) == int(b[i][2])
        torch.testing.assert_close(a[i][1], b[i][1], atol=1e-6, rtol=1e-6)  # other thread count, same math


@pytest.mark.multiproc
def test_torchrun_style_ranks_give_the_same_dataset(env, packed_out):
    """WORLD_SIZE=2: rank 1 waits for rank 0's work area, ranks split the shards, rank 0 finalises."""
    root, _ = env
    args = [
        sys.executable,
        "-m",
        "repa_fast.tools.preprocess",
        "--source",
        str(root / "src"),
        "--dest",
        str(root / "ranks"),
        "--vae",
        str(root / "vae"),
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--shard-size",
        "3",
        "--layout",
        "packed",
        "--loader-workers",
        "0",
        "--no-progress",
    ]
    base = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen(args, env=dict(base, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = open_dataset(packed_out, num_classes=3), open_dataset(root / "ranks", num_classes=3)
    for i in range(7):
        assert torch.equal(a[i][0], b[i][0]) and int(a[i][2]) == int(b[i][2])
        torch.testing.assert_close(a[i][1], b[i][1], atol=1e-6, rtol=1e-6)


def test_missing_vae(env):
    root, _ = env
    with pytest.raises(DataError, match=r"novae: no VAE weights in diffusers layout .* stabilityai/sd-vae-ft-mse"):
        preprocess(cfg(root, "x", vae=str(root / "novae")))


def test_vae_config_without_weights(env, tmp_path):
    root, _ = env
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text((root / "vae" / "config.json").read_text())
    with pytest.raises(DataError, match=r"v: has config.json but no weights .* --vae PATH"):
        preprocess(cfg(root, "x", vae=str(tmp_path / "v")))


def test_missing_source(env):
    root, _ = env
    with pytest.raises(DataError, match=r"nosrc: --source does not exist .* \(one subfolder per class"):
        preprocess(cfg(root, "x", source=str(root / "nosrc")))


def test_source_without_class_folders(env, tmp_path):
    root, _ = env
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=r"no class subfolders; --source must hold one folder per class"):
        preprocess(cfg(root, "x", source=str(tmp_path)))


def test_corrupt_source_image(env, tmp_path):
    root, _ = env
    make_jpeg_folder(str(tmp_path / "s"), {"a": [(40, 40)], "b": [(40, 40)]})
    (tmp_path / "s" / "b" / "b_000.JPEG").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(DataError, match=r"b_000.JPEG: cannot decode source image .* remove or replace"):
        preprocess(cfg(root, "x2", source=str(tmp_path / "s"), dest=str(tmp_path / "out")))


def test_dest_not_empty(env, tmp_path):
    root, _ = env
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"d: not empty and not an unfinished preprocessing run"):
        preprocess(cfg(root, "x", dest=str(tmp_path / "d")))
    assert (tmp_path / "d" / "mine.txt").read_text() == "keep me"


def test_resolution_not_multiple_of_vae_factor(env):
    root, _ = env
    with pytest.raises(DataError, match=r"--resolution 36 is not a multiple of the VAE's downsampling factor 8"):
        preprocess(cfg(root, "x", resolution=36))
