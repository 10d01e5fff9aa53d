"""repa_fast.cost and bench/step_model.py: shapes pinned to the real model and kernels, the accounting units, the
roofline, memory and batch search, the structures (the cuts reach the code as built), and the CLI's output contract
(issue 18's acceptance command).

The op-by-op comparison with real steps is tests/test_cost_crosscheck.py (and tests/test_cost_options.py for
activation checkpointing, fp8 and the dry-run memory report)."""

import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from bench import step_model
from repa_fast.cost.attention import padding_factor
from repa_fast.cost.hardware import GPUS, Efficiency
from repa_fast.cost.memory import max_batch, memory
from repa_fast.cost.ops import Linear, Op
from repa_fast.cost.shapes import SIT_SIZES, Config, sit_params, sit_shape
from repa_fast.cost.sit import adaln_chunks, bias_gelu_chunks
from repa_fast.cost.step import op_seconds, predict, roofline
from repa_fast.cost.structure import (
    AS_BUILT,
    BEFORE_ISSUE_18,
    OURS,
    REFERENCE,
    StepStructure,
    alternatives,
    cuts,
    parse_act_ckpt,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cost_package_imports_without_torch():
    code = "import sys, repa_fast.cost.step, repa_fast.cost.encoder; assert 'torch' not in sys.modules, 'torch'"
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_sit_sizes_and_parameters_match_the_model():
    from repa_fast.models import sit

    assert SIT_SIZES == sit.SIT_SIZES
    cases = [
        ("SiT-XL/2", (768,), {}),
        ("SiT-B/2", (768, 1024), {}),
        ("SiT-S/4", (384,), {}),
        ("SiT-B/2", (768, 1024), dict(reg=True)),  # REG: pos_embed (1, 1 + T, D), cls_projectors2, wg_norm, linear_cls
        ("SiT-B/2", (768,), dict(projection_layer_type="linear")),  # iREPA
        ("SiT-B/2", (768, 384), dict(projection_layer_type="conv", proj_kernel_size=5)),
    ]
    for name, z_dims, kw in cases:
        with torch.device("meta"):
            model = sit.build_sit(name, input_size=32, z_dims=list(z_dims), encoder_depth=2, **kw)
        real = [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
        assert sit_params(sit_shape(name, 256, z_dims, encoder_depth=2, **kw)) == real, (name, kw)


@pytest.mark.parametrize(
    "tokens,dim,batch",
    [(256, 1152, 2), (256, 1152, 32), (256, 1152, 256), (256, 768, 8), (1024, 1152, 4), (64, 384, 1), (256, 130, 3)],
)
def test_adaln_chunks_match_the_kernel_launcher(tokens, dim, batch):
    from repa_fast.kernels import adaln
    from repa_fast.kernels._dispatch import MODEL_NUM_SMS

    expected = adaln._num_chunks(tokens, dim, torch.device("meta"), batch * tokens)
    assert adaln_chunks(tokens, dim, batch, MODEL_NUM_SMS) == expected


@pytest.mark.parametrize("rows,width", [(512, 3072), (8192, 4608), (514, 3072), (7, 130), (65536, 4096)])
def test_bias_gelu_chunks_match_the_kernel_launcher(rows, width):
    kernel = importlib.import_module("repa_fast.kernels.bias_gelu")  # the package re-exports the function's name

    assert bias_gelu_chunks(rows, width) == kernel._num_chunks(rows, width, torch.device("meta"))


def test_checkpointing_modes_match_the_engine():
    """The torch-free parser and the recomputed blocks agree with engine/activation_checkpoint.py."""
    from repa_fast.engine.activation_checkpoint import checkpointed_modules, parse_ac_mode
    from repa_fast.models.sit import build_sit

    with torch.device("meta"):
        model = build_sit("SiT-S/2", input_size=16, z_dims=[32], depth=7, encoder_depth=2)
    for mode in ("none", "full", "mlp", "every:1", "every:2", "every:3", "every:7", "every:9"):
        assert parse_act_ckpt(mode) == parse_ac_mode(mode)
        blocks, mlp = StepStructure("x", act_ckpt=mode).checkpointed(7)
        want = [f"blocks.{i}" for i in blocks] + ([f"blocks.{i}.mlp" for i in range(7)] if mlp else [])
        assert want == checkpointed_modules(model, mode), mode
    for bad in ("every:0", "every:x", "some", ""):
        with pytest.raises(ValueError, match="act_ckpt"):
            StepStructure("x", act_ckpt=bad)


def test_the_cuts_lead_from_before_issue_18_to_the_code_as_built():
    """The cumulative rows start at the historical structure and end at AS_BUILT, field for field; every merged cut
    changes something; the beyond-the-cuts rows start from AS_BUILT."""
    for world in (1, 8):
        rows = cuts(world)
        assert replace(rows[0], parallel="none") == BEFORE_ISSUE_18
        built = next(i for i, r in enumerate(rows) if r.name == AS_BUILT.name)
        assert replace(rows[built], parallel="none") == AS_BUILT
        assert all(rows[i] != replace(rows[i + 1], name=rows[i].name, note=rows[i].note) for i in range(built))
        assert rows[built + 1].name == ("+ZeRO-2 (optimizer state sharded)" if world > 1 else "+cached targets")
    assert OURS is AS_BUILT and AS_BUILT.clip == "in_step" and AS_BUILT.ema == "one_pass"
    names = [r.name for r in alternatives(cuts())]
    assert "alt: as built + AC mlp" in names and "alt: as built + fp8 tensorwise" in names


def test_attention_padding_at_head_dim_72():
    assert padding_factor("flash2", 72, 256) == pytest.approx(96 / 72)  # 96, not 128
    assert padding_factor("sdpa-flash", 64, 257) == 1.0
    assert padding_factor("cudnn", 72, 256) == 1.0
    assert padding_factor("flash3", 72, 256) == pytest.approx(96 / 72 * 384 / 256 * 288 / 256)
    assert padding_factor("flash3", 72, 256, backward=True) == pytest.approx(96 / 72)


def test_linear_under_autocast_counts_casts_gemm_and_gradients():
    lin = Linear("l", rows=10, k=4, n=6, amp=2, x_bytes=4)
    fwd = {o.name: (o.part, o.read, o.write) for o in lin.forward()}
    assert fwd == {
        "l.w": ("weight_cast", 96, 48),
        "l.b": ("weight_cast", 24, 12),
        "l.x": ("elementwise", 160, 80),
        "l": ("gemm", 2 * (40 + 24 + 6), 120),
    }
    assert lin.forward()[-1].flops == 2 * 10 * 4 * 6
    bwd = [(o.name, o.read, o.write) for o in lin.backward()]
    assert bwd == [
        ("l.dx", 2 * (60 + 24), 80),
        ("l.dw", 2 * 10 * 10, 48),
        ("l.db", 120, 12),
        ("l.dx", 80, 160),
        ("l.dw", 48, 96),
        ("l.db", 12, 24),
    ]
    fp32 = Linear("l", rows=10, k=4, n=6, amp=4, x_bytes=4)
    assert [o.part for o in fp32.forward()] == ["gemm"] and len(fp32.backward()) == 3  # no casts without autocast


def test_roofline_takes_the_slower_of_memory_and_compute():
    h100, eff = GPUS["h100"], Efficiency(kernel_us=1.0)
    memory_bound = Op("elementwise", "x", read=3.35e12 * 0.8, write=0.0)
    assert op_seconds(memory_bound, h100, eff) == pytest.approx(1.0 + 1e-6)
    compute_bound = Op("gemm", "g", read=1.0, write=1.0, flops=989.4e12 * 0.7)
    assert op_seconds(compute_bound, h100, eff) == pytest.approx(1.0 + 1e-6)
    with pytest.raises(ValueError, match="FP8"):
        op_seconds(Op("gemm", "g", flops=1.0, rate="fp8"), GPUS["a100"], eff)
    host_bound = roofline([Op("elementwise", "tiny", 4, 4, launches=10)], h100, eff, AS_BUILT, 1)
    assert host_bound.bound == "host" and host_bound.step_s == pytest.approx(10 * eff.host_us * 1e-6)


def test_memory_is_affine_in_the_batch_and_max_batch_fits():
    eff, cfg = Efficiency(), Config(batch=1)
    m = [memory(Config(batch=b), AS_BUILT, eff).total_gb for b in (1, 2, 3)]
    assert m[2] - m[1] == pytest.approx(m[1] - m[0], rel=1e-3) and m[1] > m[0]
    for gpu in ("h100", "h200"):
        b = max_batch(cfg, AS_BUILT, GPUS[gpu], eff)
        assert memory(Config(batch=b), AS_BUILT, eff).total_gb <= GPUS[gpu].memory_gb
        assert memory(Config(batch=b + 1), AS_BUILT, eff).total_gb > GPUS[gpu].memory_gb
    assert max_batch(cfg, AS_BUILT, GPUS["h200"], eff) > max_batch(cfg, AS_BUILT, GPUS["h100"], eff)
    ckpt = StepStructure("ckpt", act_ckpt="full")
    assert max_batch(cfg, ckpt, GPUS["h100"], eff) > 2 * max_batch(cfg, AS_BUILT, GPUS["h100"], eff)
    mlp, every2 = StepStructure("mlp", act_ckpt="mlp"), StepStructure("every2", act_ckpt="every:2")
    h100 = GPUS["h100"]
    assert max_batch(cfg, AS_BUILT, h100, eff) < max_batch(cfg, mlp, h100, eff) < max_batch(cfg, every2, h100, eff)
    assert max_batch(cfg, every2, h100, eff) < max_batch(cfg, ckpt, h100, eff)


def test_parts_move_the_way_the_cuts_say():
    eff, h100, cfg = Efficiency(), GPUS["h100"], Config(batch=32)
    rows = {st.name: predict(cfg, st, h100, eff) for st in [REFERENCE, *cuts()]}
    ema = lambda r: r["bytes_per_img_by_part"]["ema"]  # noqa: E731
    assert ema(rows["+2b one-pass EMA"]) / ema(rows["+2a contiguous residual"]) == pytest.approx(12 / 32, rel=1e-3)
    assert (
        "encoder" not in rows["+cached targets"]["bytes_per_img_by_part"]
        or rows["+cached targets"]["bytes_per_img_by_part"]["encoder"] < 1e7
    )
    zero2 = next(r for r in cuts(8) if r.name.startswith("+ZeRO-2"))
    sharded = predict(Config(batch=32, world=8), zero2, h100, eff)
    assert (
        sharded["bytes_per_img_by_part"]["optimizer"]
        < rows["+2e cuDNN attention"]["bytes_per_img_by_part"]["optimizer"] / 7
    )
    sliced = predict(Config(batch=32, world=8), replace(AS_BUILT, parallel="ddp"), h100, eff)  # cut 2f: EMA / 8
    assert sliced["bytes_per_img_by_part"]["ema"] == pytest.approx(ema(rows[AS_BUILT.name]) / 8, rel=1e-6)
    assert all(math.isfinite(r["predicted_img_s"]) and r["predicted_img_s"] > 0 for r in rows.values())


def test_structure_rejects_unknown_values():
    with pytest.raises(ValueError, match="clip"):
        StepStructure("x", clip="sometimes")


def test_cli_json_contract(capsys):
    """Issue 18's acceptance: {"rows": [{"name", "predicted_img_s", "flops_per_img", "hbm_bytes_per_img", ...}]}
    with exactly one row named "reference"."""
    assert step_model.main(["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--gpu", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["rows"]
    names = [r["name"] for r in out["rows"]]
    assert names.count("reference") == 1 and "ours (as built)" in names and len(names) >= 10
    for r in out["rows"]:
        assert r["predicted_img_s"] > 0 and r["flops_per_img"] > 5e11 and r["hbm_bytes_per_img"] > 1e9
        assert r["predicted_memory_gb"] <= 80.0 and r["batch"] >= 1


def test_cli_batch_custom_row_and_cards(capsys):
    step_model.main(["--batch", "32", "--fp8", "rowwise", "--targets", "cached", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["batch"] for r in rows} == {32} and rows[-1]["name"].startswith("custom:")
    step_model.main(["--gpu", "a100", "--json"])
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert "+cached targets" in names and not any("fp8" in n and "without" not in n for n in names)
    with pytest.raises(SystemExit, match="FP8"):
        step_model.main(["--gpu", "a100", "--fp8", "tensorwise", "--json"])
    step_model.main(["--gpu", "h200"])
    text = capsys.readouterr().out
    assert "PREDICTED" in text and "H200" in text and "reference" in text


def test_cli_model_switches_and_checkpointing_row(capsys):
    """--reg and --projection-layer-type change what every row trains; --act-ckpt adds a custom row."""
    flops = {}
    for flags in ([], ["--reg"], ["--projection-layer-type", "conv"], ["--projection-layer-type", "linear"]):
        step_model.main(["--batch", "32", "--json", *flags])
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        flops[tuple(flags)] = rows["ours (as built)"]["model_flops_per_img"]
    plain = flops[()]
    assert flops[("--reg",)] > plain and flops[("--projection-layer-type", "linear")] < plain
    assert flops[("--projection-layer-type", "conv")] != plain
    step_model.main(["--batch", "32", "--act-ckpt", "every:4", "--json"])
    custom = json.loads(capsys.readouterr().out)["rows"][-1]
    assert custom["name"] == "custom: act_ckpt=every:4" and custom["not_built"] == []
    with pytest.raises(SystemExit, match="act_ckpt"):
        step_model.main(["--act-ckpt", "sometimes", "--json"])


def test_cli_runs_as_a_script():
    cmd = [sys.executable, "bench/step_model.py", "--model", "SiT-B/2", "--enc-type", "dinov2-vit-b", "--json"]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert json.loads(out.stdout)["rows"][0]["name"] == "reference"


@pytest.mark.slow
@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_committed_h100_report_is_current(gpu):
    path = os.path.join(ROOT, "bench", "results", f"step_model_{gpu}.md")
    with open(path) as f:
        committed = f.read()
    args = ["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--gpu", gpu, "--markdown"]
    out = subprocess.run(
        [sys.executable, "bench/step_model.py", *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.stdout == committed, "stale: regenerate with the command at the top of the file"


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_block_elementwise_bytes_per_element_match_the_block_pass_count(impl):
    """tests/kernels/test_block_passes.py counts what a real SiTBlock's non-GEMM ops write to and read from
    activations per B*T*D element (as built: forward 20 / 24, backward 30 / 64); the model's block, at enough tokens
    that the (B, D) conditioning terms vanish, gives the same numbers."""
    from repa_fast.cost.shapes import SiTShape
    from repa_fast.cost.sit import Policy, SiTStep
    from tests.kernels import test_block_passes as passes

    fwd, bwd = passes._count(impl)
    measured = [sum(op[k] for op in ops.elementwise()) / passes.BTD for ops in (fwd, bwd) for k in (2, 3)]
    B, D = 2, 64
    sh = SiTShape(depth=2, dim=D, heads=2, patch=2, latent=128)  # 4096 tokens
    step = SiTStep(sh, replace(AS_BUILT, impl=impl, attn_backend="sdpa-flash"), B, Policy(interpreted=True))
    ops = [[o for o in stage if o.part == "elementwise"] for stage in step.block(1)]
    E = B * sh.tokens * D
    model = [sum(getattr(o, k) for o in stage) / E for stage in ops for k in ("write", "read")]
    assert model == pytest.approx(measured, rel=2e-3), (model, measured)
    if impl == "triton":
        assert measured == [20, 24, 30, 64]
