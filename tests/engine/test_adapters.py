"""One adapter per foreign checkpoint format (repa_fast.engine.adapters): each format's detection and key mapping, on
small random SiT weights saved in the real file layouts (the containers, the saved argparse.Namespace with the
reference's full flag set, DDP prefixes, ERW's persistent RoPE tables, ERW's truncated warm-up model)."""

import argparse

import pytest
import torch

from repa_fast.engine import adapters
from repa_fast.engine.adapters.base import SavedArgs
from repa_fast.errors import CheckpointError
from repa_fast.models.sit import build_sit


def _sit(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"input_size": 8, "in_channels": 4, "num_classes": 10, "z_dims": [24], "encoder_depth": 2,
          "projector_dim": 32, **kw}  # fmt: skip
    model = build_sit("SiT-T/2", **kw)
    for p in model.parameters():  # random everywhere (adaLN-Zero and the output layer start at zero)
        torch.nn.init.normal_(p, std=0.05)
    return model


def repa_args(**over):
    """Every flag REPA's train.py saves in its checkpoints (REPA train.py:390-438), with their defaults."""
    ns = dict(
        output_dir="exps", exp_name="linear-dinov2-b-enc8", logging_dir="logs", report_to="wandb",
        sampling_steps=10000, resume_step=0, model="SiT-T/2", num_classes=10, encoder_depth=2, fused_attn=True,
        qk_norm=False, data_dir="../data/imagenet256", resolution=256, batch_size=256, allow_tf32=False,
        mixed_precision="fp16", epochs=1400, max_train_steps=400000, checkpointing_steps=50000,
        gradient_accumulation_steps=1, learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
        adam_epsilon=1e-8, max_grad_norm=1.0, seed=0, num_workers=4, path_type="linear", prediction="v",
        cfg_prob=0.1, enc_type="dinov2-vit-b", proj_coeff=0.5, weighting="uniform", legacy=False,
    )  # fmt: skip
    return argparse.Namespace(**{**ns, **over})


def erw_args(**over):
    """ERW's train.py flags: the reference's plus --warmup-steps, --l2r-depth, --use_rope (ERW train.py:41-84)."""
    return repa_args(**{"warmup_steps": 100000, "l2r_depth": 2, "use_rope": True, "checkpointing_steps": 10000, **over})


def _adamw(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _train_file(model, args, steps=7, ema_shift=1.0, prefix=""):
    opt = _adamw(model)  # one real step first: the saved weights are the stepped ones
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    ema = {k: v + ema_shift for k, v in sd.items()}
    return {"model": sd, "ema": ema, "opt": opt, "args": args, "steps": steps}


def _rope_tables(sd, n=16, d=8):
    """ERW's VisionRotaryEmbeddingFast buffers (LightningDiT models/pos_embed.py), persistent in its state dict."""
    return {**sd, "feat_rope.freqs_cos": torch.randn(n, d), "feat_rope.freqs_sin": torch.randn(n, d)}


def _warm(model, l2r_depth=2):
    """ERW's warm-up model: blocks < l2r-depth, embedders, projectors; no final layer (ERW models/sit.py:301-307)."""
    keep = [f"blocks.{i}." for i in range(l2r_depth)]
    return {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("blocks.", "final_layer.")) or k.startswith(tuple(keep))
    }


def _load(tmp_path, obj, name="f.pt"):
    torch.save(obj, tmp_path / name)
    return adapters.read_foreign(str(tmp_path / name))


def test_reference_train_file_is_read_with_its_parts_and_arch_flags(tmp_path):
    model = _sit()
    f = _load(tmp_path, _train_file(model, repa_args()))
    assert f.kind == "reference" and isinstance(f.adapter, adapters.REPATrain) and f.step == 7
    sd, dropped = f.adapter.to_ours(f.model)
    assert dropped == [] and sd.keys() == model.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert torch.equal(f.ema["blocks.3.attn.qkv.weight"], model.blocks[3].attn.qkv.weight + 1)
    assert len(f.opt["state"]) > 20 and f.args["batch_size"] == 256  # every flag read, as saved
    cfg = f.adapter.config(f.args)  # only flags that are our options of the same name and meaning
    assert cfg == {"model": "SiT-T/2", "enc_type": "dinov2-vit-b", "encoder_depth": 2, "qk_norm": False,
                   "num_classes": 10, "resolution": 256}  # fmt: skip


def test_ddp_prefix_is_dropped(tmp_path):
    model = _sit(seed=1)
    f = _load(tmp_path, _train_file(model, repa_args(), prefix="module."))
    assert all(k.startswith("module.") for k in f.model)
    sd, _ = f.adapter.to_ours(f.model)
    assert sd.keys() == model.state_dict().keys() and torch.equal(sd["pos_embed"], model.pos_embed)


