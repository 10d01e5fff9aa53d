"""CLI: reference flags, precedence, --dry-run, --config, and a clear error for every bad option."""

import json
import os
import re

import pytest

from repa_fast.cli import main, resolve_config

from .helpers import REPO, run_train, tiny_args

REFERENCE_FLAGS = [
    "--model",
    "--enc-type",
    "--encoder-depth",
    "--proj-coeff",
    "--path-type",
    "--prediction",
    "--weighting",
    "--batch-size",
    "--learning-rate",
    "--adam-beta1",
    "--adam-beta2",
    "--adam-weight-decay",
    "--adam-epsilon",
    "--max-grad-norm",
    "--mixed-precision",
    "--allow-tf32",
    "--seed",
    "--max-train-steps",
    "--checkpointing-steps",
    "--sampling-steps",
    "--resume-step",
    "--data-dir",
    "--resolution",
    "--output-dir",
    "--exp-name",
    "--report-to",
    "--num-workers",
    "--cfg-prob",
    "--legacy",
    "--qk-norm",
    "--fused-attn",
    "--no-fused-attn",
    "--no-qk-norm",
    "--gradient-accumulation-steps",
    "--epochs",
    "--num-classes",
    "--logging-dir",
]


def test_reference_command_line_parses_with_reference_defaults(tmp_path):
    readme_cmd = [
        "--allow-tf32",
        "--mixed-precision=fp16",
        "--seed=0",
        "--path-type=linear",
        "--prediction=v",
        "--weighting=uniform",
        "--model=SiT-XL/2",
        "--enc-type=dinov2-vit-b",
        "--proj-coeff=0.5",
        "--encoder-depth=8",
        "--output-dir=exps",
        "--exp-name=linear-dinov2-b-enc8",
        "--data-dir=../data/imagenet256",
    ]
    cfg, dry = resolve_config(readme_cmd)
    flat = cfg.flat()
    assert not dry and flat["model"] == "SiT-XL/2" and flat["mixed_precision"] == "fp16" and flat["allow_tf32"]
    ref_defaults = {
        "batch_size": 256,
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 0.0,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "max_train_steps": 400000,
        "checkpointing_steps": 50000,
        "sampling_steps": 10000,
        "num_workers": 4,
        "cfg_prob": 0.1,
        "fused_attn": True,
        "qk_norm": False,
        "legacy": False,
        "resolution": 256,
        "num_classes": 1000,
        "epochs": 1400,
        "gradient_accumulation_steps": 1,
        "ema_decay": 0.9999,
    }
    assert {k: flat[k] for k in ref_defaults} == ref_defaults


