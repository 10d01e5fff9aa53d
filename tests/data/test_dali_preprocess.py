"""preprocess --decoder dali (DALI's CPU decoder here): the trainer's layout, close to the PIL path's ADM crop."""

import numpy as np
import pytest
import torch

from repa_fast.data import DataError, RefFolderDataset, open_dataset
from repa_fast.data.dali_loader import adm_crop_batches
from repa_fast.data.transforms import adm_center_crop, adm_crop_geometry
from repa_fast.tools.preprocess import PreprocessConfig, preprocess

from .helpers import make_jpeg_folder, make_tiny_vae

pytest.importorskip("nvidia.dali")

# Bounds README states for the DALI crop vs PIL on these smooth JPEGs (32 px outputs, 0 to 2 BOX halvings), in
# uint8 levels: mean over all pixels, max, and per image the mean without / with BOX halvings (odd sides).
MEAN_BOUND, MAX_BOUND, UNHALVED_BOUND, HALVED_BOUND = 1.5, 24, 0.75, 4.0
SIZES = [(33, 40), (50, 37), (64, 64), (65, 97), (100, 71), (131, 64), (70, 150), (96, 128), (45, 45), (140, 99)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dalipp")
    make_tiny_vae(str(root / "vae"))  # 32 px -> (8, 4, 4) moments
    make_jpeg_folder(str(root / "src"), {"a": SIZES, "b": SIZES[::-1]}, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = dict(source=str(root / "src"), vae=str(root / "vae"), resolution=32, batch_size=8, shard_size=8)
    out = {}
    for decoder in ("pil", "dali"):
        cfg = PreprocessConfig(dest=str(root / decoder), decoder=decoder, loader_workers=0, progress=False, **base)
        out[decoder] = preprocess(cfg)
    torch.set_num_threads(threads)  # other modules' tests keep the default
    return root, out


def test_dali_preprocessing_writes_the_layout_the_trainer_reads_close_to_pil(env):
    _, out = env
    pil, dali = (open_dataset(out[k], num_classes=2) for k in ("pil", "dali"))
    assert isinstance(dali, RefFolderDataset) and len(dali) == len(pil) == 20
    assert dali.resolution == 32 and dali.latent_shape == (8, 4, 4)
    assert (dali.labels == pil.labels).all()
    img_d = torch.stack([dali[i][0] for i in range(20)]).int()
    img_p = torch.stack([pil[i][0] for i in range(20)]).int()
    delta = (img_d - img_p).abs().float()
    assert 0 < delta.mean() <= MEAN_BOUND and delta.max() <= MAX_BOUND
    mom_d = torch.stack([dali[i][1] for i in range(20)])
    mom_p = torch.stack([pil[i][1] for i in range(20)])
    assert torch.isfinite(mom_d).all()
    mean_d, mean_p = mom_d[:, :4], mom_p[:, :4]  # the posterior means' moments agree to a fraction of their std
    assert (mean_d.mean() - mean_p.mean()).abs() < 0.05 * mean_p.std()
    assert (mean_d.std() / mean_p.std() - 1).abs() < 0.05


def test_geometry_matches_pil_and_unhalved_crops_are_close(env):
    root, _ = env
    paths = sorted(str(p) for p in (root / "src" / "a").iterdir())
    batches = [list(range(5)), list(range(5, len(paths)))]
    got = [
        b
        for _, b in sorted(
            (int(i), im) for idx, ims in adm_crop_batches(paths, batches, 32, "cpu") for i, im in zip(idx, ims)
        )
    ]
    import PIL.Image

    for path, image in zip(paths, got):
        with PIL.Image.open(path) as im:
            want = adm_center_crop(im, 32).transpose(2, 0, 1)
            halvings, resized, _ = adm_crop_geometry(*im.size, 32)
        assert min(resized) == 32 and tuple(image.shape) == (3, 32, 32)
        delta = np.abs(image.numpy().astype(int) - want).mean()
        assert delta <= (HALVED_BOUND if halvings else UNHALVED_BOUND)


def test_corrupt_jpeg_is_named(env, tmp_path):
    root, _ = env
    paths = sorted(str(p) for p in (root / "src" / "a").iterdir())[:4]
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(open(paths[2], "rb").read()[:200])
    paths[2] = str(bad)
    with pytest.raises(DataError, match="bad.JPEG"):
        list(adm_crop_batches(paths, [[0, 1], [2, 3]], 32, "cpu"))


def test_cli_decoder_flag_and_no_mixing_with_a_pil_dataset(env, capsys):
    from repa_fast.tools import preprocess as pp

    root, out = env
    argv = ["--source", str(root / "src"), "--vae", str(root / "vae"), "--resolution", "32", "--batch-size", "8"]
    argv += ["--shard-size", "8", "--loader-workers", "0", "--no-progress"]
    assert pp.main([*argv, "--dest", out["dali"], "--decoder", "dali"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert pp.main([*argv, "--dest", out["dali"]]) == 2  # the PIL decoder would not reproduce these pixels
    assert "made with different decoder" in capsys.readouterr().err