@pytest.mark.parametrize("layout", ["bare", "ema-only"])
def test_repa_release_and_exported_files(tmp_path, layout):
    model = _sit(seed=2)
    obj = model.state_dict() if layout == "bare" else {"ema": model.state_dict()}  # REPA last.pt / generate.py:81
    f = _load(tmp_path, obj)
    assert f.kind == "state-dict" and isinstance(f.adapter, adapters.REPARelease)
    assert f.model is None and f.opt is None and f.args == {} and f.step is None
    sd, _ = f.adapter.to_ours(f.ema)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_erw_full_file_drops_its_rope_tables_and_states_rope(tmp_path):
    model = _sit(seed=3)
    obj = _train_file(model, erw_args(), steps=300000)
    obj["model"], obj["ema"] = _rope_tables(obj["model"]), _rope_tables(obj["ema"])
    f = _load(tmp_path, obj)
    assert f.kind == "erw" and isinstance(f.adapter, adapters.ERWTrain) and f.step == 300000
    sd, dropped = f.adapter.to_ours(f.model)
    assert sorted(dropped) == ["feat_rope.freqs_cos", "feat_rope.freqs_sin"]
    assert sd.keys() == model.state_dict().keys()
    assert torch.equal(sd["blocks.5.mlp.fc2.weight"], model.blocks[5].mlp.fc2.weight)
    cfg = f.adapter.config(f.args)
    assert cfg["use_rope"] is True and cfg["l2r_depth"] == 2 and cfg["warmup_steps"] == 100000
    assert "batch_size" not in cfg and cfg["model"] == "SiT-T/2"


@pytest.mark.parametrize("layout", ["train", "bare"])
def test_erw_warmup_file_is_recognised_by_its_keys_and_completed(tmp_path, layout):
    model = _sit(seed=4)
    warm = _warm(model)
    train = {"model": warm, "ema": warm, "opt": {}, "args": erw_args(use_rope=False), "steps": 5}
    f = _load(tmp_path, train if layout == "train" else warm, name="warmup_final.pt")
    assert f.kind == "erw-warmup" and isinstance(f.adapter, adapters.ERWWarmup)
    assert f.step == (5 if layout == "train" else None)
    fresh = _sit(seed=5)
    sd, filled = adapters.complete_warmup(f.adapter.to_ours(f.ema)[0], fresh)
    assert sorted(filled) == sorted(k for k in fresh.state_dict() if k not in warm)
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], model.blocks[1].attn.qkv.weight)  # from the file
    assert torch.equal(sd["blocks.4.attn.qkv.weight"], fresh.blocks[4].attn.qkv.weight)  # the model's own init
    assert torch.equal(sd["final_layer.linear.weight"], fresh.final_layer.linear.weight)


def test_each_layout_is_taken_by_exactly_its_adapter_first():
    model = _sit(seed=6)
    sd, warm = model.state_dict(), _warm(model)
    layouts = {
        "reference": {"model": sd, "ema": sd, "opt": {}, "args": repa_args(), "steps": 1},
        "erw": {"model": sd, "ema": sd, "opt": {}, "args": erw_args(), "steps": 1},
        "erw-warmup": {"model": warm, "ema": warm, "args": erw_args(), "steps": 1},
        "state-dict": sd,
        "reg": {"model": (reg := _sit(seed=6, reg=True).state_dict()), "ema": reg, "args": repa_args(cls=0.03)},
        "irepa": {"model": sd, "ema": sd, "args": repa_args(projection_layer_type="mlp", spnorm_method="none")},
    }
    names = [a.name for a in adapters.ADAPTERS]
    assert len(set(names)) == len(names) == 6
    for kind, obj in layouts.items():
        accepted = [a.name for a in adapters.ADAPTERS if a.detect(obj)]
        assert accepted[0] == kind, (kind, accepted)
    assert adapters.detect({"ema": sd}, "x.pt").name == "state-dict"
    with pytest.raises(CheckpointError, match=r"x\.pt: not a SiT checkpoint.*got \['optimizer', 'step'\]"):
        adapters.detect({"optimizer": {}, "step": 3}, "x.pt")
    with pytest.raises(CheckpointError, match="got list"):
        adapters.detect([1, 2], "x.pt")


class NotAllowed:  # any class besides argparse.Namespace: refused when a file pickles one
    pass


def test_saved_namespace_is_rebuilt_as_saved_args_and_other_classes_are_refused(tmp_path):
    model = _sit(seed=7)
    torch.save(_train_file(model, repa_args()), tmp_path / "ok.pt")
    obj = adapters.load_pickle_safely(str(tmp_path / "ok.pt"))
    assert type(obj["args"]) is SavedArgs and vars(obj["args"])["enc_type"] == "dinov2-vit-b"

    torch.save({"model": model.state_dict(), "args": NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="refused to load"):
        adapters.read_foreign(str(tmp_path / "bad.pt"))


def test_arch_from_keys_reads_the_sit_layout_every_adapter_maps_to():
    arch = adapters.arch_from_keys(_sit(qk_norm=True, z_dims=[24, 16]).state_dict())
    assert arch["z_dims"] == [24, 16] and arch["qk_norm"] is True and arch["depth"] == 6
    assert (arch["in_channels"], arch["num_classes"], arch["num_patches"]) == (4, 10, 16)
