"""The training recipe as data: phases, trainable sets and alignment-weight laws (repa_fast.recipe)."""

import math

import pytest

from repa_fast.cli import resolve_config
from repa_fast.recipe import Weight, build_recipe, erw_c0


def _cfg(*extra):
    cfg, _ = resolve_config(["--preset", "demo", *map(str, extra)])
    return cfg


@pytest.mark.parametrize(
    "name, c0", [("SiT-XL/2", 6.0), ("SiT-L/2", 3.0), ("SiT-B/2", 1.0), ("SiT-S/4", 1.0), ("SiT-T/2", 1.0)]
)
def test_erw_c0_follows_erw_name_tests_xl_before_l(name, c0):
    assert erw_c0(name) == c0


@pytest.mark.parametrize("model, c0", [("SiT-XL/2", 6.0), ("SiT-L/2", 3.0), ("SiT-B/2", 1.0)])
def test_erw_lambda_at_w_and_one_and_two_half_lives(model, c0):
    w = 100_000
    cfg = _cfg("--model", model, "--warmup-steps", w, "--max-train-steps", 400_000)  # auto: ERW's exp decay
    recipe = build_recipe(cfg)
    full = recipe.phase(w)
    assert full.name == "full" and recipe.phase(w - 1).name == "warmup"
    assert full.align_weight(w) == c0
    assert full.align_weight(w + 50_000) == c0 / 2
    assert full.align_weight(w + 100_000) == c0 / 4
    # ERW clamps the decay at max_train_steps - warmup_steps (train.py:172-174).
    assert full.align_weight(10**7) == c0 * 2.0 ** (-300_000 / 50_000)
    # The warm-up phase's weight is --proj-coeff, constant.
    assert recipe.phase(0).align_weight(0) == recipe.phase(w - 1).align_weight(w - 1) == 0.5


def test_erw_readme_command_line_gives_erws_recipe(capsys):
    import json

    from repa_fast.cli import main

    # LINs-lab/ERW README "Training from Scratch", verbatim flags (accelerate launch train.py ...).
    argv = ["--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0", "--path-type=linear",
            "--prediction=v", "--weighting=uniform", "--model=SiT-XL/2", "--enc-type=dinov2-vit-b",
            "--encoder-depth=14", "--output-dir=exps", "--exp-name=erw-linear-dinov2-b-enc14",
            "--max-train-steps", "300000", "--checkpointing-steps", "50000", "--warmup-steps", "100000",
            "--use_rope", "--data-dir=/data/imagenet256", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    warm, full = out["recipe"]
    assert warm["steps"] == [0, 100000] and warm["forward"] == "first 4 blocks" and warm["rope"] == "off"
    assert full["loss"] == "L_den + 6 * 2^(-(step - 100000) / 50000) x L_proj" and full["align_block"] == 14
    assert out["trainer"]["use_rope"] is True and out["trainer"]["l2r_depth"] == 4


def test_our_flags_override_c0_and_half_life():
    cfg = _cfg(
        "--model", "SiT-XL/2", "--warmup-steps", 10, "--proj-coeff-schedule", "exp", "--proj-coeff-start", 2.5,
        "--proj-half-life", 20, "--max-train-steps", 1000,
    )  # fmt: skip
    full = build_recipe(cfg).phase(10)
    assert full.align_weight(10) == 2.5 and full.align_weight(30) == 1.25 and full.align_weight(50) == 0.625


def test_repa_recipe_is_one_constant_phase():
    cfg = _cfg("--proj-coeff", 0.7, "--max-train-steps", 50)
    recipe = build_recipe(cfg)
    assert len(recipe.phases) == 1 and recipe.boundaries() == []
    p = recipe.phase(0)
    assert p.trains("blocks.5.mlp.fc1.weight") and p.denoising and not p.clean_input
    assert p.align_weight(0) == p.align_weight(49) == 0.7


def test_cosine_weight_goes_to_zero_at_the_end():
    w = Weight(1.5, "cosine", start=10, end=110)
    assert w(10) == 1.5 and math.isclose(w(60), 0.75) and math.isclose(w(110), 0.0, abs_tol=1e-12)
    assert w(5) == 1.5 and math.isclose(w(500), 0.0, abs_tol=1e-12)


def test_haste_alignment_off_after_step():
    cfg = _cfg("--align-stop-step", 30, "--max-train-steps", 100)
    recipe = build_recipe(cfg)
    assert recipe.boundaries() == [30]
    assert recipe.phase(29).align_weight(29) == 0.5
    late = recipe.phase(30)
    assert late.name == "no-align" and late.align_weight(30) == 0.0 and not late.align
    assert not late.trains("projectors.0.0.weight") and late.trains("blocks.0.attn.qkv.weight")


def test_erw_warmup_trains_first_blocks_embedders_projectors_only():
    cfg = _cfg("--warmup-steps", 5, "--l2r-depth", 2, "--max-train-steps", 20)
    warm = build_recipe(cfg).phase(0)
    assert warm.num_blocks == 2 and warm.align_depth == 2 and warm.clean_input and not warm.denoising
    assert warm.use_rope is False
    for name in ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "x_embedder.proj.weight",
                 "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight", "projectors.0.4.weight"]:  # fmt: skip
        assert warm.trains(name), name
    for name in ["blocks.2.attn.qkv.weight", "blocks.10.mlp.fc1.weight", "final_layer.linear.weight"]:
        assert not warm.trains(name), name


