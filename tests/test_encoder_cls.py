"""The class token every target encoder gives REG (``forward(images, with_cls=True) -> (patch tokens, class token)``,
docs/methods.md §REG), without changing the patch-token targets of ``forward(images)``."""

import dataclasses

import pytest
import torch

from repa_fast.models.digits_encoder import DigitsEncoder
from repa_fast.models.dinov2 import DINOv2ViT, dinov2_arch
from repa_fast.models.vit_encoders import SPECS, TimmViTEncoder


def _images(b, r, seed=0):
    return torch.randint(0, 256, (b, 3, r, r), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_class_token_is_x_norm_clstoken(registers):
    """REG's target: DINOv2's class token after the final LayerNorm (REG train.py:305-307), registers excluded."""
    torch.manual_seed(0)
    enc = DINOv2ViT(dinov2_arch("t", registers), resolution=32, grid=2).eval()
    images = _images(2, 32)
    patch, cls = enc(images, with_cls=True)
    assert torch.equal(patch, enc(images))  # the patch targets are unchanged
    x = enc.prepare_tokens(enc.preprocess(images))
    for blk in enc.blocks:
        x = blk(x)
    expected = torch.nn.functional.layer_norm(x[:, 0], (192,), enc.norm.weight, enc.norm.bias, eps=1e-6)
    torch.testing.assert_close(cls, expected, rtol=1e-6, atol=1e-6)
    assert cls.shape == (2, 192) and not cls.requires_grad
    assert (cls - x[:, 1 if registers else 0]).abs().max() > 0.1  # normed, and the class token, not a register


@pytest.mark.parametrize("grid", [8, 4])
def test_digits_class_token_is_the_pooled_simclr_feature(grid):
    torch.manual_seed(0)
    enc = DigitsEncoder(16, grid=grid).eval()
    images = _images(3, 16)
    patch, cls = enc(images, with_cls=True)
    assert torch.equal(patch, enc(images)) and patch.shape == (3, grid * grid, 64)
    native = DigitsEncoder(16, grid=8)
    native.load_state_dict(enc.state_dict())
    torch.testing.assert_close(cls, native.tokens(images).mean(1))  # what SimCLR's head read (train_ssl)
    if grid != 8:  # not the mean of the pooled targets: the representation does not depend on the target grid
        assert (cls - patch.mean(1)).abs().max() > 1e-4


def _small(name, **arch):
    spec = SPECS[name]
    return dataclasses.replace(spec, arch=dataclasses.replace(spec.arch, embed_dim=64, depth=2, num_heads=2, **arch))


@pytest.mark.parametrize("name", ["mocov3-vit-s", "mae-vit-l", "clip-vit-L", "jepa-vit-h"])
def test_timm_encoders_class_token(name):
    """The class token of the layer (and norm) the patch targets come from; I-JEPA (no class token): their mean."""
    torch.manual_seed(0)
    enc = TimmViTEncoder(_small(name), attn_backend="math").eval()
    images = _images(1, 256)
    patch, cls = enc(images, with_cls=True)
    assert torch.equal(patch, enc(images)) and cls.shape == (1, 64)
    if name == "jepa-vit-h":
        torch.testing.assert_close(cls, patch.mean(1))
        return
    vit = enc.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(enc.preprocess(images))))
    for blk in vit.blocks:
        x = blk(x)
    x = vit.norm(x) if enc.spec.final_norm else x
    torch.testing.assert_close(cls, x[:, 0])
    torch.testing.assert_close(patch, x[:, 1:])
