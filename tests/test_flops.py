"""The analytic FLOP model equals torch's FlopCounterMode on real modules, and gives the known XL figure.

Modules use the explicit-softmax attention here: the counter does not see the CPU flash-attention kernel of SDPA.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from repa_fast.flops import encoder_forward_flops, projector_flops, repa_step_flops, sit_forward_flops
from repa_fast.models.encoder_archs import ENCODER_ARCHS
from repa_fast.models.encoders import load_encoders
from repa_fast.models.sit import SiT_models


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_sit_and_projector_flops_match_counter():
    model = SiT_models["SiT-S/2"](
        input_size=16, z_dims=[32, 48], encoder_depth=2, depth=3, projector_dim=64, fused_attn=False
    )
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randint(0, 1000, (2,))
    counted = _count(lambda: model(x, t, y))
    expected = 2 * (sit_forward_flops(3, 384, 64, 2) + projector_flops(64, 384, 64, [32, 48]))
    assert counted == expected
    counted_no_proj = _count(lambda: model(x, t, y, return_zs=False))
    assert counted_no_proj == 2 * sit_forward_flops(3, 384, 64, 2)


def test_sit_backward_is_twice_forward():
    model = SiT_models["SiT-S/2"](input_size=16, z_dims=[], depth=2, fused_attn=False)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randint(0, 1000, (2,))
    out = model(x, t, y)[0]
    counted_bwd = _count(lambda: out.sum().backward())
    # The input of the patch conv needs no gradient: its data-gradient conv is skipped.
    fwd = sit_forward_flops(2, 384, 64, 2)
    patch_in = 2 * 64 * 16 * 384
    assert abs(counted_bwd - 2 * 2 * fwd + 2 * patch_in) / (2 * 2 * fwd) < 0.02


def test_dinov2_flops_match_counter():
    enc = load_encoders("dinov2-vit-t", resolution=64, pretrained=False, attn_backend="math")[0]
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    counted = _count(lambda: enc(img))
    assert counted == 2 * encoder_forward_flops(ENCODER_ARCHS["dinov2-vit-t"], 4)


def test_xl_repa_step_is_about_771_gflop_per_image():
    f = repa_step_flops(28, 1152, 256, 2, z_dims=(768,), encoders=("dinov2-vit-b",), encoder_grid=16)
    assert abs(f.sit_forward / 1e9 - 236.9) < 0.5
    assert abs(f.train_step / 1e9 - 771) < 3  # 771 GFLOP/img: SiT-XL/2 + DINOv2-B, README §Performance


def test_cached_targets_save_the_encoder_forward():
    # SiT-XL/2 and SiT-B/2 at 256 px (16x16 tokens) with DINOv2-B: the 6% and 23% the target cache saves.
    xl, b = repa_step_flops(28, 1152, 256, 2), repa_step_flops(12, 768, 256, 2)
    assert xl.train_step - xl.train_step_cached_targets == xl.encoder_forward > 0
    assert round(xl.encoder_share, 3) == 0.060 and round(b.encoder_share, 3) == 0.237


def test_reg_and_irepa_projector_flops_match_counter():
    """REG's class token (1 + T tokens in the blocks and projectors, cls_projectors2, linear_cls) and iREPA's linear
    and conv projectors, against the counter on the real modules."""
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randint(0, 1000, (2,))
    cases = [
        dict(reg=True),
        dict(projection_layer_type="linear"),
        dict(projection_layer_type="conv", proj_kernel_size=3),
    ]
    for kw in cases:
        model = SiT_models["SiT-S/2"](
            input_size=16, z_dims=[32], encoder_depth=2, depth=3, projector_dim=64, fused_attn=False, **kw
        )
        reg = kw.get("reg", False)
        extra = dict(cls_token=torch.randn(2, 32)) if reg else {}
        counted = _count(lambda m=model, e=extra: m(x, t, y, **e))
        kind, k = kw.get("projection_layer_type", "mlp"), kw.get("proj_kernel_size", 3)
        sit = sit_forward_flops(3, 384, 64, 2, cls_dim=32 if reg else None)
        assert counted == 2 * (sit + projector_flops(64 + reg, 384, 64, [32], kind, k)), kw
        step = repa_step_flops(3, 384, 64, 2, (32,), 64, (), reg=reg, projection_layer_type=kind, proj_kernel_size=k)
        assert 2 * (step.sit_forward + step.projector_forward) == counted, kw
    plain = repa_step_flops(28, 1152, 256, 2)
    assert repa_step_flops(28, 1152, 256, 2, reg=True).train_step > plain.train_step  # 257 tokens
