"""``repa_fast.load_weights`` and the REG / iREPA adapters, on small random weights saved in each reference's file
layout: the train.py container ``{"model", "ema", "opt", "args", "steps"}`` with its full pickled
``argparse.Namespace`` (REG train.py:341-349 and 386-436; iREPA ldm/train.py:362-372 and 422-489), REG's
class-token keys, iREPA's ``projectors.k.projection_layer.*`` keys and its conv kernel size in the args."""

import argparse
import math

import pytest
import torch

import repa_fast
from repa_fast.engine import adapters
from repa_fast.engine.checkpoint import load_run
from repa_fast.errors import CheckpointError
from repa_fast.generate import build_model, generate_shard
from repa_fast.models.sit import build_sit
from repa_fast.options import ModelOptions, SamplingOptions
from repa_fast.sample import euler_maruyama_sampler

from .test_adapters import _train_file, erw_args, repa_args

KW = {"input_size": 8, "in_channels": 4, "num_classes": 10, "z_dims": [24], "encoder_depth": 2, "projector_dim": 32}


def _sit(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_sit("SiT-T/2", **{**KW, **kw})
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (adaLN-Zero, linear_cls and the output layer start at 0)
            p.normal_(0, 0.4 / math.sqrt(p[0].numel() if p.dim() > 1 else p.shape[-1]))
    return model


def reg_args(**over):
    """REG's train.py flags (REG train.py:386-436): REPA's plus --ops-head and --cls."""
    return repa_args(**{"ops_head": 16, "cls": 0.03, "checkpointing_steps": 10000, **over})


def irepa_args(**over):
    """iREPA's ldm/train.py flags (ldm/train.py:422-489), --proj-coeff a string as its parser keeps it."""
    ns = vars(repa_args(proj_coeff="1.0", sampling_steps=50000, num_workers=12))
    ns.update(n_samples=256, projection_layer_type="conv", proj_kwargs_kernel_size=1, compile=True,
              ema_decay=0.9999, ema_update_freq=1, repa_loss=True, projection_loss_type="cosine",
              spnorm_method="zscore", cls_token_weight=0.2, zscore_alpha=0.6, zscore_proj_skip_std=False,
              config="configs/irepa.yaml")  # fmt: skip
    return argparse.Namespace(**{**ns, **over})


def _irepa_mlp_keys(sd):
    """iREPA's current "mlp" projector keeps its MLP inside ProjectionLayer (ldm/models/sit.py:36-47)."""
    return {k.replace("projectors.0.", "projectors.0.projection_layer.", 1): v for k, v in sd.items()}


def _save(tmp_path, obj, name="f.pt"):
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


def _same(model, sd):
    own = model.state_dict()
    return own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.parametrize("which", ["ema", "model"])
def test_reg_train_file_loads_strictly_and_states_reg(tmp_path, which):
    src = _sit(seed=1, reg=True)
    path = _save(tmp_path, _train_file(src, reg_args()))
    f = adapters.read_foreign(path)
    assert f.kind == "reg" and isinstance(f.adapter, adapters.REGTrain) and f.step == 7
    run = load_run(path, which)
    assert run.config.model.reg and run.config.loss.cls == 0.03 and {"reg", "cls"} <= run.stated
    model = repa_fast.load_weights(path, _sit(seed=2, reg=True), which=which)
    assert _same(model, getattr(f, which))
    assert torch.equal(model.final_layer.linear_cls.weight, getattr(f, which)["final_layer.linear_cls.weight"])
    with pytest.raises(CheckpointError, match="cls_projectors2"):  # a REPA SiT does not take REG's weights
        repa_fast.load_weights(path, _sit(seed=2), which=which)


@pytest.mark.parametrize("kind,k", [("conv", 1), ("conv", 3), ("linear", 3), ("mlp", 3)])
def test_irepa_train_file_loads_with_its_projector(tmp_path, kind, k):
    src = _sit(seed=3, projection_layer_type=kind, proj_kernel_size=k)
    obj = _train_file(src, irepa_args(projection_layer_type=kind, proj_kwargs_kernel_size=k))
    if kind == "mlp":
        obj["model"], obj["ema"] = _irepa_mlp_keys(obj["model"]), _irepa_mlp_keys(obj["ema"])
        assert "projectors.0.projection_layer.4.weight" in obj["ema"]
    path = _save(tmp_path, obj)
    f = adapters.read_foreign(path)
    assert f.kind == "irepa"
    cfg = f.adapter.config(f.args)
    assert (cfg["projection_layer_type"], cfg["proj_kwargs_kernel_size"]) == (kind, k)
    assert (cfg["spnorm_method"], cfg["zscore_alpha"], cfg["proj_coeff"]) == ("zscore", 0.6, 1.0)
    model = repa_fast.load_weights(path, _sit(seed=4, projection_layer_type=kind, proj_kernel_size=k))
    assert _same(model, src.state_dict() | {n: v + 1 for n, v in src.state_dict().items()})


def test_irepa_kernel_size_comes_from_the_files_args_and_a_mismatch_names_the_projector(tmp_path):
    """iREPA's train.py defaults --proj-kwargs-kernel-size to 1 (ldm/train.py:442): a 1x1 conv in the file."""
    src = _sit(seed=5, projection_layer_type="conv", proj_kernel_size=1)
    path = _save(tmp_path, _train_file(src, irepa_args(proj_kwargs_kernel_size=1)))
    built = build_model(ModelOptions(), load_run(path))  # generate's builder: the args' kernel size
    assert built.projectors[0].projection_layer.kernel_size == (1, 1)
    with pytest.raises(
        CheckpointError, match=r"projector 0 \(projectors\.0\.projection_layer\.weight\).*\(24, 192, 1, 1\)"
    ):
        repa_fast.load_weights(path, _sit(seed=6, projection_layer_type="conv", proj_kernel_size=3))
    lying = _save(tmp_path, _train_file(src, irepa_args(proj_kwargs_kernel_size=3)), "lying.pt")
    with pytest.raises(CheckpointError, match="projector 0"):  # args that did not build the weights
        build_model(ModelOptions(), load_run(lying))


def test_reference_and_erw_files_and_our_checkpoints(tmp_path):
    from .helpers import tiny_cfg

    src = _sit(seed=7)
    for args in (repa_args(), erw_args(use_rope=False)):
        path = _save(tmp_path, _train_file(src, args), f"{args.exp_name}-{hasattr(args, 'l2r_depth')}.pt")
        assert _same(repa_fast.load_weights(path, _sit(seed=8), "model"), src.state_dict())
    bare = _save(tmp_path, src.state_dict(), "last.pt")  # REPA's release: read as the EMA
    assert _same(repa_fast.load_weights(bare, _sit(seed=8)), src.state_dict())
    with pytest.raises(CheckpointError, match="no 'model' weights"):
        repa_fast.load_weights(bare, _sit(seed=8), "model")

    from repa_fast.engine.trainer import train

    summary = train(tiny_cfg(tmp_path / "ours", "--cls", "0.03", steps=1, ckpt_every=1))
    run = load_run(summary["run_dir"], "ema")
    model = build_model(ModelOptions(), run)  # REG from the run's config.json and keys
    assert model.reg
    fresh = build_sit("SiT-T/4", input_size=16, in_channels=3, num_classes=10, z_dims=[64], encoder_depth=2,
                      projector_dim=256, reg=True)  # fmt: skip
    assert _same(repa_fast.load_weights(summary["run_dir"], fresh), run.weights)
    from repa_fast.export import export_ref_layout

    out = export_ref_layout(summary["run_dir"], str(tmp_path / "reg-ema.pt"))  # {"ema": ...}: read as REG weights
    assert adapters.read_foreign(out).kind == "reg"
    assert _same(repa_fast.load_weights(out, fresh), run.weights)


def test_generate_samples_a_reg_checkpoint_jointly(tmp_path):
    """generate draws the image noise, then the class-token noise (REG generate.py:129-131), and guides the class
    token with --cls-cfg-scale."""
    src = _sit(seed=10, reg=True).eval()
    path = _save(tmp_path, _train_file(src, reg_args(model="SiT-T/2")))
    model = build_model(ModelOptions(), load_run(path)).double()
    s = SamplingOptions(mode="sde", num_steps=4, cfg_scale=2.0, cls_cfg_scale=2.5, num_fid_samples=3,
                        per_proc_batch_size=3, labels="random")  # fmt: skip
    torch.set_default_dtype(torch.float64)
    try:
        got = generate_shard(s, model, None, 0, 1, torch.device("cpu"), 1.0)
        gen = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (3,), generator=gen)
        z = torch.randn(3, 4, 8, 8, generator=gen)
        c = torch.randn(3, 24, generator=gen)
        x = euler_maruyama_sampler(model, z, y, num_steps=4, cfg_scale=2.0, generator=gen, cls_latents=c,
                                   cls_cfg_scale=2.5)  # fmt: skip
        other = euler_maruyama_sampler(model, z, y, num_steps=4, cfg_scale=2.0, generator=torch.Generator()
                                       .manual_seed(0), cls_latents=c, cls_cfg_scale=0.0)  # fmt: skip
    finally:
        torch.set_default_dtype(torch.float32)
    from repa_fast.sample import decode_to_uint8

    assert (got == decode_to_uint8(x.float()).numpy()).all()
    assert (x - other).abs().max() > 1e-6  # the class token's guidance reaches the image


