"""ERW end to end (repa_fast.recipe + the trainer): the warm-up phase, the switch to full training, resume."""

import os

import pytest
import torch
from safetensors.torch import load_file

from repa_fast.engine import checkpoint as ckpt
from repa_fast.objective import warmup_loss

from .helpers import FAULT_ENTRY, StepRig, run_train, tiny_args, tiny_cfg

ERW = ["--warmup-steps", 3, "--l2r-depth", 2, "--encoder-depth", 3]
WARM_PREFIXES = ("blocks.0.", "blocks.1.", "x_embedder.", "t_embedder.", "y_embedder.", "projectors.")


def _rig(tmp_path, *extra):
    torch.manual_seed(0)
    return StepRig(tiny_cfg(tmp_path, *ERW, "--use-rope", *extra, steps=8))


def test_warmup_step_trains_exactly_the_first_blocks_embedders_and_projectors(tmp_path):
    rig = _rig(tmp_path)
    model = rig.model
    assert rig.state.phase.name == "warmup"
    rig.enter(rig.state.phase)  # the trainer's entry: freeze, fresh optimizer over the phase's set
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith(WARM_PREFIXES)}
    called = []  # nothing after block l2r-depth runs: no later block, no final layer
    for name in ("blocks.2", "blocks.5", "final_layer"):
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: called.append(name))
    seen = {}
    model.t_embedder.register_forward_pre_hook(lambda m, a: seen.setdefault("t", a[0].clone()))
    model.x_embedder.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    rig.meter.add_losses(losses := rig.micro_step())
    rig.T.optimizer_step(rig.cfg, rig.state, rig.backend, rig.meter)
    assert called == []
    assert losses["denoising"].item() == 0.0 and losses["loss"].item() == pytest.approx(
        0.5 * losses["alignment"].item()
    )
    assert torch.equal(seen["t"], torch.zeros_like(seen["t"]))  # t = 0
    image, moments, _ = rig.batch
    assert torch.equal(seen["x"], moments[:, :3])  # the clean latent (demo posterior has std 0, scale 1)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    opt_params = {id(p) for g in rig.state.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(model.get_parameter(n)) for n in trainable}
    # adaLN-Zero gates start at zero: the first step moves the modulations, patch embedder and projectors.
    for prefix in ("blocks.0.adaLN", "blocks.1.adaLN", "x_embedder.", "projectors.0."):
        assert any(not torch.equal(model.get_parameter(n), before[n]) for n in trainable if n.startswith(prefix))


def test_warmup_loss_is_the_mean_of_a_per_sample_loop(tmp_path):
    rig = _rig(tmp_path)
    model = rig.model.eval()  # no label dropout: the loop sees the same labels
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (5,), generator=g)
    for block in model.blocks:  # non-zero adaLN so the blocks do something
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05, generator=g)

    def one(b):
        h = model.x_embedder(x0[b : b + 1]) + model.pos_embed
        c = model.t_embedder(torch.zeros(1)) + model.y_embedder(y[b : b + 1], False)
        for block in model.blocks[:2]:
            h = block(h, c, None)  # RoPE off in the warm-up
        return model.projectors[0](h)[0]  # (T, z_dim)

    with torch.no_grad():  # targets: the sample's own features plus noise of growing size -> per-sample losses differ
        own = torch.stack([one(b) for b in range(5)])
        targets = [own + torch.arange(5.0).view(5, 1, 1) * torch.randn(own.shape, generator=g)]
    got = warmup_loss(model, x0, y, targets, num_blocks=2, proj_coeff=0.7, impl="ref")["loss"]
    per_sample = [-torch.nn.functional.cosine_similarity(one(b), targets[0][b], dim=-1).mean() for b in range(5)]
    want = 0.7 * torch.stack(per_sample).mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    last_only = 0.7 * per_sample[-1] / 5  # ERW's released warm-up loss keeps only the last sample (loss.py:56-61)
    assert want.item() < -0.2 and abs(want.item() - last_only.item()) > 0.05


def _ckpt_model(run, step):
    return load_file(os.path.join(ckpt.step_dir(run, step), "model.safetensors"))


def _final(run, step):
    path = ckpt.step_dir(run, step)
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True)
    return _ckpt_model(run, step), load_file(os.path.join(path, "ema.safetensors")), state


def _assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    oa, ob = a[2]["optimizer"]["state"], b[2]["optimizer"]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for n in oa:
        for k in oa[n]:
            assert torch.equal(oa[n][k], ob[n][k]), (n, k)
    assert a[2]["sampler"] == b[2]["sampler"] and a[2]["phase"] == b[2]["phase"] == "full"


