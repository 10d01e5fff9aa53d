"""The cost model's options against their real modules on CPU: activation checkpointing
(engine/activation_checkpoint.py), torchao's fp8 Linear (engine/fp8.py's conversion), and the memory report that
``train.py --dry-run`` prints (repa_fast.cost.memory: ``memory_report``, ``fits``, ``suggest``).

Activation checkpointing is measured as tests/test_cost_crosscheck.py measures a step: the real modules on
FakeTensors, the bytes autograd keeps (saved-tensor hooks; torch's non-reentrant checkpoint saves a region's inputs
through them and nothing inside), and the traffic of the step with its recomputation, within the same 2%. fp8 is
counted on a real torchao Float8Linear (torchao 0.18, ``emulate=True`` on small CPU tensors): which tensors are cast
to float8, how large, from which dtype and along which axis, and what the module keeps for its backward.
"""

import dataclasses
import math
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from repa_fast.cost.hardware import Efficiency
from repa_fast.cost.memory import (
    Setup,
    block_activation_bytes,
    block_weight_copy_bytes,
    fits,
    memory_report,
    suggest,
)
from repa_fast.cost.ops import Linear, fp8_cast_bytes
from repa_fast.cost.shapes import sit_params, sit_shape
from repa_fast.cost.sit import SiTStep
from tests.test_cost_crosscheck import CPU, _measure_sit, _model_sit, _structure, assert_close, model_parts, within

AC_MODES = ("mlp", "full", "every:2")