def test_warmup_files_and_bad_which_are_refused(tmp_path):
    src = _sit(seed=11)
    warm = {k: v for k, v in src.state_dict().items() if not k.startswith(("final_layer.", "blocks.3", "blocks.4"))}
    path = _save(tmp_path, {"model": warm, "ema": warm, "args": erw_args(), "steps": 5})
    with pytest.raises(CheckpointError, match="ERW warm-up"):
        repa_fast.load_weights(path, _sit(seed=12))
    with pytest.raises(ValueError, match="which"):
        repa_fast.load_weights(path, _sit(seed=12), which="both")


def test_generate_refuses_reg_flags_that_do_not_fit_the_checkpoint(tmp_path):
    from repa_fast.errors import ConfigError
    from repa_fast.generate import GenerateOptions, load_model

    repa = _save(tmp_path, _train_file(_sit(seed=13), repa_args()), "repa.pt")
    reg = _save(tmp_path, _train_file(_sit(seed=14, reg=True), reg_args()), "reg.pt")
    with pytest.raises(ConfigError, match="not a REG checkpoint; drop --cls-cfg-scale"):
        load_model(GenerateOptions(ckpt=repa, sampling=SamplingOptions(cls_cfg_scale=2.3)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="--cls 768: .* fixes at 24"):  # REG generate.py's default width
        load_model(GenerateOptions(ckpt=reg, cls=768), torch.device("cpu"))


def test_a_reg_train_file_resumes_a_reg_run(tmp_path):
    """REG's train.py file as checkpoints/<N:07d>.pt: --resume-step N continues it (weights and EMA)."""
    import json
    import os

    from repa_fast.engine import checkpoint as ckpt
    from repa_fast.engine.trainer import train

    from .helpers import tiny_cfg

    first = train(tiny_cfg(tmp_path / "a", "--cls", "0.03", steps=2, ckpt_every=2))
    saved = ckpt.read_checkpoint(ckpt.step_dir(first["run_dir"], 2))
    args = reg_args(model="SiT-T/4", enc_type="digits-ssl", resolution=16, encoder_depth=2, num_classes=10)
    os.makedirs(tmp_path / "b" / "run" / "checkpoints")
    obj = {"model": saved["model"], "ema": saved["ema"], "args": args, "steps": 2}
    torch.save(obj, tmp_path / "b" / "run" / "checkpoints" / "0000002.pt")
    summary = train(tiny_cfg(tmp_path / "b", "--cls", "0.03", "--resume-step", "2", steps=3, ckpt_every=3))
    with open(os.path.join(summary["run_dir"], "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [3] and log[0]["cls"] > 0
    with pytest.raises(CheckpointError, match="cls_projectors2"):  # into a REPA run: refused, naming the keys
        train(tiny_cfg(tmp_path / "b", "--resume-step", "2", "--exp-name", "run", steps=3, ckpt_every=3))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_generate_refuses_a_non_finite_cls_cfg_scale_before_loading(tmp_path, capsys, bad):
    from repa_fast.errors import ConfigError
    from repa_fast.generate import main

    with pytest.raises(ConfigError, match="cls-cfg-scale must be finite"):
        SamplingOptions(cls_cfg_scale=float(bad))
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--cls-cfg-scale", bad]) == 2
    err = capsys.readouterr().err
    assert "cls" in err and "finite" in err and "Traceback" not in err
