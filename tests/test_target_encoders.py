"""MoCo v3 / MAE / I-JEPA / CLIP / DINO v1 target encoders (repa_fast.models: vit_encoders, vit_encoder_files and
weight_files).

Random weights are written in each official file layout (prefixes, extra keys, RCG's odd ViT-L names, OpenAI's
fp16 TorchScript archive) at reduced width/depth; the targets are compared with an explicit forward written here
from the reference's model files (not timm, which the implementation uses). Full-size layouts are checked on the
meta device.
"""

import dataclasses
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.models import encoders, weight_files
from repa_fast.models.encoders import load_encoders
from repa_fast.models.vit_encoder_files import check_state_dict, load_vit_encoder_weights
from repa_fast.models.vit_encoders import SPECS, TimmViTEncoder
from repa_fast.models.weight_files import to_timm_layout
from tests.conftest import assert_close

pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

# Written out from the reference (train.py preprocess_raw_image, timm IMAGENET_DEFAULT_*, CLIP_DEFAULT_*):
# name -> (mean, std, resize step, side fed to the network, patch, final norm, class token)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
EXPECTED = {
    "mocov3-vit-s": (*IMAGENET, "none", 256, 16, True, True),
    "mocov3-vit-b": (*IMAGENET, "none", 256, 16, True, True),
    "mocov3-vit-l": (*IMAGENET, "none", 256, 16, True, True),
    "mae-vit-l": (*IMAGENET, "none", 256, 16, False, True),
    "dinov1-vit-b": (*IMAGENET, "none", 256, 16, True, True),
    "jepa-vit-h": (*IMAGENET, "after_normalize", 224, 14, True, False),
    "clip-vit-L": (*CLIP, "before_normalize", 224, 14, False, True),
}
FULL = {  # name -> (width, depth, heads) of the released networks
    "mocov3-vit-s": (384, 12, 12),
    "mocov3-vit-b": (768, 12, 12),
    "mocov3-vit-l": (1024, 24, 16),
    "mae-vit-l": (1024, 24, 16),
    "dinov1-vit-b": (768, 12, 12),
    "jepa-vit-h": (1280, 32, 16),
    "clip-vit-L": (1024, 24, 16),
}
SMALL = {name: (32, 15 if name == "mocov3-vit-l" else 2, 4) for name in FULL}  # ViT-L keeps blocks 13/14


def _images(n=2, side=256):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Official layouts, written out per release (key names and shapes), filled with random or meta tensors.


def _t(shape, device, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype) * 0.2 if device != "meta" else torch.empty(shape, device="meta")


def _vit_keys(dim, depth, patch, tokens, cls=True, patch_bias=True) -> dict:
    """timm/DeiT-style names shared by MoCo v3, MAE, DINO v1 and I-JEPA (their own model files use them)."""
    keys = {"patch_embed.proj.weight": (dim, 3, patch, patch), "pos_embed": (1, tokens, dim)}
    keys |= {"patch_embed.proj.bias": (dim,)} if patch_bias else {}
    keys |= {"cls_token": (1, 1, dim)} if cls else {}
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim)}
        keys |= {b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)}
        keys |= {b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (4 * dim, dim)}
        keys |= {b + "mlp.fc1.bias": (4 * dim,), b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)}
    return keys | {"norm.weight": (dim,), "norm.bias": (dim,)}


def _fill(keys: dict, device) -> dict:
    sd = {k: _t(s, device) for k, s in keys.items()}
    for k in sd:  # LayerNorm gains near 1, as trained networks have
        if device != "meta" and ("norm" in k or "ln_" in k) and k.endswith("weight"):
            sd[k] = 1 + sd[k]
    return sd


