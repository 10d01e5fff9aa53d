"""Damaged checkpoints (issue 20 item 1): refused with exit code 2 naming the file, the newest intact checkpoint and
the command that resumes from it; the run directory stays byte-identical; nothing non-finite is ever written, read
or rotated in place of an intact checkpoint."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.engine.checkpoint import CheckpointError

from .common import ckpt, flip_byte, refused, tiny_args, trained


def _remanifest(path: str) -> None:
    """Rewrite a checkpoint's manifest after an edit (as a writer that did not check its tensors would have)."""
    ckpt.write_manifest(path, int(os.path.basename(path)))
    ckpt._VERIFIED.pop(path, None)


def test_flipped_bytes_in_the_optimizer_state_are_refused_naming_the_intact_checkpoint_and_command(tmp_path, capsys):
    run = trained(tmp_path)
    flip_byte(os.path.join(ckpt.step_dir(run, 4), "state.pt"), 300)
    argv = tiny_args(tmp_path, "--resume", steps=6)
    err = refused(capsys, tmp_path, argv, errors.EXIT_USER, "state.pt does not match its SHA-256",
                  f"newest intact checkpoint is {ckpt.step_dir(run, 2)}", "--resume-step 2")  # fmt: skip
    command = err.split("continue from it with: ")[1].split(" (--debug")[0]
    assert command.startswith("python train.py ") and command.endswith(" --resume-step 2")
    assert "--resume " not in command + " "  # the command resumes from step 2, not the damaged latest
    assert main(command.split()[2:]) == 0  # the suggested command works


def test_a_checkpoint_without_its_manifest_is_incomplete(tmp_path, capsys):
    run = trained(tmp_path)
    os.remove(os.path.join(ckpt.step_dir(run, 4), ckpt.MANIFEST))
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "no manifest.json", f"newest intact checkpoint is {ckpt.step_dir(run, 2)}")  # fmt: skip


def test_nan_weights_with_a_matching_manifest_are_refused_naming_file_and_tensor(tmp_path, capsys):
    run = trained(tmp_path)
    path = ckpt.step_dir(run, 4)
    sd = load_file(os.path.join(path, "model.safetensors"))
    name = sorted(sd)[len(sd) // 2]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[torch.randint(sd[name].numel(), ())] = float("nan")
    save_file(sd, os.path.join(path, "model.safetensors"))
    _remanifest(path)
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "model.safetensors", f"tensor {name}", "NaN/inf")  # fmt: skip


def test_huge_or_nan_optimizer_moments_are_refused(tmp_path, capsys):
    run = trained(tmp_path)
    path = ckpt.step_dir(run, 4)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    key = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][key]["exp_avg_sq"].view(-1)[0] = float("inf")
    torch.save(state, os.path.join(path, "state.pt"))
    _remanifest(path)
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "state.pt", f"optimizer.state.{key}.exp_avg_sq")  # fmt: skip


def test_a_missing_rng_file_says_the_resume_would_not_be_bitwise(tmp_path, capsys):
    run = trained(tmp_path)
    os.remove(os.path.join(ckpt.step_dir(run, 4), "rng", "rank0.pt"))
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "rank0.pt is missing", "random streams", "bitwise")  # fmt: skip
    _remanifest(ckpt.step_dir(run, 4))  # a manifest that never listed it: the file was never written
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "rng/rank0.pt is missing", "bitwise")  # fmt: skip


def test_a_corrupt_state_file_never_suggests_unsafe_unpickling(tmp_path, capsys):
    run = trained(tmp_path)
    path = ckpt.step_dir(run, 4)
    with open(os.path.join(path, "state.pt"), "wb") as f:
        f.write(os.urandom(512))
    _remanifest(path)  # the hashes match: only the reader can tell
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", steps=6), errors.EXIT_USER,
            "cannot read checkpoint file", "state.pt", "truncated or corrupt")  # fmt: skip


def test_a_pre_manifest_checkpoint_resumes_with_a_warning(tmp_path, capsys):
    run = trained(tmp_path)
    path = ckpt.step_dir(run, 4)
    os.remove(os.path.join(path, ckpt.MANIFEST))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    state["format_version"] = 1  # as repa_fast wrote it before the manifest
    torch.save(state, os.path.join(path, "state.pt"))
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "--resume", steps=6)) == 0
    assert "has no manifest.json (an older repa_fast)" in capsys.readouterr().err


def test_non_finite_weights_are_never_written_and_rotation_keeps_the_newest_intact(tmp_path):
    run = str(tmp_path)
    good = {"w": torch.randn(5, 3)}
    state = {"optimizer": {"state": {}, "param_groups": []}, "sampler": {}, "config": {}}
    ckpt.write_checkpoint(run, 2, model_sd=good, ema_sd=good, state=state, keep=2)
    bad = {"w": good["w"].clone()}
    bad["w"][1, 2] = float("inf")
    with pytest.raises(errors.TrainingDiverged, match=r"model\.safetensors tensor w is non-finite.*0000002"):
        ckpt.write_checkpoint(run, 3, model_sd=bad, ema_sd=good, state=state, keep=2)
    assert ckpt.list_checkpoints(run) == [2] and sorted(os.listdir(ckpt.checkpoint_root(run))) == ["0000002"]
    # A newer checkpoint that does not verify neither counts towards keep nor pushes the intact one out.
    ckpt.write_checkpoint(run, 4, model_sd=good, ema_sd=good, state=state, keep=2)
    flip_byte(os.path.join(ckpt.step_dir(run, 4), "ema.safetensors"), 8)
    ckpt.write_checkpoint(run, 1, model_sd=good, ema_sd=good, state=state, keep=2)  # an earlier timeline's step
    assert ckpt.list_checkpoints(run) == [1, 2, 4]  # 2 is the newest intact other: kept; damaged 4 is left
    assert ckpt.newest_intact(run) == 2
    ckpt.write_checkpoint(run, 5, model_sd=good, ema_sd=good, state=state, keep=2)
    assert ckpt.list_checkpoints(run) == [2, 4, 5]  # 1 rotated out, 2 stays as the one intact other


def test_readers_verify_and_only_see_complete_checkpoints(tmp_path, capsys):
    from repa_fast import export
    from repa_fast.engine.checkpoint import load_run

    run = trained(tmp_path)
    os.makedirs(os.path.join(ckpt.checkpoint_root(run), "0000009"))  # a step directory without a manifest
    assert load_run(run).step == 4  # the newest complete checkpoint
    flip_byte(os.path.join(ckpt.step_dir(run, 4), "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"0000004.*ema\.safetensors does not match.*0000002"):
        load_run(run)
    out = tmp_path / "x.pt"
    assert export.main([run, str(out), "--ref-layout"]) == errors.EXIT_USER
    assert "newest intact checkpoint" in capsys.readouterr().err and not out.exists()
    assert load_run(ckpt.step_dir(run, 2)).step == 2  # the intact one named in the message reads
    manifest = json.load(open(os.path.join(ckpt.step_dir(run, 2), ckpt.MANIFEST)))
    assert set(manifest["files"]) >= {"model.safetensors", "ema.safetensors", "state.pt", "rng/rank0.pt"}
