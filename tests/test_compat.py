"""Checkpoints users already have (repa_fast.engine.compat, generate): reference, ERW and REPA layouts, safely."""

import argparse
import os

import pytest
import torch

from repa_fast.engine import compat
from repa_fast.engine.checkpoint import CheckpointError
from repa_fast.generate import main as generate_main
from repa_fast.models.sit import build_sit


def _sit(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"input_size": 8, "in_channels": 4, "num_classes": 10, "z_dims": [24], "encoder_depth": 2,
          "projector_dim": 32, **kw}  # fmt: skip
    model = build_sit("SiT-T/2", **kw)
    for p in model.parameters():  # random everywhere (adaLN-Zero and the output layer start at zero)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _reference_file(path, model, args=None, steps=7):
    """A reference train.py checkpoint: AdamW over model.parameters() (frozen pos_embed included), one real step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out, _ = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    out.square().mean().backward()
    opt.step()
    ns = args or argparse.Namespace(model="SiT-T/2", encoder_depth=2, qk_norm=False, enc_type="dinov2-vit-t")
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "args": ns, "steps": steps}, path)
    return opt


def test_reference_checkpoint_with_namespace_loads_strictly_and_maps_adamw_by_name(tmp_path):
    model = _sit()
    opt = _reference_file(tmp_path / "0000007.pt", model)
    f = compat.read_foreign(str(tmp_path / "0000007.pt"))
    assert f["kind"] == "reference" and f["step"] == 7 and f["args"]["model"] == "SiT-T/2"
    fresh = _sit(seed=1)
    sd = compat.weights_for(str(tmp_path / "0000007.pt"), fresh, "model", f)
    fresh.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    ema = compat.weights_for(str(tmp_path / "0000007.pt"), fresh, "ema", f)
    assert torch.equal(ema["blocks.1.mlp.fc1.weight"], model.blocks[1].mlp.fc1.weight + 1)
    mapped, skipped = compat.map_optimizer(f["opt"], list(f["model"]), fresh)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(mapped["state"]) == len(opt.state) > 20
    for p, s in opt.state.items():  # every entry landed on the parameter of the same name
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(mapped["state"][names[id(p)]][k], s[k].reshape(mapped["state"][names[id(p)]][k].shape))
    assert "pos_embed" not in mapped["state"]


def test_erw_optimizer_filtered_to_trainable_params_maps_too(tmp_path):
    model = _sit()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # ERW's filter
    out, _ = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    out.square().mean().backward()
    opt.step()
    mapped, _ = compat.map_optimizer(opt.state_dict(), list(model.state_dict()), model)
    w = model.blocks[3].attn.qkv.weight
    assert torch.equal(mapped["state"]["blocks.3.attn.qkv.weight"]["exp_avg"], opt.state[w]["exp_avg"])


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = _sit()
    path = tmp_path / "evil.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": Payload()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        compat.read_foreign(str(path))
    assert not marker.exists()
    assert generate_main(["--ckpt", str(path), "--model", "SiT-T/2", "--sample-dir", str(tmp_path / "s")]) == 2
    assert not marker.exists()


def test_erw_warmup_file_is_recognised_by_its_keys_and_completed_with_the_init(tmp_path, capsys):
    full = _sit()
    warm = {k: v for k, v in full.state_dict().items() if not k.startswith(("final_layer", "blocks.2", "blocks.3",
                                                                            "blocks.4", "blocks.5"))}  # fmt: skip
    ns = argparse.Namespace(model="SiT-T/2", use_rope=True, l2r_depth=2)
    torch.save({"model": warm, "ema": warm, "args": ns, "steps": 5}, tmp_path / "0000005.pt")
    f = compat.read_foreign(str(tmp_path / "0000005.pt"))
    assert f["kind"] == "erw-warmup"
    target = _sit(seed=3)
    sd = compat.weights_for(str(tmp_path / "0000005.pt"), target, "model", f)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], full.blocks[1].attn.qkv.weight)
    assert torch.equal(sd["blocks.4.attn.qkv.weight"], target.blocks[4].attn.qkv.weight)  # its own init
    assert torch.equal(sd["final_layer.linear.weight"], target.final_layer.linear.weight)
    assert compat.find_foreign_resume(str(tmp_path / ".."), 5) is None
    os.makedirs(tmp_path / "run" / "checkpoints")
    os.replace(tmp_path / "0000005.pt", tmp_path / "run" / "checkpoints" / "warmup_final.pt")
    assert compat.find_foreign_resume(str(tmp_path / "run"), 5).endswith("warmup_final.pt")
    os.replace(tmp_path / "run" / "checkpoints" / "warmup_final.pt", tmp_path / "run" / "checkpoints" / "erw_100k.pt")
    assert compat.find_foreign_resume(str(tmp_path / "run"), 5).endswith("erw_100k.pt")  # any name: by its keys
    assert compat.find_foreign_resume(str(tmp_path / "run"), 6) is None  # another step
    os.replace(tmp_path / "run" / "checkpoints" / "erw_100k.pt", tmp_path / "run" / "checkpoints" / "warmup_final.pt")
    assert generate_main(["--ckpt", str(tmp_path / "run" / "checkpoints" / "warmup_final.pt"), "--model", "x"]) == 2
    assert "ERW warm-up checkpoint" in capsys.readouterr().err


def test_qk_norm_and_depth_come_from_the_keys():
    assert compat.arch_from_keys(_sit(qk_norm=True).state_dict())["qk_norm"] is True
    arch = compat.arch_from_keys(_sit().state_dict())
    assert arch["qk_norm"] is False and arch["depth"] == 6 and arch["z_dims"] == [24] and arch["projector_dim"] == 32


def _gen(tmp_path, ckpt, *extra):
    return generate_main(["--ckpt", str(ckpt), "--model", "SiT-T/2", "--resolution", "64", "--num-fid-samples", "2",
                          "--num-steps", "2", "--sample-dir", str(tmp_path / "s"), *extra])  # fmt: skip


def test_generate_without_vae_for_a_latent_model_fails_before_sampling(tmp_path, monkeypatch, capsys):
    import repa_fast.generate as G

    torch.save(_sit().state_dict(), tmp_path / "last.pt")  # REPA's release: a bare state dict
    calls = []
    monkeypatch.setattr(G, "generate_shard", lambda *a, **k: calls.append(1))
    assert _gen(tmp_path, tmp_path / "last.pt", "--vae", "none") == 2
    assert "latent-space model" in capsys.readouterr().err and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert _gen(tmp_path, tmp_path / "last.pt") == 2  # default --vae ema, not in the cache: fails before sampling
    assert "sd-vae-ft-ema" in capsys.readouterr().err and calls == []


def test_legacy_remaps_decoder_blocks(tmp_path, monkeypatch, capsys):
    import repa_fast.generate as G

    model = _sit()
    sd = {
        (f"decoder_blocks.{int(k.split('.')[1]) - 2}." + k.split(".", 2)[2] if k.startswith("blocks.") and
         int(k.split(".")[1]) >= 2 else k): v
        for k, v in model.state_dict().items()
    }  # fmt: skip
    assert any(k.startswith("decoder_blocks.3.") for k in sd)
    torch.save({"ema": sd}, tmp_path / "old.pt")
    remapped = compat.legacy_remap(sd, encoder_depth=2)
    assert remapped.keys() == model.state_dict().keys()
    assert torch.equal(remapped["blocks.5.mlp.fc2.weight"], model.blocks[5].mlp.fc2.weight)
    seen = {}

    def fake_shard(args, m, vae, *a):
        seen["w"] = m.blocks[5].mlp.fc2.weight.detach().clone()
        raise SystemExit(0)

    monkeypatch.setattr(G, "load_vae", lambda *a: None, raising=False)
    monkeypatch.setattr("repa_fast.data.vae.load_vae", lambda *a: None)
    monkeypatch.setattr(G, "generate_shard", fake_shard)
    assert _gen(tmp_path, tmp_path / "old.pt") == 2
    assert "pass --legacy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _gen(tmp_path, tmp_path / "old.pt", "--legacy", "--encoder-depth", "2")
    assert torch.equal(seen["w"], model.blocks[5].mlp.fc2.weight)
    torch.save({"ema": model.state_dict()}, tmp_path / "new.pt")
    assert _gen(tmp_path, tmp_path / "new.pt", "--legacy") == 2
    assert "drop --legacy" in capsys.readouterr().err


def test_vae_ema_resolves_through_the_local_hub_cache(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    import huggingface_hub.constants
    from diffusers import AutoencoderKL

    from repa_fast.data.vae import load_vae, resolve_vae

    snap = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / "0123abcd"
    torch.manual_seed(0)
    tiny = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    tiny.save_pretrained(snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.path.samefile(resolve_vae("ema"), snap)
    vae = load_vae("ema")
    assert torch.equal(vae.encoder.conv_in.weight, tiny.encoder.conv_in.weight)
    assert os.path.samefile(resolve_vae(str(snap)), snap)  # a local directory works the same
    from repa_fast.data.common import DataError

    with pytest.raises(DataError, match="sd-vae-ft-mse"):
        resolve_vae("mse")  # not cached, offline: a clear error naming the hub id


def test_a_ddp_prefixed_reference_file_resumes_with_its_adamw_moments(tmp_path):
    """Keys saved through a DDP wrapper (``module.``) map to ours, and so does the index-keyed optimizer state."""
    model = _sit(seed=4)
    opt = _reference_file(tmp_path / "plain.pt", model)
    with torch.serialization.safe_globals([argparse.Namespace]):
        blob = torch.load(tmp_path / "plain.pt", weights_only=True)
    for part in ("model", "ema"):
        blob[part] = {"module." + k: v for k, v in blob[part].items()}
    torch.save(blob, tmp_path / "0000007.pt")
    saved = compat.read_as_saved(str(tmp_path / "0000007.pt"), _sit(seed=5), 0, lambda s: "full")
    assert saved["state"]["step"] == 7 and saved["model"].keys() == model.state_dict().keys()
    assert torch.equal(saved["model"]["blocks.2.mlp.fc1.weight"], model.blocks[2].mlp.fc1.weight)
    w = model.blocks[2].mlp.fc1.weight
    assert torch.equal(
        saved["state"]["optimizer"]["state"]["blocks.2.mlp.fc1.weight"]["exp_avg"], opt.state[w]["exp_avg"]
    )
    assert not any("optimizer state" in x for x in saved["state"]["foreign"])
