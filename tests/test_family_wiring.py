"""REG and iREPA wired into the product (docs/methods.md): flags, presets, validation, the trainer's class tokens."""

import json
import math
import os

import pytest
import torch

from repa_fast.cli import resolve_config
from repa_fast.config import ConfigError
from repa_fast.engine import checkpoint as ckpt
from repa_fast.engine.trainer import train
from repa_fast.objective import sample_posterior, training_loss

from .engine.helpers import StepRig, tiny_args, tiny_cfg


def _cfg(*argv):
    return resolve_config(list(argv))[0]


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_reg_preset_is_regs_recipe():
    """REG train.sh + train.py:386-436 (Martinser/REG @ 021ea2e)."""
    c = _cfg("--preset", "reg", "--data-dir", "/data/imagenet")
    assert (c.model.model, c.target.enc_type, c.model.encoder_depth) == ("SiT-XL/2", "dinov2-vit-b", 8)
    assert c.model.reg and c.loss.cls == 0.03 and c.loss.proj_coeff == 0.5
    o = c.optim
    assert (o.learning_rate, o.adam_beta1, o.adam_beta2, o.adam_weight_decay, o.adam_epsilon) == (
        1e-4,
        0.9,
        0.999,
        0,
        1e-8,
    )
    assert (o.max_grad_norm, o.batch_size, o.ema_decay) == (1.0, 256, 0.9999)
    assert (c.run.mixed_precision, c.run.allow_tf32) == ("fp16", True)
    assert c.model.projection_layer_type == "mlp" and c.loss.spnorm_method == "none"


def test_irepa_preset_is_irepas_recipe():
    """iREPA ldm/configs/irepa.yaml (conv, proj_coeff 1.0, zscore) + ldm/train.py defaults (alpha 0.6, ...)."""
    c = _cfg("--preset", "irepa", "--data-dir", "/data/imagenet")
    assert (c.model.projection_layer_type, c.model.proj_kwargs_kernel_size) == ("conv", 3)
    assert (c.loss.proj_coeff, c.loss.spnorm_method, c.loss.zscore_alpha) == (1.0, "zscore", 0.6)
    assert not c.model.reg and (c.model.model, c.model.encoder_depth) == ("SiT-XL/2", 8)
    assert (c.run.max_train_steps, c.run.mixed_precision, c.optim.learning_rate) == (400000, "fp16", 1e-4)


@pytest.mark.parametrize("preset", ["reg", "irepa"])
def test_published_presets_need_data(preset):
    with pytest.raises(ConfigError, match="--data-dir"):
        _cfg("--preset", preset)


def test_regs_cls_flag_turns_reg_on_and_off():
    assert _cfg("--preset", "demo", "--cls", "0.05").model.reg is True
    assert _cfg("--preset", "demo", "--cls", "0.05").loss.cls == 0.05
    assert _cfg("--preset", "reg-demo", "--cls", "0").model.reg is False
    assert _cfg("--preset", "demo").model.reg is False
    assert _cfg("--preset", "demo", "--reg").loss.cls == 0.03
    with pytest.raises(ConfigError, match="--cls 0.1 is REG's"):
        _cfg("--preset", "demo", "--no-reg", "--cls", "0.1")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--preset", "reg-demo", "--projection-layer-type", "conv"], "conv is not defined"),
        (["--preset", "reg-demo", "--enc-type", ""], "needs --enc-type"),
        (["--preset", "demo", "--proj-kwargs-kernel-size", "5"], "add --projection-layer-type conv"),
        (["--preset", "demo", "--spnorm-method", "zscore", "--proj-coeff", "0"], "needs --enc-type and --proj-coeff"),
        (["--preset", "demo", "--zscore-alpha", "0.3"], "read with --spnorm-method zscore"),
    ],
)
def test_undefined_combinations_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*argv)


def test_kernel_size_takes_irepas_choices():
    from repa_fast.config import TrainConfig

    with pytest.raises(ConfigError, match="must be one of"):
        TrainConfig().update({"proj_kwargs_kernel_size": 4}, source="test")