def official(name: str, dim: int, depth: int, heads: int, device="cpu") -> dict:
    """The file's object as the release writes it (MoCo v3 / RCG, MAE, I-JEPA, DINO v1; CLIP as a plain dict)."""
    if name.startswith("mocov3"):
        base = _fill(_vit_keys(dim, depth, 16, 1 + 14 * 14), device)  # pre-trained at 224: 14x14 + cls
        renamed = {}
        for k, v in base.items():  # RCG's ViT-L naming bug, the inverse of reference utils.py:12-19
            if name == "mocov3-vit-l":
                k = k.replace("blocks.13.norm1.", "blocks.13.norm13.").replace(
                    "blocks.13.mlp.fc1.", "blocks.13.mlp.fc13."
                )
                k = k.replace("blocks.14.norm2.", "blocks.14.norm14.").replace(
                    "blocks.14.mlp.fc2.", "blocks.14.mlp.fc14."
                )
            renamed["module.base_encoder." + k] = v
        extra = {
            "module.base_encoder.head.0.weight": _t((64, dim), device),
            "module.base_encoder.head.1.weight": _t((64,), device),
        }
        extra |= {
            "module.momentum_encoder.cls_token": _t((1, 1, dim), device),
            "module.predictor.0.weight": _t((8, 64), device),
        }
        return {"epoch": 300, "arch": "vit", "state_dict": renamed | extra}
    if name == "mae-vit-l":
        return {"model": _fill(_vit_keys(dim, depth, 16, 1 + 14 * 14), device)}
    if name == "dinov1-vit-b":
        return _fill(_vit_keys(dim, depth, 16, 1 + 14 * 14), device)
    if name == "jepa-vit-h":
        enc = {"module." + k: v for k, v in _fill(_vit_keys(dim, depth, 14, 16 * 16, cls=False), device).items()}
        pred = {"module.predictor_embed.weight": _t((16, dim), device), "module.mask_token": _t((1, 1, 16), device)}
        return {"encoder": enc, "predictor": pred, "target_encoder": dict(enc), "epoch": 300, "lr": 1e-3}
    assert name == "clip-vit-L"
    keys = {"visual.class_embedding": (dim,), "visual.positional_embedding": (257, dim)}
    keys |= {"visual.conv1.weight": (dim, 3, 14, 14), "visual.ln_pre.weight": (dim,), "visual.ln_pre.bias": (dim,)}
    for i in range(depth):
        b = f"visual.transformer.resblocks.{i}."
        keys |= {b + "attn.in_proj_weight": (3 * dim, dim), b + "attn.in_proj_bias": (3 * dim,)}
        keys |= {b + "attn.out_proj.weight": (dim, dim), b + "attn.out_proj.bias": (dim,)}
        keys |= {b + "ln_1.weight": (dim,), b + "ln_1.bias": (dim,), b + "ln_2.weight": (dim,), b + "ln_2.bias": (dim,)}
        keys |= {b + "mlp.c_fc.weight": (4 * dim, dim), b + "mlp.c_fc.bias": (4 * dim,)}
        keys |= {b + "mlp.c_proj.weight": (dim, 4 * dim), b + "mlp.c_proj.bias": (dim,)}
    keys |= {"visual.ln_post.weight": (dim,), "visual.ln_post.bias": (dim,), "visual.proj": (dim, 24)}
    keys |= {"positional_embedding": (77, 16), "text_projection": (16, 24), "token_embedding.weight": (100, 16)}
    keys |= {
        "transformer.resblocks.0.attn.in_proj_weight": (48, 16),
        "ln_final.weight": (16,),
        "ln_final.bias": (16,),
        "logit_scale": (),
    }
    return _fill(keys, device)


# ----------------------------------------------------------------------------------------------------------------
# Explicit forwards written from the reference's model files


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _attn(h, wqkv, bqkv, wo, bo, heads):
    B, N, D = h.shape
    q, k, v = (h @ wqkv.T + bqkv).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
    a = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, N, D) @ wo.T + bo


