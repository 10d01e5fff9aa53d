"""The demo's self-supervised digits target (digits-ssl): dispatch, cache, shapes, and RNG neutrality."""

import os

import pytest
import torch

from repa_fast.models import digits_encoder as de
from repa_fast.models.encoders import load_encoders


@pytest.fixture
def quick_ssl(monkeypatch):
    real = de.train_ssl
    calls = []
    monkeypatch.setattr(de, "train_ssl", lambda: calls.append(1) or real(steps=3, batch=16))
    return calls


def test_digits_ssl_trains_once_caches_and_keeps_the_run_rng(tmp_path, quick_ssl):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    state = torch.get_rng_state()
    (enc,) = load_encoders("digits-ssl", resolution=16, checkpoint_dir=str(tmp_path), grid=8, pretrained=True)
    assert torch.equal(torch.get_rng_state(), state)  # training and init ran in a forked RNG
    assert os.path.isfile(tmp_path / de.FILE) and quick_ssl == [1]
    (again,) = load_encoders("digits-ssl", resolution=16, checkpoint_dir=str(tmp_path), grid=8, pretrained=True)
    assert quick_ssl == [1]  # loaded from the cache
    out = enc(images)
    assert out.shape == (5, 64, de.WIDTH) and enc.embed_dim == de.WIDTH and enc.grid == 8
    assert torch.equal(out, again(images))
    (rand,) = load_encoders("digits-ssl", resolution=16, grid=8, pretrained=False)
    assert not torch.allclose(rand(images), out)
    (coarse,) = load_encoders("digits-ssl", resolution=32, checkpoint_dir=str(tmp_path), grid=4)
    assert coarse(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 16, de.WIDTH)
    assert not any(p.requires_grad for p in enc.parameters())


def test_augmentation_gives_distinct_valid_views():
    torch.manual_seed(0)
    from repa_fast.data.demo import _load_digits, digits_to_uint8

    x = digits_to_uint8(_load_digits().images[:64], 16).float()
    g = torch.Generator().manual_seed(0)
    views = de._augment(x, g)
    assert views.shape == x.shape and not torch.equal(views, x) and views.min() >= 0
