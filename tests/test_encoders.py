"""DINOv2 target encoders (docs/objective.md §Alignment targets): weight layouts, pos-embed resampling,
preprocessing, timm parity.

Weight files are written here with random values in the official torch.hub layout (mask_token, 1370-token
pos_embed, register_tokens) and in timm's Hugging Face layout, so no download is needed. Every parameter is
randomised at O(1) scale (LayerScale gammas included: the hub init of 1e-5 would hide block bugs).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from repa_fast.build import encoder_kwargs
from repa_fast.config import ModelConfig
from repa_fast.models import dinov2 as dinov2_mod
from repa_fast.models.dinov2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRETRAINED_GRID,
    DINOv2ViT,
    dinov2_arch,
    resample_pos_embed,
)
from repa_fast.models.encoder_archs import EncoderArch
from repa_fast.models.encoders import load_dinov2_weights, load_encoders
from repa_fast.models.weight_files import dinov2_candidate_paths as candidate_paths
from repa_fast.models.weight_files import hub_filename, timm_model_name
from tests.conftest import assert_close


def _randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # LayerScale in [0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim >= 2 and "token" not in name and name != "pos_embed":  # Linear / conv weights
                p.copy_(r / math.sqrt(p[0].numel()))
            else:  # cls/register tokens, pos_embed
                p.copy_(0.5 * r)
    return model


def hub_state_dict(arch: EncoderArch, seed: int = 0) -> dict:
    """Random weights in the official hub layout: 37x37 (+1 class) positions, mask_token, register_tokens."""
    model = _randomize_(DINOv2ViT(arch, resolution=518, grid=PRETRAINED_GRID), seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.randn(1, arch.embed_dim)
    return sd


def timm_layout(hub_sd: dict) -> dict:
    """What timm's HF model.safetensors holds (timm _convert_dinov2, written out by hand here)."""
    sd = {k: v.clone() for k, v in hub_sd.items() if k != "mask_token"}
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, 0]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return {k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2."): v for k, v in sd.items()}


def _images(b: int, r: int = 256) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """ViT-S/14 and ViT-S/14-reg4 random weights as hub .pth files and as timm safetensors (HF cache layout)."""
    root = tmp_path_factory.mktemp("dinov2")
    out = {}
    for reg in (False, True):
        sd = hub_state_dict(dinov2_arch("s", reg), seed=1 + reg)
        hub = root / "hub" / hub_filename("s", reg)
        hub.parent.mkdir(exist_ok=True)
        torch.save(sd, hub)
        hf = root / "hf" / f"models--timm--{timm_model_name('s', reg)}" / "snapshots" / "0123abc" / "model.safetensors"
        hf.parent.mkdir(parents=True)
        save_file(timm_layout(sd), str(hf))
        out[reg] = dict(sd=sd, hub=hub, hf=hf, hf_root=root / "hf")
    return out


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch.hub and Hugging Face caches at empty folders so no real cache is consulted."""
    hub_dir = tmp_path / "torchhub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hfcache"))
    return tmp_path


# ----------------------------------------------------------------------------------------------------------------
# position embedding and preprocessing


@pytest.mark.parametrize("old,new,prefix", [(37, 16, 1), (37, 32, 1), (37, 16, 0), (37, 8, 1), (7, 12, 1), (16, 16, 1)])
def test_pos_embed_resample_matches_timm(old, new, prefix):
    timm_pos = pytest.importorskip("timm.layers.pos_embed")
    pos = torch.randn(1, prefix + old * old, 24)
    ours = resample_pos_embed(pos, new, num_prefix_tokens=prefix)
    ref = timm_pos.resample_abs_pos_embed(pos, [new, new], num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new * new, 24)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, :prefix], pos[:, :prefix])


def test_pos_embed_resample_is_bicubic_antialias_in_fp32():
    pos = torch.randn(1, 1 + 37 * 37, 8).to(torch.bfloat16)
    ours = resample_pos_embed(pos, 16)
    grid = pos[:, 1:].float().reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    hand = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours[:, 1:], hand.to(torch.bfloat16))
    no_aa = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert not torch.equal(ours[:, 1:], no_aa.to(torch.bfloat16))  # the antialias flag matters here
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 37 * 36, 8), 16)


@pytest.mark.parametrize("resolution,grid,side", [(256, None, 224), (512, None, 448), (32, 8, 112), (48, 4, 56)])
def test_preprocess_matches_reference_chain(resolution, grid, side):
    enc = DINOv2ViT(dinov2_arch("t"), resolution=resolution, grid=grid)
    images = _images(2, resolution)
    x = images / 255.0  # reference train.py preprocess_raw_image: /255, Normalize, then F.interpolate bicubic
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = F.interpolate(x, size=side, mode="bicubic")
    ours = enc.preprocess(images)
    assert ours.shape == (2, 3, side, side) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert torch.equal(enc.to(torch.bfloat16).preprocess(images), ref)  # bf16 weights: preprocessing stays fp32
    tv = pytest.importorskip("torchvision.transforms")
    ref_tv = F.interpolate(tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images / 255.0), size=side, mode="bicubic")
    assert torch.equal(ours, ref_tv)


def test_input_validation():
    enc = DINOv2ViT(dinov2_arch("t"), resolution=64)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        enc(_images(1, 32))
    with pytest.raises(ValueError, match="uint8"):
        enc(torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 16"):
        DINOv2ViT(dinov2_arch("t"), resolution=40)
    assert enc(_images(1, 64).float()).shape == (1, 16, 192)  # float pixels in 0..255 are accepted, like the reference


# ----------------------------------------------------------------------------------------------------------------
# architecture and key names


def test_state_dict_keys_are_the_official_hub_names():
    for size, ffn in (("t", ("fc1", "fc2")), ("g", ("w12", "w3"))):
        for reg in (False, True):
            with torch.device("meta"):
                model = DINOv2ViT(dinov2_arch(size, reg), resolution=518, grid=37)
            expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight"}
            expected |= {"norm.bias"} | ({"register_tokens"} if reg else set())
            for i in range(model.arch.depth):
                for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", f"mlp.{ffn[0]}", f"mlp.{ffn[1]}"):
                    expected |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
                expected |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
            assert set(model.state_dict()) == expected  # the hub file has these plus mask_token


@pytest.mark.parametrize("size", ["s", "b", "l", "g"])
@pytest.mark.parametrize("reg", [False, True])
def test_shapes_match_timm_for_every_size(size, reg):
    """Structure of S/B/L/G (+reg4) against timm's models, on the meta device (no memory, no init cost)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = DINOv2ViT(dinov2_arch(size, reg), resolution=518, grid=37)
        tm = timm.create_model(timm_model_name(size, reg).split(".")[0], pretrained=False, num_classes=0)
    ours_sd = {k: torch.empty(v.shape, device="meta") for k, v in ours.state_dict().items()}
    ours_sd["mask_token"] = torch.empty(1, ours.embed_dim, device="meta")
    converted = {k: tuple(v.shape) for k, v in timm_layout_shapes(ours_sd).items()}
    assert converted == {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in tm.parameters()) + (ours.embed_dim if reg else 0)
    # published sizes: ViT-S/14 21M, B/14 86M, L/14 300M, g/14 1.1B
    assert round(n_params / 1e6) == {"s": 22, "b": 87, "l": 304, "g": 1136}[size]


def timm_layout_shapes(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["pos_embed"] = torch.empty(1, out["pos_embed"].shape[1] - 1, out["pos_embed"].shape[2], device="meta")
    return {k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2."): v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# loading files


@pytest.mark.parametrize("reg", [False, True])
def test_hub_and_hf_layouts_load_and_agree(files, reg, empty_caches):
    name = "dinov2reg-vit-s" if reg else "dinov2-vit-s"
    images = _images(2)
    (from_hub,) = load_encoders(name, 256, files[reg]["hub"])  # explicit file
    (from_hf,) = load_encoders(name, 256, files[reg]["hf_root"])  # folder in the HF cache layout
    out_hub, out_hf = from_hub(images), from_hf(images)
    assert out_hub.shape == (2, 256, 384) and torch.isfinite(out_hub).all()
    assert out_hub.std() > 0.5  # final LayerNorm output, not collapsed
    assert torch.equal(out_hub, out_hf)  # exact: the folded class position is reproduced bit for bit
    sd = files[reg]["sd"]
    assert torch.equal(from_hub.pos_embed, resample_pos_embed(sd["pos_embed"], 16))
    assert torch.equal(from_hub.blocks[3].ls2.gamma, sd["blocks.3.ls2.gamma"])


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_search_locations(files, empty_caches):
    (explicit,) = load_encoders("dinov2-vit-s", 256, files[False]["hub"])
    (reg_explicit,) = load_encoders("dinov2reg-vit-s", 256, files[True]["hub"])
    hub_ckpts = empty_caches / "torchhub" / "checkpoints"
    hub_ckpts.mkdir(parents=True)
    os.symlink(files[False]["hub"], hub_ckpts / "dinov2_vits14_pretrain.pth")
    (from_torch_hub,) = load_encoders("dinov2-vit-s")  # torch.hub.get_dir()/checkpoints
    _assert_same_weights(from_torch_hub, explicit)

    folder = empty_caches / "ckpts" / "vit_small_patch14_reg4_dinov2.lvd142m"
    folder.mkdir(parents=True)
    os.symlink(files[True]["hf"], folder / "model.safetensors")
    both = load_encoders("dinov2-vit-s, dinov2reg-vit-s", 256, empty_caches / "ckpts")  # hub cache, then folder
    assert [e.enc_name for e in both] == ["dinov2-vit-s", "dinov2reg-vit-s"]
    _assert_same_weights(both[0], explicit)
    _assert_same_weights(both[1], load_encoders("dinov2reg-vit-s", 256, files[True]["hf"])[0])
    images = _images(1)  # the timm layout folds the class position into cls_token: same outputs, not same weights
    assert torch.equal(both[1](images), reg_explicit(images))


def test_missing_file_error_names_file_locations_and_url(empty_caches):
    ckpt_dir = empty_caches / "ckpts"
    for name, fname in (
        ("dinov2-vit-b", "dinov2_vitb14_pretrain.pth"),
        ("dinov2reg-vit-l", "dinov2_vitl14_reg4_pretrain.pth"),
    ):
        with pytest.raises(FileNotFoundError) as err:
            load_encoders(name, 256, ckpt_dir)
        msg = str(err.value)
        assert fname in msg
        size, reg = name[-1], "reg" in name
        places = candidate_paths(size, reg, ckpt_dir)
        assert len(places) == 7
        for place in places:
            assert place in msg
        assert str(empty_caches / "torchhub" / "checkpoints" / fname) in msg
        assert f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{fname}" in msg


def test_wrong_file_for_model_is_a_clear_error(files):
    s_file = files[False]["hub"]
    narrow = DINOv2ViT(EncoderArch(192, 12, 3), resolution=256, enc_name="narrow")  # S keys, other widths
    with pytest.raises(ValueError, match=r"shapes do not match narrow.*pos_embed|shapes do not match narrow"):
        load_dinov2_weights(narrow, s_file)
    shallow = DINOv2ViT(dinov2_arch("t"), resolution=256)  # depth 4: blocks 4..11 are unexpected
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.10"):
        load_dinov2_weights(shallow, s_file)
    reg_model = DINOv2ViT(EncoderArch(384, 12, 6, num_register_tokens=4), resolution=256)
    with pytest.raises(ValueError, match=f"{s_file}.*missing keys \\['register_tokens'\\]"):
        load_dinov2_weights(reg_model, s_file)
    with pytest.raises(ValueError, match="single file but 2 encoders"):
        load_encoders("dinov2-vit-s,dinov2reg-vit-s", 256, s_file)


def test_own_state_dict_round_trip(tmp_path):
    enc = _randomize_(DINOv2ViT(dinov2_arch("t", True), resolution=64), seed=5)
    torch.save(enc.state_dict(), tmp_path / "t.pth")
    fresh = load_dinov2_weights(DINOv2ViT(dinov2_arch("t", True), resolution=64), tmp_path / "t.pth")
    images = _images(2, 64)
    assert torch.equal(fresh(images), enc(images))


# ----------------------------------------------------------------------------------------------------------------
# parity with timm


def _timm_from_hub_file(model_name_or_module, hub_sd):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn

    tm = model_name_or_module
    if isinstance(tm, str):
        tm = timm.create_model(tm, pretrained=False, img_size=224, num_classes=0)
    # timm's own hub-file conversion, incl. the bicubic+antialias pos-embed resampling REPA uses
    tm.load_state_dict(checkpoint_filter_fn(dict(hub_sd), tm), strict=True)
    return tm.eval()


@pytest.mark.parametrize("reg", [False, True])
def test_parity_with_timm_vit_small(files, reg):
    """Same file, same resampling, same preprocessed input: timm's tokens equal ours (bitwise here on CPU).

    Registers are exact too: timm folds the class position into cls_token and adds no position to registers,
    which is the hub model's arithmetic ([cls + pos0, registers, patches + pos])."""
    tm = _timm_from_hub_file(timm_model_name("s", reg).split(".")[0], files[reg]["sd"])
    (ours,) = load_encoders("dinov2reg-vit-s" if reg else "dinov2-vit-s", 256, files[reg]["hub"])
    images = _images(2)
    x = ours.preprocess(images)
    with torch.no_grad():
        ref = tm.forward_features(x)[:, tm.num_prefix_tokens :]
        feats = ours.forward_features(x)
    assert_close(feats["x_norm_patchtokens"], ref)
    assert torch.equal(feats["x_norm_patchtokens"], ref)  # bitwise on CPU, as README states
    assert_close(ours(images), ref)
    assert_close(feats["x_norm_clstoken"], tm.forward_features(x)[:, 0].detach())


def test_parity_with_timm_swiglu_registers_tiny():
    """ViT-g's SwiGLU FFN (official w12/w3 names, hidden (int(4D*2/3)+7)//8*8) on a small width, with registers."""
    timm = pytest.importorskip("timm")
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    arch = EncoderArch(192, 2, 3, ffn="swiglu", num_register_tokens=4)
    hub_sd = hub_state_dict(arch, seed=7)
    assert hub_sd["blocks.0.mlp.w12.weight"].shape == (1024, 192)  # 2 * 512
    assert hub_sd["blocks.0.mlp.w3.weight"].shape == (192, 512)
    tm = VisionTransformer(
        img_size=112,
        patch_size=14,
        embed_dim=192,
        depth=2,
        num_heads=3,
        mlp_ratio=2.66667 * 2,
        init_values=1e-5,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=4,
        no_embed_class=True,
        num_classes=0,
    )
    tm = _timm_from_hub_file(tm, hub_sd)
    ours = load_dinov2_weights(DINOv2ViT(arch, resolution=128, grid=8), hub_sd)
    x = ours.preprocess(_images(3, 128))
    with torch.no_grad():
        assert_close(ours.forward_features(x)["x_norm_patchtokens"], tm.forward_features(x)[:, 5:])
    del timm


# ----------------------------------------------------------------------------------------------------------------
# load_encoders: names, frozen modules, kernels argument


def test_unknown_and_unsupported_names():
    with pytest.raises(NotImplementedError, match="not implemented"):
        load_encoders("mocov3-resnet-50", pretrained=False)
    for name in ("dinov2-vit-x", "dinov2-vit-b-reg", "dinov3-vit-b", "dinov2-b"):
        with pytest.raises(ValueError, match=r"unknown encoder.*dinov2-vit-b, .*dinov2reg-vit-b"):
            load_encoders(name, pretrained=False)
    with pytest.raises(ValueError, match="empty encoder name"):
        load_encoders("dinov2-vit-t,", pretrained=False)
    with pytest.raises(ValueError, match="no official weights"):
        load_encoders("dinov2-vit-t", pretrained=True)
    with pytest.raises(NotImplementedError):  # names are all checked before anything is built or read
        load_encoders("dinov2-vit-t,mocov3-resnet-50", pretrained=False)


def test_frozen_eval_no_grad_and_shapes():
    encs = load_encoders("dinov2-vit-t,dinov2reg-vit-t", resolution=32, grid=8, pretrained=False)
    images = _images(3, 32)
    for enc, n_reg in zip(encs, (0, 4)):
        assert not enc.training and enc.embed_dim == 192 and enc.num_register_tokens == n_reg
        assert all(not p.requires_grad for p in enc.parameters())
        with torch.enable_grad():
            out = enc(images)
        assert out.shape == (3, 64, 192) and not out.requires_grad and out.grad_fn is None
        assert torch.isfinite(out).all() and out.std() > 0.5
        assert enc.input_size == 112
    (big,) = load_encoders("dinov2-vit-t", resolution=512, pretrained=False)
    assert big.grid == 32 and big.input_size == 448 and big(_images(1, 512)).shape == (1, 1024, 192)


def test_vit_b_random_init_shape():
    (enc,) = load_encoders("dinov2-vit-b", pretrained=False)
    out = enc(_images(1))
    assert enc.embed_dim == 768 and out.shape == (1, 256, 768) and torch.isfinite(out).all()
    # random init is DINOv2's: trunc-normal(0.02) weights, zero biases, hub LayerScale init 1.0
    w = enc.blocks[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3  # (truncation is at +-2, as torch's)
    assert torch.all(enc.blocks[0].attn.qkv.bias == 0) and torch.all(enc.blocks[0].ls1.gamma == 1)


def test_attention_goes_through_kernels_module(monkeypatch):
    calls = []
    real = dinov2_mod.attention

    def spy(q, k, v, attn_backend="auto"):
        calls.append((tuple(q.shape), attn_backend))
        return real(q, k, v, attn_backend=attn_backend)

    monkeypatch.setattr(dinov2_mod, "attention", spy)
    images = _images(2, 32)
    outs = {}
    # --kernels ref pins the encoders to SDPA, auto/triton leave the choice to the attention module (config boundary).
    ref_kw, auto_kw = (encoder_kwargs(ModelConfig(kernels=k)) for k in ("ref", "triton"))
    for kw, expected in ((ref_kw, "sdpa"), (auto_kw, "auto"), ({"attn_backend": "math"}, "math")):
        torch.manual_seed(0)
        (enc,) = load_encoders("dinov2reg-vit-t", 32, grid=4, pretrained=False, **kw)
        _randomize_(enc, seed=3)
        calls.clear()
        outs[expected] = enc(images)
        assert calls == [((2, 1 + 4 + 16, 3, 64), expected)] * 4  # layout (B, N, H, Dh), one call per block
    assert_close(outs["math"], outs["sdpa"])
    assert_close(outs["auto"], outs["sdpa"])
    with pytest.raises(TypeError, match="impl"):  # the encoders have no Triton op: no switch for one
        load_encoders("dinov2-vit-t", pretrained=False, impl="ref")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        load_encoders("dinov2-vit-t", pretrained=False, attn_backend="flash-ish")


def test_low_precision_runs_match_fp32():
    """The reference runs encoders under fp16 autocast; here bf16 (CPU autocast) and bf16 weights stay close to fp32."""
    enc = _randomize_(DINOv2ViT(dinov2_arch("t", True), resolution=64), seed=11).eval()
    images = _images(2, 64)
    ref = enc(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = enc(images)
    half = enc.to(torch.bfloat16)(images)
    for out in (auto, half):
        assert out.shape == ref.shape and torch.isfinite(out).all()
        cos = F.cosine_similarity(out.float(), ref, dim=-1)
        assert cos.min() > 0.98, cos.min()
    assert half.dtype == torch.bfloat16


def test_models_have_no_import_circle_even_through_lazy_imports():
    """encoders (the dispatch) imports the builders lazily, the builders import weight_files, nothing imports back."""
    from tests.test_imports import PACKAGE_DIR, find_cycle, import_graph

    graph = import_graph(PACKAGE_DIR, "repa_fast", lazy=True)
    models = {n: {t for t in e if t.startswith("repa_fast.models")} for n, e in graph.items()}
    models = {n: e for n, e in models.items() if n.startswith("repa_fast.models")}
    assert "repa_fast.models.vit_encoder_files" in models["repa_fast.models.encoders"]  # the lazy import is seen
    assert models["repa_fast.models.weight_files"] <= {"repa_fast.models.dinov2", "repa_fast.models.vit_encoders"}
    assert find_cycle(models) is None, find_cycle(models)