def oracle_timm_style(sd: dict, x: torch.Tensor, heads: int, depth: int, cls: bool, final_norm: bool, key=str):
    """MoCo v3 / MAE / DINO v1 / I-JEPA ViT (reference models/*.py): patchify conv, [cls] + pos, pre-norm blocks
    with exact GELU, LN eps 1e-6; ``key`` maps a canonical name to the file's name."""
    g = lambda n: sd[key(n)]  # noqa: E731
    patch = g("patch_embed.proj.weight").shape[-1]
    x = F.conv2d(x, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    if cls:
        x = torch.cat([g("cls_token").expand(x.shape[0], -1, -1), x], 1)
    x = x + g("pos_embed")
    for i in range(depth):
        b = f"blocks.{i}."
        h = _ln(x, g(b + "norm1.weight"), g(b + "norm1.bias"), 1e-6)
        x = x + _attn(
            h,
            g(b + "attn.qkv.weight"),
            g(b + "attn.qkv.bias"),
            g(b + "attn.proj.weight"),
            g(b + "attn.proj.bias"),
            heads,
        )
        h = _ln(x, g(b + "norm2.weight"), g(b + "norm2.bias"), 1e-6)
        h = F.gelu(h @ g(b + "mlp.fc1.weight").T + g(b + "mlp.fc1.bias"))
        x = x + h @ g(b + "mlp.fc2.weight").T + g(b + "mlp.fc2.bias")
    if final_norm:
        x = _ln(x, g("norm.weight"), g("norm.bias"), 1e-6)
    return x[:, 1:] if cls else x


def oracle_clip(sd: dict, x: torch.Tensor, heads: int, depth: int):
    """REPA models/clip_vit.py UpdatedVisionTransformer: conv1 (no bias), class_embedding, positional_embedding,
    ln_pre, resblocks with nn.MultiheadAttention (L, N, D) and QuickGELU, LN eps 1e-5; CLS dropped, no ln_post."""
    s = {k: v.float() for k, v in sd.items()}
    v = lambda n: s["visual." + n]  # noqa: E731
    x = F.conv2d(x, v("conv1.weight"), stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([v("class_embedding").expand(x.shape[0], 1, -1), x], 1) + v("positional_embedding")
    x = _ln(x, v("ln_pre.weight"), v("ln_pre.bias"), 1e-5).permute(1, 0, 2)  # NLD -> LND
    D = x.shape[-1]
    for i in range(depth):
        b = f"transformer.resblocks.{i}."
        h = _ln(x, v(b + "ln_1.weight"), v(b + "ln_1.bias"), 1e-5)
        a, _ = F.multi_head_attention_forward(
            h, h, h, D, heads, v(b + "attn.in_proj_weight"), v(b + "attn.in_proj_bias"), None, None, False, 0.0,
            v(b + "attn.out_proj.weight"), v(b + "attn.out_proj.bias"), need_weights=False,
        )  # fmt: skip
        x = x + a
        h = _ln(x, v(b + "ln_2.weight"), v(b + "ln_2.bias"), 1e-5) @ v(b + "mlp.c_fc.weight").T + v(b + "mlp.c_fc.bias")
        x = x + (h * torch.sigmoid(1.702 * h)) @ v(b + "mlp.c_proj.weight").T + v(b + "mlp.c_proj.bias")
    return x.permute(1, 0, 2)[:, 1:]


def reference_preprocess(images, name):
    """Reference train.py preprocess_raw_image, step by step, with the constants written in EXPECTED."""
    mean, std, resize, side = EXPECTED[name][:4]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = images / 255.0
    if resize == "before_normalize":
        x = F.interpolate(x, 224, mode="bicubic")
    x = (x - m) / s
    if resize == "after_normalize":
        x = F.interpolate(x, 224, mode="bicubic")
    assert x.shape[-1] == side
    return x


def resample_14_to_16(pos):
    """The reference's timm resample_abs_pos_embed(pos, [16, 16]): bicubic, antialias, CLS position kept."""
    cls, grid = pos[:, :1], pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], 1)


def small_spec(name):
    dim, depth, heads = SMALL[name]
    spec = SPECS[name]
    return dataclasses.replace(spec, arch=dataclasses.replace(spec.arch, embed_dim=dim, depth=depth, num_heads=heads))