def test_every_reference_flag_exists(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    missing = [f for f in REFERENCE_FLAGS if f not in text]
    assert not missing


def test_precedence_preset_config_cli_and_dry_run(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "trainer": {"model": "SiT-B/2", "encoder_depth": 4, "batch_size": 128, "data_dir": "/data"},
                "deepspeed": {"zero_optimization": {"stage": 2}},
            }
        )
    )
    assert main(["--config", str(path), "--batch-size", "64", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    t = out["trainer"]
    assert (t["model"], t["encoder_depth"], t["batch_size"], t["data_dir"]) == ("SiT-B/2", 4, 64, "/data")
    assert out["deepspeed"] == {"zero_optimization": {"stage": 2}}
    assert t["exp_name"] == "SiT-B_2-dinov2-vit-b-d4"


def test_no_data_flags_means_demo_preset():
    cfg, _ = resolve_config([])
    assert cfg.data.dataset == "digits" and cfg.model.model == "SiT-T/2" and cfg.run.exp_name == "demo"


def test_written_config_round_trips(tmp_path):
    r = run_train(tiny_args(tmp_path, steps=1, ckpt_every=1))
    assert r.returncode == 0, r.stderr[-2000:]
    written = tmp_path / "run" / "config.json"
    cfg, _ = resolve_config(["--config", str(written)])
    with open(written) as f:
        assert cfg.to_json() == json.load(f)
    for name in ("config.json", "log.jsonl", "loss_curve.png", "train.log"):
        assert os.path.isfile(tmp_path / "run" / name), name


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "SiT-XXL/2", "--dry-run"], "--model 'SiT-XXL/2' is unknown; choose one of"),
        (["--enc-type", "dinov3-vit-b", "--dry-run"], "--enc-type: .*dinov3-vit-b"),
        (["--enc-type", "mocov3-resnet-50", "--dry-run"], "--enc-type: .*not implemented"),
        (["--enc-type", "clip-vit-L", "--resolution", "512", "--dry-run"], "--enc-type: .*256x256 images only"),
        (["--encoder-depth", "13", "--model", "SiT-B/2", "--data-dir", "x", "--dry-run"], "outside 1..12 for SiT-B/2"),
        (["--batch-size", "0", "--dry-run"], "--batch-size must be >= 1"),
        (["--resume", "--resume-step", "5", "--dry-run"], "--resume and --resume-step both given"),
        (["--preset", "sit-xl-repa", "--dry-run"], "no --data-dir"),
    ],
)
def test_bad_options_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_global_batch_not_divisible_by_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--batch-size", "64", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 64 (global) is not divisible by processes x accumulation = 3 x 1 = 3" in err


def test_unknown_key_in_config_file_names_file_and_suggestion(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"trainer": {"encoder_dept": 4}}))
    assert main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'encoder_dept'" in err and "encoder_depth" in err
    path.write_text("{not json")
    assert main(["--config", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--encoder-dept", "4"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_output_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(tiny_args(blocker / "sub", steps=1)) == 2
    assert "cannot write to" in capsys.readouterr().err


def test_missing_data_dir_is_clear(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    assert "data directory does not exist" in capsys.readouterr().err


def test_resume_step_that_does_not_exist(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--resume-step", "7", steps=1)) == 2
    err = capsys.readouterr().err
    assert "--resume-step 7" in err and "available steps: none" in err


def test_train_py_is_thin():
    with open(os.path.join(REPO, "train.py")) as f:
        code = [line for line in f if line.strip() and not line.lstrip().startswith(("#", '"'))]
    assert len(code) < 15  # the loop lives in the package


@pytest.mark.parametrize(
    "trainer,message",
    [
        ({"mixed_precision": "fp32"}, r"'mixed_precision' must be one of \['no', 'fp16', 'bf16'\], got 'fp32'"),
        ({"path_type": "edm"}, r"'path_type' must be one of"),
        ({"batch_size": "64"}, r"'batch_size' takes a int, got '64'"),
        ({"qk_norm": 1}, r"'qk_norm' takes a bool, got 1"),
        ({"preview_cfg_scale": 0.5}, r"'preview_cfg_scale' \(--preview-cfg-scale\) must be >= 1 \(1 = no guidance\)"),
    ],
)
def test_config_file_values_are_type_and_choice_checked(tmp_path, capsys, trainer, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"trainer": trainer}))
    assert main(["--config", str(path), "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_int_widens_to_float_in_config_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"trainer": {"learning_rate": 1, "proj_coeff": 0, "dataset": "digits"}}))
    assert main(["--config", str(path), "--dry-run"]) == 0
    t = json.loads(capsys.readouterr().out)["trainer"]
    assert t["learning_rate"] == 1.0 and isinstance(t["learning_rate"], float)


def test_resume_with_other_architecture_is_a_clear_error(tmp_path, capsys):
    assert run_train(tiny_args(tmp_path, steps=1, ckpt_every=1)).returncode == 0
    assert main(tiny_args(tmp_path, "--resume", "--projector-dim", "128", steps=2, ckpt_every=1)) == 2
    err = capsys.readouterr().err
    assert "was trained with --projector-dim 256 (this run: 128)" in err and "--exp-name" in err