# ---------------------------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------------------------
def _block_saved(mode: str, B: int, T: int, D: int, H: int) -> int:
    """Bytes one real SiTBlock keeps for its backward under bf16 autocast, checkpointed by the engine's function
    (weights excluded; the bf16 weight copies are in)."""
    from repa_fast.engine.activation_checkpoint import apply_activation_checkpointing
    from repa_fast.models.sit import SiTBlock

    with FakeTensorMode(allow_non_fake_inputs=True):
        holder = torch.nn.Module()
        holder.blocks = torch.nn.ModuleList([SiTBlock(D, H, impl="triton", attn_backend="sdpa")])
        assert apply_activation_checkpointing(holder, mode) == ([] if mode == "none" else [_ac_name(mode)])
        weights = {p.untyped_storage()._cdata for p in holder.parameters()}
        x, c = torch.randn(B, T, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in weights:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            holder.blocks[0](x, c)
    return sum(saved.values())


def _ac_name(mode: str) -> str:
    return "blocks.0.mlp" if mode == "mlp" else "blocks.0"


@pytest.mark.parametrize("B,T,D,H", [(2, 256, 768, 12), (3, 64, 384, 6), (1, 257, 1152, 16)])
@pytest.mark.parametrize("mode", ["none", "mlp", "full"])
def test_block_activation_formula_is_what_a_real_block_keeps(mode, B, T, D, H):
    """Per block: none 40 T D + 4 H T + 18 D per image + 36 D^2 weight copies; mlp 16 T D and 16 D^2 less; full
    4 T D + 4 D, no copies (repa_fast.cost.memory's docstring), measured exactly."""
    measured = _block_saved(mode, B, T, D, H)
    assert measured == B * block_activation_bytes(mode, T, D, H) + block_weight_copy_bytes(mode, D)


@pytest.mark.parametrize("mode", ["none", "mlp", "full"])
def test_op_model_keeps_what_the_formula_says_per_block(mode):
    """The op model's saved bytes of a generic block (c excluded: the model keeps it once, not per block)."""
    B, sh = 2, sit_shape("SiT-XL/2")
    fwd = SiTStep(sh, _structure(act_ckpt=mode), B, CPU).block(1)[0]
    per_block = B * (block_activation_bytes(mode, sh.tokens, sh.dim, sh.heads) - 4 * sh.dim)
    assert sum(o.saved for o in fwd) == per_block + block_weight_copy_bytes(mode, sh.dim)


@pytest.fixture(scope="module")
def measured_ac():
    return {mode: _measure_sit("SiT-B/2", "triton", True, 4, ac=mode) for mode in AC_MODES}


@pytest.mark.parametrize("mode", AC_MODES)
def test_checkpointed_step_matches_saved_bytes_and_recompute_traffic(measured_ac, mode):
    """The whole step with the engine's checkpointing: what it keeps, and the bytes and launches of the forward,
    the recomputation (up to the region's last saved tensor: fc2's GEMM is not rerun in "mlp") and the backward."""
    parts, saved = measured_ac[mode]
    ops = _model_sit("SiT-B/2", _structure(act_ckpt=mode), 4)
    assert_close(model_parts(ops), parts)
    kept = sum(o.saved for o in ops if o.stage == "fwd")
    assert abs(kept - saved) <= 0.02 * saved, (kept, saved)
    for wrong in {"mlp": ("none", "full"), "full": ("every:2", "mlp"), "every:2": ("full", "none")}[mode]:
        other = _model_sit("SiT-B/2", _structure(act_ckpt=wrong), 4)
        assert not within(model_parts(other), parts), wrong
        assert abs(sum(o.saved for o in other if o.stage == "fwd") - saved) > 0.02 * saved, wrong


# ---------------------------------------------------------------------------------------------------------------
# fp8: torchao's Float8Linear
# ---------------------------------------------------------------------------------------------------------------
M, K, N = 64, 32, 48


def _count_float8_linear(recipe: str, monkeypatch):
    """(casts, saved bytes, forward op names) of one Float8Linear forward + backward on a bf16 (M, K) input:
    every ``hp_tensor_to_float8_dynamic`` call of torchao/float8/float8_linear.py, with its phase, the storage it
    reads, the element count and size, and the scaling axis."""
    ao = pytest.importorskip("torchao.float8")
    import torchao.float8.float8_linear as fl

    from bench.traffic import TrafficCounter
    from repa_fast.engine.fp8 import fp8_config

    casts, phase = [], ["fwd"]
    real = fl.hp_tensor_to_float8_dynamic

    def record(hp, float8_dtype, mm_config, *args, **kw):
        casts.append((phase[0], hp.untyped_storage()._cdata, hp.numel(), hp.element_size(), kw.get("axiswise_dim")))
        return real(hp, float8_dtype, mm_config, *args, **kw)

    monkeypatch.setattr(fl, "hp_tensor_to_float8_dynamic", record)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(K, N))
    ao.convert_to_float8_training(model, config=fp8_config(recipe, emulate=True))
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in weights:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), TrafficCounter(record=True) as fwd:
        y = model(x)
    phase[0] = "bwd"
    with TrafficCounter(record=True) as bwd:
        y.backward(torch.randn_like(y))
    assert x.grad is not None and model[0].weight.grad.abs().sum() > 0
    return casts, sum(saved.values()), fwd.records, bwd.records


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linear_casts_match_the_model(recipe, monkeypatch):
    """Six casts per Linear in torchao's eager code: the input and the fp32 weight in the forward; the output
    gradient twice, the weight and the saved input in the backward. Casts of the same tensor along the same axis in
    one graph are one cast once compiled (tensorwise: the output gradient's two), so the model prices 5 (tensorwise)
    or 6 (rowwise) distinct casts at (2b + 1) n bytes each: an amax reading b n and a cast reading b n and writing n
    (counted here: every cast's amax reduction reads b n, its float8 output is n bytes)."""
    casts, saved, fwd, bwd = _count_float8_linear(recipe, monkeypatch)
    assert len(casts) == 6
    distinct = {(ph, storage, axis): (n, b) for ph, storage, n, b, axis in casts}
    assert len(distinct) == (5 if recipe == "tensorwise" else 6)
    measured = sum((2 * b + 1) * n for n, b in distinct.values())
    amax = [r["read"] for r in fwd + bwd if r["name"] in ("max", "amax")]
    fp8_out = [r["written"] for r in fwd + bwd if r["name"] == "_to_copy" and "float8" in str(r["out_dtypes"][0])]
    assert sorted(amax) == sorted(n * b for _, _, n, b, _ in casts)
    assert sorted(fp8_out) == sorted(n for _, _, n, _, _ in casts)
    lin = Linear("l", M, K, N, 2, 2, fp8=recipe)
    ops = lin.forward() + lin.backward()
    model_casts = sum(o.bytes for o in ops if o.name.endswith((".amax", ".to_fp8")))
    assert model_casts == pytest.approx(measured, abs=4 * 6)  # the model also writes each 4-byte amax
    bf16_weight_cast = 6 * K * N
    assert fp8_cast_bytes(M, K, N, recipe) == pytest.approx(measured - bf16_weight_cast)
    wrong = "rowwise" if recipe == "tensorwise" else "tensorwise"
    assert fp8_cast_bytes(M, K, N, wrong) != pytest.approx(measured - bf16_weight_cast)


def test_float8_linear_keeps_its_input_only_and_adds_the_bias_apart(monkeypatch):
    """Float8Linear saves the bf16 input (and its fp32 master weight, a parameter): no bf16 weight copy, which the
    model's fp8 Linear marks kept nowhere; its forward adds the bias after the GEMM, a pass of its own."""
    _, saved, fwd, _ = _count_float8_linear("tensorwise", monkeypatch)
    assert saved == 2 * M * K
    names = [r["name"] for r in fwd]
    assert names[-3:] == ["mm", "_to_copy", "add"]  # GEMM, the bias cast to bf16, the bias add
    lin = Linear("l", M, K, N, 2, 2, fp8="tensorwise")
    assert sum(o.saved for o in lin.forward()) == saved
    assert [o.name for o in lin.forward()][-2:] == ["l.b", "l.bias_add"]