def oracle(name, obj, images):
    dim, depth, heads = SMALL[name]
    x = reference_preprocess(images, name)
    if name == "clip-vit-L":
        return oracle_clip(obj, x, heads, depth)
    if name.startswith("mocov3"):
        sd = dict(obj["state_dict"])
        sd["module.base_encoder.pos_embed"] = resample_14_to_16(sd["module.base_encoder.pos_embed"])
        renames = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13."}
        renames |= {"blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}

        def key(n):
            for new, old in renames.items():
                n = n.replace(new, old) if name == "mocov3-vit-l" else n
            return "module.base_encoder." + n

        return oracle_timm_style(sd, x, heads, depth, cls=True, final_norm=True, key=key)
    if name == "jepa-vit-h":
        return oracle_timm_style(
            obj["encoder"], x, heads, depth, cls=False, final_norm=True, key=lambda n: "module." + n
        )
    sd = dict(obj["model"] if name == "mae-vit-l" else obj)
    sd["pos_embed"] = resample_14_to_16(sd["pos_embed"])
    return oracle_timm_style(sd, x, heads, depth, cls=True, final_norm=name != "mae-vit-l")


# ----------------------------------------------------------------------------------------------------------------
# CLIP's OpenAI file: an fp16 TorchScript archive with the OpenAI module tree


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.mlp(self.ln_2(x + self.attn(self.ln_1(x), x, x, need_weights=False)[0]))


class _Transformer(nn.Module):
    def __init__(self, d, depth, h):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(d, h) for _ in range(depth)])

    def forward(self, x):
        return self.resblocks(x)


