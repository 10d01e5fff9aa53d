"""Options on --resume take effect or are refused, never ignored (issue 20 item 4; engine/resume_policy.py)."""

import json
import os

import pytest
import torch

from repa_fast import errors
from repa_fast.cli import main
from repa_fast.config import field_specs, weight_options
from repa_fast.engine import resume_policy

from .common import ckpt, refused, tiny_args, trained


def test_every_option_has_exactly_one_resume_class():
    classes = (set(resume_policy.APPLIED), set(resume_policy.FREE), set(resume_policy.REFUSED_EXTRA))
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
    unclassified = [k for k, c in resume_policy.table().items() if c is None]
    assert unclassified == [], f"classify these options in repa_fast/engine/resume_policy.py: {unclassified}"
    names = {name for name, _ in field_specs()}
    assert set().union(*classes) <= names, set().union(*classes) - names  # no stale names in the table
    assert all(resume_policy.resume_class(k) == "refused" for k in weight_options())


def test_learning_rate_and_optimizer_options_apply_on_resume_and_are_logged(tmp_path, capsys):
    run = trained(tmp_path, "--learning-rate", "1e-3")
    lr, beta2, wd = 3.7e-4, 0.995, 0.031
    capsys.readouterr()
    argv = tiny_args(tmp_path, "--resume", "--learning-rate", lr, "--adam-beta2", beta2, "--adam-weight-decay", wd,
                     "--ema-decay", 0.97, steps=6)  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "--learning-rate 0.00037 applied (the checkpoint" in err and "had 0.001" in err
    assert err.count("--learning-rate 0.00037 applied") == 1 and "--ema-decay 0.97 applied" in err
    (group,) = torch.load(os.path.join(ckpt.step_dir(run, 6), "state.pt"), weights_only=True)["optimizer"][
        "param_groups"
    ]
    assert (group["lr"], group["betas"][1], group["weight_decay"]) == (lr, beta2, wd)
    trainer = json.load(open(os.path.join(run, "config.json")))["trainer"]
    assert (trainer["learning_rate"], trainer["adam_beta2"], trainer["ema_decay"]) == (lr, beta2, 0.97)


def test_the_applied_learning_rate_changes_the_update(tmp_path):
    """Not just the recorded value: the step after the resume moves the weights by the new learning rate."""
    trained(tmp_path / "a", steps=2, ckpt_every=2)
    trained(tmp_path / "b", steps=2, ckpt_every=2)
    assert main(tiny_args(tmp_path / "a", "--resume", steps=3, ckpt_every=1)) == 0
    assert main(tiny_args(tmp_path / "b", "--resume", "--learning-rate", "1e-2", steps=3, ckpt_every=1)) == 0
    w = [ckpt.read_checkpoint(ckpt.step_dir(str(tmp_path / r / "run"), s))["model"] for r in "ab" for s in (2, 3)]
    k = next(k for k in w[0] if w[0][k].dtype.is_floating_point and not torch.equal(w[0][k], w[1][k]))
    da, db = (w[1][k] - w[0][k]).abs().mean(), (w[3][k] - w[2][k]).abs().mean()
    assert db > 3 * da  # 10x the demo's 1e-3 (Adam's step scales with the learning rate)


@pytest.mark.parametrize(
    "flag,value,saved",
    [
        ("--path-type", "cosine", "linear"),
        ("--seed", "5", "0"),
        ("--proj-coeff", "0.9", "0.5"),
        ("--model", "SiT-T/2", "SiT-T/4"),
    ],  # fmt: skip
)
def test_refused_options_change_nothing(tmp_path, capsys, flag, value, saved):
    trained(tmp_path)
    extra = ("--encoder-grid", "8") if flag == "--model" else ()
    refused(capsys, tmp_path, tiny_args(tmp_path, "--resume", flag, value, *extra, steps=6), errors.EXIT_USER,
            f"was trained with {flag} {saved} (this run: ", "cannot change on --resume")  # fmt: skip


def test_free_options_just_apply(tmp_path, capsys):
    run = trained(tmp_path)
    argv = tiny_args(tmp_path, "--resume", "--log-every", "2", "--checkpoints-total-limit", "1", steps=6)
    assert main([str(a) for a in argv]) == 0
    assert ckpt.list_checkpoints(run) == [6]


def test_docs_table_lists_every_option_in_its_class():
    """docs/run_directories.md §Resume names each option in the row of its class (the table cannot drift)."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "run_directories.md")) as f:
        text = f.read()
    for cls in ("applied", "free", "refused"):
        row = re.search(rf"^\| {cls} \| ([^|]*) \|", text, flags=re.M).group(1)
        documented = set(re.findall(r"`(--[a-z0-9-]+)`", row))
        expected = {"--" + k.replace("_", "-") for k, c in resume_policy.table().items() if c == cls}
        assert documented == expected, f"{cls}: {sorted(documented ^ expected)}"