@pytest.mark.parametrize("preset,method", [("reg-demo", "REG"), ("irepa-demo", "iREPA")])
def test_dry_run_names_the_method(preset, method, capsys):
    from repa_fast.cli import main

    assert main(["--preset", preset, "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"]["method"] == method
    if method == "REG":
        assert out["method"]["reg"]["cls_coeff"] == 0.03 and "digits-ssl" in out["method"]["reg"]["class_token"]
    else:
        assert out["method"]["irepa"] == {
            "projection_layer_type": "conv", "proj_kernel_size": 3, "spnorm_method": "zscore", "zscore_alpha": 0.6
        }  # fmt: skip


@pytest.mark.parametrize("preset", ["reg-demo", "irepa-demo"])
def test_demo_presets_train(preset, tmp_path):
    """The embedded demo with REG / iREPA on: finite losses, REG's class-token term non-zero, the family's keys."""
    args = ["--preset", preset, "--batch-size", "8", "--log-every", "1", "--sampling-steps", "0", "--report-to"]
    args += ["none", "--output-dir", str(tmp_path), "--max-train-steps", "2", "--checkpointing-steps", "2"]
    summary = train(_cfg(*args))
    records = _log(summary["run_dir"])
    assert len(records) == 2 and all(math.isfinite(r[k]) for r in records for k in ("loss", "denoising", "alignment"))
    weights = ckpt.read_checkpoint(ckpt.step_dir(summary["run_dir"], 2))["model"]
    if preset == "reg-demo":
        assert all(r["cls"] > 0 for r in records)
        for r in records:  # loss = L_den + 0.5 L_proj + 0.03 L_cls
            assert r["loss"] == pytest.approx(r["denoising"] + 0.5 * r["alignment"] + 0.03 * r["cls"], rel=1e-5)
        assert {"cls_projectors2.weight", "wg_norm.weight", "final_layer.linear_cls.weight"} <= set(weights)
        assert weights["pos_embed"].shape[1] == 1 + 64
    else:
        assert all(r["cls"] == 0 for r in records)
        assert weights["projectors.0.projection_layer.weight"].shape[2:] == (3, 3)


def _reg_rig(tmp_path, *extra):
    return StepRig(tiny_cfg(tmp_path, "--cls", "0.03", "--batch-size", "4", "--mixed-precision", "no", *extra))


def test_trainer_feeds_the_encoders_class_tokens(tmp_path):
    """micro_step's loss is training_loss with the encoder's patch tokens and class token (REG train.py:300-321)."""
    rig = _reg_rig(tmp_path, "--spnorm-method", "zscore", "--zscore-alpha", "0.4")
    image, moments, labels = rig.batch
    torch.manual_seed(3)
    got = rig.micro_step()
    torch.manual_seed(3)
    x0 = sample_posterior(moments, rig.cfg.data.latent_scale)
    with torch.no_grad():
        patch, cls = rig.encoders[0](image, with_cls=True)
    want = training_loss(
        rig.state.train_model, x0, labels, [patch], cls_targets=[cls.float()], cls_coeff=0.03, proj_coeff=0.5,
        target_norm="zscore", target_norm_alpha=0.4, impl=rig.model.impl,
    )  # fmt: skip
    for k in ("loss", "denoising", "alignment", "cls"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert want["cls"] > 0
    # The z-score reached the loss: without it the alignment differs.
    torch.manual_seed(3)
    plain = training_loss(
        rig.state.train_model, sample_posterior(moments, rig.cfg.data.latent_scale), labels, [patch],
        cls_targets=[cls.float()], impl=rig.model.impl,
    )  # fmt: skip
    assert abs((plain["alignment"] - want["alignment"]).item()) > 1e-4


def test_reg_class_token_continues_after_the_haste_stop(tmp_path):
    """With REG the class-token term is part of the generative model: after --align-stop-step only L_proj stops."""
    summary = train(tiny_cfg(tmp_path, "--cls", "0.03", "--align-stop-step", "2", steps=3, ckpt_every=3))
    records = _log(summary["run_dir"])
    assert [r["alignment"] != 0 for r in records] == [True, True, False]
    assert all(r["cls"] > 0 for r in records)


def test_reg_in_the_erw_warmup_aligns_over_the_clean_class_token(tmp_path):
    cfg = tiny_cfg(tmp_path, "--cls", "0.03", "--warmup-steps", "1", "--l2r-depth", "1", "--encoder-depth", "2")
    summary = train(cfg)
    records = _log(summary["run_dir"])
    assert records[0]["denoising"] == 0 and records[0]["cls"] == 0 and records[0]["alignment"] != 0
    assert all(r["cls"] > 0 for r in records[1:])


def test_tiny_args_has_no_reg_by_default(tmp_path):
    assert resolve_config(tiny_args(tmp_path))[0].model.reg is False


@pytest.mark.parametrize(
    "family", [["--cls", "0.03"], ["--projection-layer-type", "conv", "--spnorm-method", "zscore"]]
)
def test_reg_and_irepa_runs_resume_bitwise(tmp_path, family):
    straight = train(tiny_cfg(tmp_path / "a", *family, steps=4, ckpt_every=2))
    train(tiny_cfg(tmp_path / "b", *family, steps=2, ckpt_every=2))
    resumed = train(tiny_cfg(tmp_path / "b", *family, "--resume", steps=4, ckpt_every=2))
    a = ckpt.read_checkpoint(ckpt.step_dir(straight["run_dir"], 4))
    b = ckpt.read_checkpoint(ckpt.step_dir(resumed["run_dir"], 4))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert [r["loss"] for r in _log(straight["run_dir"])][2:] == [r["loss"] for r in _log(resumed["run_dir"])][2:]


def test_reg_refuses_an_encoder_without_a_class_token():
    from repa_fast.build import check_class_tokens

    class PatchOnly(torch.nn.Module):
        enc_name = "patch-only"

        def forward(self, images):
            return images

    class WithCls(PatchOnly):
        def forward(self, images, with_cls=False):
            return images

    cfg = _cfg("--preset", "reg-demo")
    check_class_tokens(cfg, [WithCls()])
    with pytest.raises(ConfigError, match="patch-only gives no class token"):
        check_class_tokens(cfg, [WithCls(), PatchOnly()])
    check_class_tokens(_cfg("--preset", "demo"), [PatchOnly()])  # without REG no class token is read
