"""One name per switch and one source per fact: the config boundary maps the user-facing names once, model names are
parsed by one function, encoder shapes come from one table."""

from dataclasses import replace

import pytest
import torch

from repa_fast.build import encoder_kwargs, model_kwargs
from repa_fast.config import ModelConfig
from repa_fast.flops import encoder_forward_flops
from repa_fast.models.dinov2 import DINOv2ViT, dinov2_arch
from repa_fast.models.encoder_archs import ENCODER_ARCHS, encoder_arch
from repa_fast.models.sit import SIT_SIZES, SiT, SiT_models, build_sit, parse_model_name


@pytest.mark.parametrize("kernels", ["auto", "triton", "ref"])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_config_names_map_once_to_the_model_switches(kernels, fused_attn):
    m = ModelConfig(model="SiT-T/2", kernels=kernels, fused_attn=fused_attn, qk_norm=True, encoder_depth=2)
    kw = model_kwargs(m)
    assert kw["impl"] == kernels and "kernels" not in kw
    model = build_sit(m.model, input_size=8, z_dims=[16], **kw)
    backend = "auto" if fused_attn else "math"
    assert model.impl == kernels and model.attn_backend == backend
    assert {b.impl for b in model.blocks} == {kernels} and model.final_layer.impl == kernels
    assert {(b.attn.impl, b.attn.attn_backend) for b in model.blocks} == {(kernels, backend)}
    assert encoder_kwargs(m) == {"attn_backend": "sdpa" if kernels == "ref" else "auto"}


def test_sit_switches_are_checked():
    with pytest.raises(ValueError, match="impl must be one of"):
        SiT(input_size=8, depth=1, hidden_size=64, num_heads=2, z_dims=[], impl="fast")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        SiT(input_size=8, depth=1, hidden_size=64, num_heads=2, z_dims=[], attn_backend="cudnn")
    with pytest.raises(ValueError, match="contradicts attn_backend='flash'"):
        SiT(input_size=8, depth=1, hidden_size=64, num_heads=2, z_dims=[], fused_attn=False, attn_backend="flash")
    with pytest.raises(TypeError, match="kernels"):  # the old name is gone, not silently ignored
        SiT(input_size=8, depth=1, hidden_size=64, num_heads=2, z_dims=[], kernels="ref")


def test_fused_attn_false_equals_math_backend():
    torch.manual_seed(0)
    a = SiT_models["SiT-T/2"](input_size=8, depth=2, z_dims=[], fused_attn=False).eval()
    b = SiT_models["SiT-T/2"](input_size=8, depth=2, z_dims=[], attn_backend="math").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 1000, (2,))
    assert torch.equal(a(x, t, y)[0], b(x, t, y)[0])


def test_parse_model_name_covers_every_model_and_rejects_others():
    for name in SiT_models:
        size, patch = parse_model_name(name)
        assert f"SiT-{size}/{patch}" == name and size in SIT_SIZES and patch in (2, 4, 8)
    assert parse_model_name("SiT-XL/2") == ("XL", 2)
    for bad in ("SiT-XL/3", "sit-xl/2", "DiT-XL/2", "SiT-XL"):
        with pytest.raises(ValueError, match="unknown model"):
            parse_model_name(bad)


def test_encoder_table_is_the_encoders_shape():
    for name in ("dinov2-vit-t", "dinov2reg-vit-t"):
        arch = encoder_arch(name)
        enc = DINOv2ViT(arch, resolution=32, grid=2)
        assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (
            arch.embed_dim,
            arch.depth,
            arch.num_heads,
        )
        assert enc.num_register_tokens == arch.num_register_tokens == (4 if "reg" in name else 0)
        assert enc.patch_embed.proj.kernel_size == (arch.patch_size,) * 2
        assert enc.blocks[0].mlp.fc1.out_features == arch.ffn_hidden
    assert dinov2_arch("b", True) is ENCODER_ARCHS["dinov2reg-vit-b"]
    assert ENCODER_ARCHS["dinov2-vit-g"].ffn_hidden == 4096  # the official SwiGLUFFNFused sizing
    assert {ENCODER_ARCHS[f"dinov2-vit-{s}"].embed_dim for s in "sblg"} == {384, 768, 1024, 1536}
    with pytest.raises(ValueError, match="unknown encoder"):
        encoder_arch("dinov3-vit-b")


def test_swiglu_encoder_flops_count_w12_and_w3():
    arch = encoder_arch("dinov2-vit-g")
    mlp_like = replace(arch, ffn="mlp")  # fc1/fc2 at 4x width
    tokens, dim, h = 16 * 16 + 1, arch.embed_dim, arch.ffn_hidden
    delta = arch.depth * 2 * tokens * (3 * dim * h - 2 * dim * 4 * dim)
    assert encoder_forward_flops(arch, 16) - encoder_forward_flops(mlp_like, 16) == delta