def test_fp8_drops_the_block_linears_weight_copies():
    """engine/fp8.py converts qkv, proj, fc1, fc2 (12 D^2 weights per block): their bf16 copies are not kept."""
    base = Setup(batch=8)
    parts = dict(memory_report(base))
    fp8 = dict(memory_report(replace(base, fp8="tensorwise")))
    D, depth = 1152, 28
    assert (parts["weight_copies"] - fp8["weight_copies"]) * 1e9 == pytest.approx(2 * 12 * D * D * depth)


# ---------------------------------------------------------------------------------------------------------------
# train.py --dry-run: memory_report, fits, suggest
# ---------------------------------------------------------------------------------------------------------------
PARTS = ("weights", "grads", "optimizer", "ema", "weight_copies", "activations", "encoder", "batch", "transient")


def test_memory_report_parts_and_total():
    report = memory_report(Setup(batch=32))
    names = [name for name, _ in report]
    assert names[: len(PARTS)] == list(PARTS) and names[-1] == "total"
    gb = dict(report)
    assert gb["total"] == pytest.approx(sum(v for k, v in report[:-1]))
    P = sum(math.prod(s) for _, s, _ in sit_params(sit_shape("SiT-XL/2")))  # SiT-XL/2 + its projector, 683M
    assert gb["weights"] == pytest.approx(4 * P / 1e9) and gb["optimizer"] == pytest.approx(2 * gb["grads"])
    assert gb["activations"] > gb["weight_copies"] > 0
    cached = dict(memory_report(Setup(batch=32, targets="cached")))
    assert cached["encoder"] == 0 and cached["total"] < gb["total"]


def test_sharding_divides_what_the_backend_shards():
    one, ddp, zero2, fsdp = (
        dict(memory_report(Setup(batch=32, world=w, parallel=p)))
        for w, p in ((1, "none"), (8, "ddp"), (8, "zero2"), (8, "fsdp"))
    )
    assert ddp["ema"] == pytest.approx(one["ema"] / 8)  # cut 2f: the EMA sliced over the ranks
    assert ddp["grads"] == pytest.approx(2 * one["grads"])  # DDP's buckets
    assert zero2["optimizer"] == pytest.approx(one["optimizer"] / 8) and zero2["grads"] == pytest.approx(
        one["grads"] / 8
    )
    assert fsdp["weights"] == pytest.approx(one["weights"] / 8)
    with pytest.raises(ValueError, match="parallel"):
        Setup(parallel="deepspeed")


def test_checkpointing_and_batch_move_the_activations():
    gb = {m: dict(memory_report(Setup(batch=64, act_ckpt=m))) for m in ("none", "mlp", "every:2", "full")}
    act = [gb[m]["activations"] for m in ("none", "mlp", "every:2", "full")]
    assert act == sorted(act, reverse=True) and act[-1] < act[0] / 5
    assert gb["full"]["transient"] > gb["none"]["transient"]  # one block recomputed at a time
    assert fits(Setup(batch=8), 80.0) and not fits(Setup(batch=1024), 80.0)


def test_suggest_makes_it_fit_and_keeps_the_global_batch():
    """SiT-XL/2 at 256 images per GPU does not fit an 80 GB card; every option proposed fits, keeps the global
    batch, and names its flags; checkpointing comes first (no fewer images per step), accumulation after."""
    setup = Setup(batch=256, world=8, parallel="ddp")
    assert not fits(setup, 80.0)
    options = suggest(setup, 80.0)
    assert options and any(o.act_ckpt != "none" and o.accumulation == 1 for o in options)
    assert any(o.accumulation > 1 for o in options)
    for o in options:
        changed = replace(setup, batch=o.batch, accumulation=o.accumulation, act_ckpt=o.act_ckpt)
        assert fits(changed, 80.0) and o.predicted_gb <= 80.0
        assert changed.global_batch == setup.global_batch
        assert ("--gradient-accumulation-steps" in o.flags) == (o.accumulation > 1)
        assert ("--activation-checkpointing" in o.flags) == (o.act_ckpt != "none")
    first = options[0]
    assert first.accumulation == 1 and first.act_ckpt == "mlp"  # the least recompute that fits
    assert suggest(Setup(batch=8), 80.0) == []
    assert suggest(setup, 1.0) == []  # nothing fits 1 GB: no option is invented


def test_suggest_accumulation_divides_the_per_gpu_batch():
    setup = Setup(batch=96, act_ckpt="full")  # already checkpointed: only a smaller micro-batch can help
    assert not fits(setup, 20.0)
    options = suggest(setup, 20.0, Efficiency())
    assert options and all(
        o.act_ckpt == "full" and 96 % o.batch == 0 and o.batch * o.accumulation == 96 for o in options
    )
    assert all(dataclasses.asdict(o)["predicted_gb"] <= 20.0 for o in options)