@pytest.mark.slow
def test_kill_and_resume_across_the_erw_boundary_is_bitwise(tmp_path):
    args = lambda out, *x: tiny_args(out, *ERW, *x, steps=6, ckpt_every=2)  # noqa: E731
    straight = run_train(args(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_a = str(tmp_path / "a" / "run")
    assert ckpt.list_checkpoints(run_a)[-2:] == [4, 6]
    assert "phase full" in straight.stderr
    # The boundary (step 3) was saved; its weights are the warm-up's for the first blocks and a fresh init elsewhere.
    boundary = _ckpt_model(run_a, 3)
    from repa_fast import build as B

    cfg = tiny_cfg(tmp_path / "fresh", *ERW)
    B.seed_everything(cfg.run.seed)
    fresh, _ = B.build_models(cfg, B.build_dataset(cfg), torch.device("cpu"))
    fresh_sd = fresh.state_dict()
    for k, v in boundary.items():
        if k.startswith(("blocks.0.attn.qkv", "blocks.1.mlp", "x_embedder", "projectors")):
            assert not torch.equal(v, fresh_sd[k]), f"{k} did not train in the warm-up"
        elif not k.startswith(WARM_PREFIXES):
            assert torch.equal(v, fresh_sd[k]), f"{k} is not the fresh init"

    # Killed inside the warm-up (after step 3, before its save): resume from step 2 crosses the boundary live.
    b = tmp_path / "b"
    killed = run_train(args(b), {"REPA_FAST_FAULT": "after_step:3"}, script=FAULT_ENTRY)
    assert killed.returncode == -9 and ckpt.list_checkpoints(str(b / "run")) == [2]
    resumed = run_train(args(b, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_final(run_a, 6), _final(str(b / "run"), 6))

    # Killed after step 4, before its save: resume from the boundary checkpoint itself (weights-only hand-over).
    c = tmp_path / "c"
    killed = run_train(args(c), {"REPA_FAST_FAULT": "after_step:4"}, script=FAULT_ENTRY)
    assert killed.returncode == -9 and ckpt.list_checkpoints(str(c / "run")) == [2, 3]
    resumed = run_train(args(c, "--resume-step", 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ends phase warmup" in resumed.stderr
    _assert_same(_final(run_a, 6), _final(str(c / "run"), 6))


def _foreign_file(path, sd, *, steps, opt=None, **args):
    import argparse

    blob = {"model": sd, "ema": sd, "args": argparse.Namespace(**args), "steps": steps}
    if opt is not None:
        blob["opt"] = opt
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(blob, path)


def test_erw_release_warmup_file_starts_the_full_phase_and_reference_files_resume(tmp_path):
    from repa_fast import build as B
    from repa_fast.engine import trainer as T

    cfg = tiny_cfg(tmp_path, *ERW, steps=4)
    B.seed_everything(cfg.run.seed)
    model, _ = B.build_models(cfg, B.build_dataset(cfg), torch.device("cpu"))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # ERW's released warm-up file: blocks < l2r-depth, embedders, projectors; no final layer. Weights moved by +0.5.
    warm = {k: v + 0.5 for k, v in init.items() if k.startswith(WARM_PREFIXES) or k == "pos_embed"}
    warm["pos_embed"] = init["pos_embed"]
    run = os.path.join(cfg.run.output_dir, cfg.run.exp_name)
    _foreign_file(os.path.join(run, "checkpoints", "0000003.pt"), warm, steps=3, model=cfg.model.model, use_rope=False)
    summary = T.train(tiny_cfg(tmp_path, *ERW, "--resume-step", 3, steps=4))
    assert summary["step"] == 4
    log = open(os.path.join(run, "train.log")).read()
    assert "ends phase warmup" in log and "not restored: data position, RNG streams" in log
    after = load_file(os.path.join(ckpt.step_dir(run, 4), "model.safetensors"))
    k_warm, k_rest = "blocks.1.mlp.fc1.weight", "blocks.4.mlp.fc1.weight"
    assert (after[k_warm] - warm[k_warm]).abs().max() < 0.01 < 0.4 < (after[k_warm] - init[k_warm]).abs().min()
    assert (after[k_rest] - init[k_rest]).abs().max() < 0.01  # one step from the fresh init
    assert torch.load(os.path.join(ckpt.step_dir(run, 4), "state.pt"), weights_only=True)["phase"] == "full"

    # A reference train.py checkpoint (full model, index-keyed AdamW with frozen pos_embed) resumes with its moments.
    ref_out = tmp_path / "ref"
    cfg_r = tiny_cfg(ref_out, steps=3)
    B.seed_everything(1)
    ref_model, _ = B.build_models(cfg_r, B.build_dataset(cfg_r), torch.device("cpu"))
    opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    for p in ref_model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    ref_run = os.path.join(cfg_r.run.output_dir, cfg_r.run.exp_name)
    _foreign_file(os.path.join(ref_run, "checkpoints", "0000002.pt"), ref_model.state_dict(), steps=2,
                  opt=opt.state_dict(), model=cfg_r.model.model)  # fmt: skip
    assert T.train(tiny_cfg(ref_out, "--resume-step", 2, steps=3))["step"] == 3
    saved = torch.load(os.path.join(ckpt.step_dir(ref_run, 3), "state.pt"), weights_only=True)
    w = ref_model.get_parameter(k_warm)
    # Two AdamW steps in all: the reference's step and ours (the moments continued, not restarted).
    assert int(saved["optimizer"]["state"][k_warm]["step"]) == 2
    assert "pos_embed" not in saved["optimizer"]["state"]
    assert not torch.equal(saved["optimizer"]["state"][k_warm]["exp_avg"], torch.zeros_like(w))


def test_haste_alignment_stops_and_projectors_freeze(tmp_path):
    import json

    from repa_fast.engine import trainer as T

    cfg = tiny_cfg(tmp_path, "--align-stop-step", 2, steps=3, ckpt_every=1)
    assert T.train(cfg)["step"] == 3
    run = os.path.join(cfg.run.output_dir, cfg.run.exp_name)
    logs = {r["step"]: r for r in map(json.loads, open(os.path.join(run, "log.jsonl")))}
    assert logs[2]["alignment"] < 0 and logs[3]["alignment"] == 0.0 and logs[3]["denoising"] > 0
    before, after = _ckpt_model(run, 2), _ckpt_model(run, 3)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("projectors."))
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    state = torch.load(os.path.join(ckpt.step_dir(run, 3), "state.pt"), weights_only=True)
    assert state["phase"] == "no-align" and not any(k.startswith("projectors.") for k in state["optimizer"]["state"])
