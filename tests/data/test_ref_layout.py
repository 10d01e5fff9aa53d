"""REPA folder layout: reference pairing/order, inferred shapes, and every bad input with its message."""

import json
import os

import numpy as np
import pytest
import torch

from repa_fast.data import DataError, RefFolderDataset, open_dataset
from tests.data.helpers import feature_path, image_path, make_ref_dataset

# Sample numbers straddle the 00000/ -> 00001/ folder boundary, as in a real 1000-per-folder dataset.
IDS = [997, 998, 999, 1000, 1001, 1002]


@pytest.fixture
def ref(tmp_path):
    root = tmp_path / "ref"
    truth = make_ref_dataset(root, IDS, resolution=32, latent_shape=(8, 4, 4), num_classes=5)
    return str(root), truth


def test_items_match_written_files_in_reference_order(ref):
    root, truth = ref
    ds = open_dataset(root, num_classes=5)
    assert isinstance(ds, RefFolderDataset)
    assert (len(ds), ds.resolution, ds.latent_shape, ds.num_classes) == (6, 32, (8, 4, 4), 5)
    for k, i in enumerate(IDS):  # sorted relative paths == numeric order of the reference names
        image, moments, label = ds[k]
        assert image.dtype == torch.uint8 and moments.dtype == torch.float32 and label.dtype == torch.int64
        assert label.shape == ()
        np.testing.assert_array_equal(image.numpy(), truth[i][0])
        np.testing.assert_array_equal(moments.numpy(), truth[i][1])
        assert int(label) == truth[i][2]


def test_shapes_inferred_from_data_not_assumed(tmp_path):
    root = tmp_path / "r"
    truth = make_ref_dataset(root, [0, 1, 2], resolution=24, latent_shape=(6, 3, 3), moments_dtype=np.float16)
    ds = open_dataset(root, num_classes=5, resolution=24)
    assert (ds.resolution, ds.latent_shape) == (24, (6, 3, 3))
    np.testing.assert_array_equal(ds[1][1].numpy(), truth[1][1])  # fp16 files come back as float32


def test_dataloader_with_workers(ref):
    root, truth = ref
    ds = open_dataset(root, num_classes=5)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    images = torch.cat([b[0] for b in batches])
    np.testing.assert_array_equal(images.numpy(), np.stack([truth[i][0] for i in IDS]))


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data directory does not exist; pass --data-dir"):
        open_dataset(tmp_path / "nowhere")


def test_empty_dir(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"e: data directory is empty; create the dataset with .*preprocess"):
        open_dataset(tmp_path / "e")


def test_unrecognised_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "foo.txt").write_text("hi")
    with pytest.raises(DataError, match=r"neither a packed dataset .* found \['foo.txt'\]"):
        open_dataset(tmp_path / "x")


def test_missing_features_dir(ref):
    root, _ = ref
    os.rename(os.path.join(root, "vae-sd"), os.path.join(root, "moved"))
    with pytest.raises(DataError, match=r"vae-sd: missing; the REPA layout needs images/ and vae-sd/"):
        open_dataset(root)


def test_empty_images_dir(tmp_path):
    root = tmp_path / "r"
    (root / "images").mkdir(parents=True)
    (root / "vae-sd").mkdir()
    with pytest.raises(DataError, match=r"images: no data files found \(dataset is empty\)"):
        open_dataset(root)


def test_count_mismatch(ref):
    root, _ = ref
    os.remove(feature_path(root, 1002))
    with pytest.raises(DataError, match=r"6 images in images/ but 5 moment files in vae-sd/.*re-run the encode"):
        open_dataset(root)


def test_pairing_mismatch(ref):
    root, _ = ref
    os.remove(feature_path(root, 998))  # one missing feature, one extra: counts agree, positions do not
    np.save(feature_path(root, 1003), np.zeros((8, 4, 4), np.float32))
    with pytest.raises(
        DataError,
        match=r"images/00000/img00000998.png is paired with "
        r"vae-sd/00000/img-mean-std-00000999.npy",
    ):
        open_dataset(root)


def test_missing_labels_file(ref):
    root, _ = ref
    os.remove(os.path.join(root, "vae-sd", "dataset.json"))
    with pytest.raises(DataError, match=r"vae-sd/dataset.json: missing; the REPA layout keeps class labels there"):
        open_dataset(root)