def test_dry_run_prints_both_erw_phases(capsys):
    import json

    from repa_fast.cli import main

    assert main(["--preset", "erw-demo", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    phases = out["recipe"]
    assert [p["phase"] for p in phases] == ["warmup", "full"]
    assert phases[0]["steps"] == [0, 100] and phases[1]["steps"] == [100, 400]
    assert "L_den" not in phases[0]["loss"] and "L_den" in phases[1]["loss"]


def test_erw_flag_spellings_are_accepted():
    cfg, _ = resolve_config(
        ["--preset", "demo", "--warmup-steps", "3", "--l2r-depth", "2", "--no-use_rope", "--qk-norm",
         "--encoder-depth", "4", "--max-train-steps", "9", "--checkpointing-steps", "3", "--epochs", "7"]
    )  # fmt: skip
    assert cfg.loss.warmup_steps == 3 and cfg.model.l2r_depth == 2 and cfg.model.use_rope is False
    assert cfg.model.qk_norm and cfg.model.encoder_depth == 4 and cfg.run.epochs == 7
    cfg2, _ = resolve_config(["--preset", "demo", "--use_rope"])
    assert cfg2.model.use_rope is True


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--warmup-steps", "50", "--max-train-steps", "50"], "leaves no full training"),
        (["--warmup-steps", "5", "--l2r-depth", "99"], "--l2r-depth 99"),
        (["--warmup-steps", "5", "--proj-coeff", "0"], "needs --enc-type"),
        (["--warmup-steps", "5", "--align-stop-step", "3"], "must be after --warmup-steps"),
    ],
)
def test_bad_recipe_options_are_config_errors(extra, words):
    from repa_fast.config import ConfigError

    with pytest.raises(ConfigError, match=words.replace("-", "\\-")):
        resolve_config(["--preset", "demo", *extra])


@pytest.mark.parametrize("phase", [["--warmup-steps", "5"], ["--align-stop-step", "5"]], ids=["erw", "haste"])
def test_phase_changes_under_fsdp_are_accepted(phase):
    """Once refused (the wrapper could not be rebuilt); Backend.unshard rebuilds it now (test_method_matrix.py)."""
    cfg, _ = resolve_config(["--preset", "demo", *phase, "--parallel", "fsdp"])
    assert cfg.run.parallel == "fsdp"
