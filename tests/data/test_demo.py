"""Demo digits: real sklearn data, bilinear upsampling checked against a hand-written oracle, x0 = pixels."""

import sys

import numpy as np
import pytest
import torch

from repa_fast.data import DataError, DigitsDataset


def bilinear_oracle(img8: np.ndarray, r: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling with edge clamping (align_corners=False), written out by hand."""
    n = img8.shape[0]
    out = np.empty((r, r))
    for y in range(r):
        for x in range(r):
            sy, sx = max((y + 0.5) * n / r - 0.5, 0.0), max((x + 0.5) * n / r - 0.5, 0.0)
            y0, x0 = min(int(sy), n - 1), min(int(sx), n - 1)
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            wy, wx = sy - y0, sx - x0
            out[y, x] = (1 - wy) * ((1 - wx) * img8[y0, x0] + wx * img8[y0, x1]) + wy * (
                (1 - wx) * img8[y1, x0] + wx * img8[y1, x1]
            )
    return out


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.mark.parametrize("resolution", [32, 20])
def test_images_labels_and_moments(digits, resolution):
    ds = DigitsDataset(resolution=resolution)
    assert (len(ds), ds.num_classes, ds.resolution, ds.latent_shape) == (
        1797,
        10,
        resolution,
        (6, resolution, resolution),
    )
    for i in (0, 1, 500, 1796):
        image, moments, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, resolution, resolution)
        assert moments.dtype == torch.float32 and label.dtype == torch.int64 and label.shape == ()
        assert int(label) == digits.target[i]
        expect = np.clip(np.round(bilinear_oracle(digits.images[i] / 16.0, resolution) * 255), 0, 255)
        assert np.abs(image[0].numpy().astype(float) - expect).max() <= 1  # float32 vs float64 rounding ties
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        # x0 = (mean + std * eps) * 1.0 must give exactly the [-1, 1] pixels, for any eps.
        eps = torch.randn(3, resolution, resolution)
        x0 = moments[:3] + moments[3:] * eps
        assert torch.equal(x0, image.float() / 127.5 - 1)
        assert torch.equal(moments[3:], torch.zeros(3, resolution, resolution))
    assert 10 < ds.images.float().mean() < 128  # real strokes, not an empty canvas


def test_usable_in_a_dataloader():
    ds = DigitsDataset(resolution=16)
    image, moments, label = next(iter(torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)))
    assert image.shape == (64, 3, 16, 16) and moments.shape == (64, 6, 16, 16) and label.shape == (64,)
    assert len(set(label.tolist())) > 5


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"scikit-learn: pip install 'repa_fast\[demo\]'"):
        DigitsDataset()


def test_bad_resolution():
    with pytest.raises(DataError, match="resolution 4 is below the digits' native 8 px"):
        DigitsDataset(resolution=4)