def test_null_labels(ref):
    root, _ = ref
    with open(os.path.join(root, "vae-sd", "dataset.json"), "w") as f:
        json.dump({"labels": None}, f)
    with pytest.raises(DataError, match=r"'labels' is null .* one folder per class"):
        open_dataset(root)


def test_label_missing_for_a_file(ref):
    root, _ = ref
    path = os.path.join(root, "vae-sd", "dataset.json")
    with open(path) as f:
        labels = json.load(f)["labels"]
    with open(path, "w") as f:
        json.dump({"labels": labels[:-1]}, f)
    with pytest.raises(DataError, match=r"no label for 1 feature files, e.g. 00001/img-mean-std-00001002.npy"):
        open_dataset(root)


def test_label_out_of_range(ref):
    root, truth = ref
    top = max(t[2] for t in truth.values())
    with pytest.raises(DataError, match=rf"label {top} is outside \[0, {top}\); pass --num-classes {top + 1}"):
        open_dataset(root, num_classes=top)


def test_wrong_resolution_requested(ref):
    root, _ = ref
    with pytest.raises(DataError, match=r"images are 32x32 but resolution 256 was asked for; pass --resolution 32"):
        open_dataset(root, resolution=256)


def test_one_image_of_wrong_size(ref):
    root, _ = ref
    import PIL.Image

    PIL.Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(image_path(root, 999))
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(DataError, match=r"img00000999.png: image has shape 3x16x16 .* expected 3x32x32"):
        ds[2]


def test_truncated_png(ref):
    root, _ = ref
    path = image_path(root, 1000)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(DataError, match=r"img00001000.png: cannot decode image .* truncated or corrupt"):
        ds[3]


def test_corrupt_png(ref):
    root, _ = ref
    open(image_path(root, 1001), "wb").write(os.urandom(500))
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(DataError, match=r"img00001001.png: cannot decode image"):
        ds[4]


def test_corrupt_first_png_fails_on_open(ref):
    root, _ = ref
    open(image_path(root, 997), "wb").write(b"not a png at all")
    with pytest.raises(DataError, match=r"img00000997.png: cannot read the image header"):
        open_dataset(root)


def test_truncated_npy(ref):
    root, _ = ref
    path = feature_path(root, 998)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-40])
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(DataError, match=r"img-mean-std-00000998.npy: cannot read moments .npy .* re-encode"):
        ds[1]


def test_truncated_last_npy_fails_on_open(ref):
    root, _ = ref
    path = feature_path(root, 1002)
    open(path, "wb").write(open(path, "rb").read()[:100])
    with pytest.raises(DataError, match=r"img-mean-std-00001002.npy: cannot read moments .npy header"):
        open_dataset(root)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_moments(ref, bad):
    root, truth = ref
    moments = truth[1000][1].copy()
    moments[3, 1, 2] = bad
    np.save(feature_path(root, 1000), moments)
    ds = open_dataset(root, num_classes=5)
    ds[2]  # neighbours are fine
    with pytest.raises(DataError, match=r"img-mean-std-00001000.npy: moments contain 1 NaN/inf values"):
        ds[3]


def test_moments_of_wrong_shape(ref):
    root, _ = ref
    np.save(feature_path(root, 999), np.ones((8, 8, 8), np.float32))
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(
        DataError,
        match=r"img-mean-std-00000999.npy: moments have shape \(8, 8, 8\), "
        r"expected \(8, 4, 4\)",
    ):
        ds[2]


def test_moments_of_wrong_dtype(ref):
    root, _ = ref
    np.save(feature_path(root, 999), np.ones((8, 4, 4), np.int32))
    ds = open_dataset(root, num_classes=5)
    with pytest.raises(DataError, match=r"img-mean-std-00000999.npy: moments dtype is int32, expected float32"):
        ds[2]


def test_per_sample_error_survives_dataloader_workers(ref):
    """The loop reads through worker processes: the message must still name the file."""
    root, _ = ref
    open(image_path(root, 1001), "wb").write(os.urandom(300))
    loader = torch.utils.data.DataLoader(open_dataset(root, num_classes=5), batch_size=2, num_workers=1)
    with pytest.raises(DataError, match=r"img00001001.png: cannot decode image"):
        list(loader)