class _Visual(nn.Module):
    def __init__(self, d, depth, h):
        super().__init__()
        self.conv1 = nn.Conv2d(3, d, 14, 14, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(257, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = _Transformer(d, depth, h)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Parameter(torch.zeros(d, 24))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1) + self.positional_embedding[1:, None]
        return self.ln_post(self.transformer(self.ln_pre(x)))[0] @ self.proj


class _CLIP(nn.Module):
    def __init__(self, d, depth, h):
        super().__init__()
        self.visual = _Visual(d, depth, h)
        self.positional_embedding = nn.Parameter(torch.zeros(77, 16))
        self.text_projection = nn.Parameter(torch.zeros(16, 24))
        self.token_embedding = nn.Embedding(100, 16)
        self.transformer = nn.Module()
        self.ln_final = nn.LayerNorm(16)
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("input_resolution", torch.tensor(224))

    def forward(self, x):
        return self.visual(x) * self.logit_scale


def write_openai_clip(path, obj, dim, depth, heads):
    model = _CLIP(dim, depth, heads)
    wanted = {k: v for k, v in obj.items() if k in model.state_dict()}
    missing = set(model.state_dict()) - set(wanted) - {"input_resolution"}
    assert not missing, missing
    model.load_state_dict(wanted | {"input_resolution": model.input_resolution}, strict=True)
    torch.jit.save(torch.jit.script(model.half()), str(path))  # OpenAI's file: fp16 TorchScript (convert_weights)
    return {k: v for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", sorted(SPECS))
def test_preprocessing_constants_and_steps(name):
    mean, std, resize, side, patch, final_norm, cls = EXPECTED[name]
    spec = SPECS[name]
    assert (spec.mean, spec.std, spec.resize, spec.input_size, spec.patch_size) == (mean, std, resize, side, patch)
    assert (spec.final_norm, spec.class_token) == (final_norm, cls)
    assert (spec.embed_dim, spec.depth, spec.num_heads) == FULL[name]
    model = TimmViTEncoder(small_spec(name))
    images = _images()
    assert_close(model.preprocess(images), reference_preprocess(images, name).double())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_official_layout_loads_and_targets_match_explicit_forward(name, tmp_path):
    dim, depth, heads = SMALL[name]
    obj = official(name, dim, depth, heads)
    path = tmp_path / SPECS[name].files[0]
    if name == "clip-vit-L":
        obj = write_openai_clip(path, obj, dim, depth, heads)  # the fp16 values the archive holds
    else:
        torch.save(obj, path)
    model = load_vit_encoder_weights(TimmViTEncoder(small_spec(name), attn_backend="sdpa"), path)
    images = _images()
    with torch.no_grad():
        got, want = model(images), oracle(name, obj, images)
    assert got.shape == (2, 256, dim)
    assert_close(got, want.double(), kind="reduction")
    model.set_attn_backend("math")  # the explicit-softmax backend gives the same targets
    assert_close(model(images), want.double(), kind="reduction")


def test_timm_layouts_give_the_same_targets(tmp_path):
    from safetensors.torch import save_file

    images = _images()
    # MAE: timm's vit_large_patch16_224.mae holds the same keys without the "model" wrapper
    dim, depth, heads = SMALL["mae-vit-l"]
    obj = official("mae-vit-l", dim, depth, heads)
    save_file(obj["model"], str(tmp_path / "mae.safetensors"))
    mae = load_vit_encoder_weights(TimmViTEncoder(small_spec("mae-vit-l")), tmp_path / "mae.safetensors")
    assert_close(mae(images), oracle("mae-vit-l", obj, images).double(), kind="reduction")
    # CLIP: timm's vit_large_patch14_clip_224.openai names (written out here), with its projection head
    dim, depth, heads = SMALL["clip-vit-L"]
    obj = official("clip-vit-L", dim, depth, heads)
    sd = {
        "cls_token": obj["visual.class_embedding"].reshape(1, 1, -1),
        "pos_embed": obj["visual.positional_embedding"][None],
    }
    sd |= {"patch_embed.proj.weight": obj["visual.conv1.weight"], "head.weight": obj["visual.proj"].T.contiguous()}
    sd |= {
        "head.bias": torch.zeros(24),
        "norm_pre.weight": obj["visual.ln_pre.weight"],
        "norm_pre.bias": obj["visual.ln_pre.bias"],
    }
    sd |= {"norm.weight": obj["visual.ln_post.weight"], "norm.bias": obj["visual.ln_post.bias"]}
    names = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.in_proj_weight": "attn.qkv.weight",
        "attn.in_proj_bias": "attn.qkv.bias",
    }
    names |= {"attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for k, v in obj.items():
        if k.startswith("visual.transformer.resblocks."):
            k = "blocks." + k[len("visual.transformer.resblocks.") :]
            for old, new in names.items():
                k = k.replace(old, new)
            sd[k] = v
    save_file(sd, str(tmp_path / "clip.safetensors"))
    clip = load_vit_encoder_weights(TimmViTEncoder(small_spec("clip-vit-L")), tmp_path / "clip.safetensors")
    assert_close(clip(images), oracle("clip-vit-L", obj, images).double(), kind="reduction")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_full_size_official_layout_matches_on_meta(name):
    dim, depth, heads = FULL[name]
    obj = official(name, dim, depth, heads, device="meta")
    with torch.device("meta"):
        model = TimmViTEncoder(SPECS[name])
        sd = to_timm_layout(SPECS[name], obj)
        check_state_dict(model, sd, name)  # raises on any key / shape disagreement
        out = model(_images(1).to("meta"))
    assert tuple(out.shape) == (1, 256, dim)  # 256 target tokens at 256 px
    assert sd["pos_embed"].shape[1] == 256 + SPECS[name].class_token


def test_wrong_architecture_names_keys_and_shapes():
    obj = official("mocov3-vit-b", *FULL["mocov3-vit-b"], device="meta")
    with torch.device("meta"):
        model = TimmViTEncoder(SPECS["mocov3-vit-l"])
        with pytest.raises(
            ValueError,
            match=r"mocov3-vit-l.*missing keys \['blocks\.12\..*shape mismatches.*\(768,\) vs model \(1024,\)",
        ):
            check_state_dict(model, to_timm_layout(SPECS["mocov3-vit-l"], obj), "mocov3_vitl.pth")
    # Forgetting the RCG renames would leave these exact keys unexpected.
    obj = official("mocov3-vit-l", *SMALL["mocov3-vit-l"])
    obj["state_dict"] = {
        k.replace("module.base_encoder.", "module.base_encoder.x."): v for k, v in obj["state_dict"].items()
    }
    with pytest.raises(ValueError, match="missing keys"):
        load_vit_encoder_weights(TimmViTEncoder(small_spec("mocov3-vit-l")), obj)


def test_missing_file_names_file_places_and_download_page(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(weight_files, "CLIP_CACHE", tmp_path / "clipcache")
    for name, file, page in [
        ("mocov3-vit-l", "mocov3_vitl.pth", "https://github.com/LTH14/rcg"),
        ("jepa-vit-h", "ijepa_vith.pth", "https://github.com/facebookresearch/ijepa"),
        ("clip-vit-L", "ViT-L-14.pt", "https://github.com/openai/CLIP"),
    ]:
        with pytest.raises(FileNotFoundError) as e:
            load_encoders(name, checkpoint_dir=tmp_path / "mine")
        msg = str(e.value)
        assert file in msg and page in msg and str(tmp_path / "mine" / file) in msg and f"ckpts/{file}" in msg
    assert str(tmp_path / "clipcache" / "ViT-L-14.pt") in msg


def test_found_in_reference_places_and_frozen(tmp_path, monkeypatch):
    """./ckpts/<reference file>, --encoder-checkpoint-dir and ~/.cache/clip, through load_encoders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(weight_files, "CLIP_CACHE", tmp_path / "clipcache")
    for name in ("mocov3-vit-b", "clip-vit-L"):
        monkeypatch.setitem(SPECS, name, small_spec(name))
    (tmp_path / "ckpts").mkdir()
    obj = official("mocov3-vit-b", *SMALL["mocov3-vit-b"])
    torch.save(obj, tmp_path / "ckpts" / "mocov3_vitb.pth")
    (tmp_path / "clipcache").mkdir()
    clip_sd = write_openai_clip(
        tmp_path / "clipcache" / "ViT-L-14.pt", official("clip-vit-L", *SMALL["clip-vit-L"]), *SMALL["clip-vit-L"]
    )
    moco, clip = load_encoders("mocov3-vit-b,clip-vit-L")
    images = _images()
    assert_close(moco(images), oracle("mocov3-vit-b", obj, images).double(), kind="reduction")
    assert_close(clip(images), oracle("clip-vit-L", clip_sd, images).double(), kind="reduction")
    for enc in (moco, clip):
        assert not enc.training and not any(p.requires_grad for p in enc.parameters()) and enc.grid == 16
    assert encoders.find_checkpoint("mocov3-vit-b") == __import__("pathlib").Path("ckpts/mocov3_vitb.pth")
    other = tmp_path / "elsewhere"
    other.mkdir()
    torch.save(obj, other / "mocov3_vitb.pth")
    assert encoders.find_checkpoint("mocov3-vit-b", other) == other / "mocov3_vitb.pth"


def test_refuses_512_and_other_grids():
    with pytest.raises(ValueError, match="256x256 images only.*DINOv2"):
        load_encoders("dinov2-vit-t,mocov3-vit-b", resolution=512, pretrained=False)
    with pytest.raises(ValueError, match="fixed 16x16 token grid"):
        TimmViTEncoder(small_spec("clip-vit-L"), grid=8)


def test_missing_timm_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"pip install 'repa_fast\[encoders\]'"):
        TimmViTEncoder(small_spec("mae-vit-l"))


def test_two_encoders_loss_is_the_mean_of_single_encoder_losses(monkeypatch):
    from repa_fast.models.sit import SiT
    from repa_fast.objective import training_loss

    monkeypatch.setitem(SPECS, "mocov3-vit-b", small_spec("mocov3-vit-b"))
    encs = load_encoders("dinov2-vit-t,mocov3-vit-b", pretrained=False)
    images = _images()
    targets = [e(images) for e in encs]
    assert [t.shape for t in targets] == [(2, 256, 192), (2, 256, 32)]  # z_dims in --enc-type order
    sit = SiT(input_size=32, patch_size=2, hidden_size=64, depth=2, num_heads=2, encoder_depth=1, num_classes=10,
              z_dims=[e.embed_dim for e in encs], projector_dim=48, impl="ref")  # fmt: skip
    x0, y = torch.randn(2, 4, 32, 32), torch.randint(0, 10, (2,))
    t, noise = torch.rand(2), torch.randn(2, 4, 32, 32)
    both = training_loss(sit, x0, y, targets, t=t, noise=noise, impl="ref")
    singles = []
    for k in range(2):
        one = SiT(input_size=32, patch_size=2, hidden_size=64, depth=2, num_heads=2, encoder_depth=1, num_classes=10,
                  z_dims=[encs[k].embed_dim], projector_dim=48, impl="ref")  # fmt: skip
        sd = {n: v for n, v in sit.state_dict().items() if not n.startswith("projectors.")}
        sd |= {
            n.replace(f"projectors.{k}.", "projectors.0."): v
            for n, v in sit.state_dict().items()
            if n.startswith(f"projectors.{k}.")
        }
        one.load_state_dict(sd)
        singles.append(training_loss(one, x0, y, [targets[k]], t=t, noise=noise, impl="ref"))
    mean_align = (singles[0]["alignment"] + singles[1]["alignment"]) / 2
    assert not torch.isclose(singles[0]["alignment"], singles[1]["alignment"])
    torch.testing.assert_close(both["alignment"], mean_align, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both["loss"], singles[0]["denoising"] + 0.5 * mean_align, rtol=1e-6, atol=1e-6)
    both["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sit.projectors.parameters() if p.ndim == 2)


@pytest.mark.parametrize("name", ["mocov3-vit-b", "jepa-vit-h", "clip-vit-L"])
def test_flops_match_counter(name, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from repa_fast.flops import encoder_forward_flops

    monkeypatch.setitem(SPECS, name, small_spec(name))
    model = TimmViTEncoder(SPECS[name], attn_backend="math")  # explicit matmuls: visible to the counter
    with FlopCounterMode(display=False) as counter:
        model(_images(2))
    assert counter.get_total_flops() == 2 * encoder_forward_flops(SPECS[name].arch, 16)


def test_dino_training_checkpoint_and_jepa_timm_layout(tmp_path):
    """DINO's full checkpoint (``teacher`` with ``module.backbone.`` and a head) and I-JEPA in timm's names."""
    images = _images()
    flat = official("dinov1-vit-b", *SMALL["dinov1-vit-b"])
    teacher = {"module.backbone." + k: v for k, v in flat.items()} | {"module.head.mlp.0.weight": torch.randn(8, 32)}
    torch.save({"teacher": teacher, "student": {}, "epoch": 100}, tmp_path / "checkpoint.pth")
    dino = load_vit_encoder_weights(TimmViTEncoder(small_spec("dinov1-vit-b")), tmp_path / "checkpoint.pth")
    assert_close(dino(images), oracle("dinov1-vit-b", flat, images).double(), kind="reduction")
    obj = official("jepa-vit-h", *SMALL["jepa-vit-h"])
    timm_sd = {k.removeprefix("module."): v for k, v in obj["encoder"].items()}
    jepa = load_vit_encoder_weights(TimmViTEncoder(small_spec("jepa-vit-h")), timm_sd)
    assert_close(jepa(images), oracle("jepa-vit-h", obj, images).double(), kind="reduction")


def test_timm_and_hf_cache_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snap = tmp_path / "hf" / "models--timm--vit_large_patch16_224.mae" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    assert encoders.find_checkpoint("mae-vit-l") == snap / "model.safetensors"
    mine = tmp_path / "mine" / "vit_base_patch16_224.dino"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_bytes(b"x")
    assert encoders.find_checkpoint("dinov1-vit-b", tmp_path / "mine") == mine / "model.safetensors"
    (tmp_path / "mine" / "dinov1_vitb.pth").write_bytes(b"x")  # the reference's name comes first
    assert encoders.find_checkpoint("dinov1-vit-b", tmp_path / "mine") == tmp_path / "mine" / "dinov1_vitb.pth"
