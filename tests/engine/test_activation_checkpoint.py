"""Activation checkpointing (repa_fast/engine/activation_checkpoint.py): the same gradients, the same state dict, and
the checkpointed modules really run twice.

Gradients are compared bitwise (``torch.equal``), not within a tolerance: a SiT block draws no random numbers, so
the recomputation runs the same CPU kernels on the same inputs and the backward graph is the plain model's (non-
reentrant checkpointing only re-materialises the saved tensors), so every gradient accumulates in the same order.
Weights are random (adaLN-Zero's zero gates would give the blocks exactly zero gradients, which compare equal
whatever the recomputation does), and each test asserts that the gradients it compares are not zero.
"""

import copy
import math

import pytest
import torch

from repa_fast.engine.activation_checkpoint import (
    apply_activation_checkpointing,
    checkpointed_modules,
    is_checkpointed,
    parse_ac_mode,
)
from repa_fast.errors import ConfigError
from repa_fast.models.sit import SiT
from repa_fast.objective import training_loss, warmup_loss

SMALL = dict(input_size=8, patch_size=2, hidden_size=48, depth=4, num_heads=3, projector_dim=64, encoder_depth=2,
             num_classes=10, impl="ref")  # fmt: skip
B, T, Z = 3, 16, 24
MODES = ["none", "full", "mlp", "every:2", "every:3"]


def random_sit(reg=False, seed=0, **kw):
    """A SiT with every trainable weight random (std ~ 0.4 / sqrt(fan-in)), so that every path carries gradient."""
    torch.manual_seed(seed)
    model = SiT(z_dims=[Z], reg=reg, **{**SMALL, **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.4 / math.sqrt(p.shape[-1]))
    return model.train()


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    patch = torch.randn(B, T, Z, generator=g) * 2 + 0.3
    cls = torch.randn(B, Z, generator=g)
    t, noise, cls_noise = (
        torch.rand(B, generator=g),
        torch.randn(B, 4, 8, 8, generator=g),
        torch.randn(B, Z, generator=g),
    )
    return dict(x0=x0, y=y, patch=patch, cls=cls, t=t, noise=noise, cls_noise=cls_noise)


def grads_of_step(model, data, reg, autocast_dtype=None):
    """One REPA (or REG) loss backward on fresh leaf copies of the inputs: (loss, {name: grad} incl. the inputs)."""
    x0, patch, cls = (data[k].clone().requires_grad_() for k in ("x0", "patch", "cls"))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # label dropout draws the same labels in both runs
    kw = dict(cls_targets=[cls], cls_noise=data["cls_noise"]) if reg else {}
    out = training_loss(model, x0, data["y"], [patch], t=data["t"], noise=data["noise"], impl="ref",
                        autocast_dtype=autocast_dtype, **kw)  # fmt: skip
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads.update(input_x0=x0.grad, input_patch=patch.grad)
    if reg:
        grads["input_cls"] = cls.grad
    return out["loss"].detach(), grads


def assert_bitwise_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert want[name] is not None and want[name].abs().sum() > 0, f"{name}: no gradient to compare"
        assert torch.equal(got[name], want[name]), f"{name}: max diff {(got[name] - want[name]).abs().max():.3g}"


@pytest.mark.parametrize("reg", [False, True], ids=["repa", "reg"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_of_every_parameter_and_input_are_bitwise_unchanged(mode, reg):
    plain = random_sit(reg=reg)
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, mode)
    for seed in (1, 2):  # fresh random inputs, twice: the second step runs the wrapped model again
        data = batch(seed)
        loss_ref, want = grads_of_step(plain, data, reg)
        loss, got = grads_of_step(model, data, reg)
        assert torch.equal(loss, loss_ref)
        assert_bitwise_same(got, want)


@pytest.mark.parametrize("mode", ["full", "mlp"])
def test_gradients_unchanged_under_bf16_autocast(mode):
    plain = random_sit(reg=False)
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, mode)
    data = batch(3)
    _, want = grads_of_step(plain, data, False, autocast_dtype=torch.bfloat16)
    _, got = grads_of_step(model, data, False, autocast_dtype=torch.bfloat16)
    assert_bitwise_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_and_parameter_names_unchanged_and_strict_loads_work(mode):
    plain = random_sit(reg=True)
    model = random_sit(reg=True, seed=5)
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, mode)
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict(), strict=True)  # a plain (e.g. REPA / REG) file into the wrapped model
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    fresh = random_sit(reg=True, seed=7)
    fresh.load_state_dict(model.state_dict(), strict=True)  # and a wrapped model's checkpoint into a plain one


def _count_calls(model, names):
    calls = dict.fromkeys(names, 0)
    for name in names:

        def hook(module, args, name=name):
            calls[name] += 1

        model.get_submodule(name).register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_modules_run_twice_per_step_and_the_others_once(mode):
    model = random_sit()
    wrapped = apply_activation_checkpointing(model, mode)
    assert wrapped == checkpointed_modules(model, mode)
    probes = [f"blocks.{i}.{sub}" for i in range(SMALL["depth"]) for sub in ("attn", "mlp.fc2", "adaLN_modulation")]
    calls = _count_calls(model, probes + ["final_layer"])
    grads_of_step(model, batch(4), False)

    def expected(name):  # a probe inside a checkpointed module runs again in the backward pass
        return 2 if any(name.startswith(w + ".") for w in wrapped) else 1

    assert calls == {name: expected(name) for name in calls}
    if mode != "none":
        assert sum(calls.values()) > len(calls)  # something was recomputed
    with torch.no_grad():  # no backward, no recomputation
        calls.update(dict.fromkeys(calls, 0))
        model(batch(5)["x0"], torch.rand(B), torch.randint(0, 10, (B,)))
    assert set(calls.values()) == {1}


def test_mode_names_select_the_documented_modules():
    model = random_sit(depth=6)
    assert checkpointed_modules(model, "none") == []
    assert checkpointed_modules(model, "full") == [f"blocks.{i}" for i in range(6)]
    assert checkpointed_modules(model, "every:1") == checkpointed_modules(model, "full")
    assert checkpointed_modules(model, "every:2") == ["blocks.1", "blocks.3", "blocks.5"]
    assert checkpointed_modules(model, "every:4") == ["blocks.3"]
    assert checkpointed_modules(model, "every:7") == []
    assert checkpointed_modules(model, "mlp") == [f"blocks.{i}.mlp" for i in range(6)]
    assert parse_ac_mode("every:3") == ("every", 3)


@pytest.mark.parametrize("bad", ["every:0", "every:", "every:x", "every:-1", "partial", "", "FULL", None])
def test_bad_mode_is_a_config_error_naming_the_choices(bad):
    with pytest.raises(ConfigError, match="none, full, mlp, every:K"):
        apply_activation_checkpointing(random_sit(), bad)


def test_reapplying_is_idempotent_and_modes_replace_each_other():
    model = random_sit()
    apply_activation_checkpointing(model, "full")
    forward = model.blocks[0].forward
    apply_activation_checkpointing(model, "full")
    assert model.blocks[0].forward is forward  # the same bound override: a compiled block keeps its graph
    apply_activation_checkpointing(model, "mlp")
    assert not is_checkpointed(model.blocks[0]) and "forward" not in vars(model.blocks[0])
    assert all(is_checkpointed(b.mlp) for b in model.blocks)
    apply_activation_checkpointing(model, "none")
    assert not any(is_checkpointed(m) or "forward" in vars(m) for m in model.modules())


def test_deepcopy_of_a_checkpointed_model_checkpoints_its_own_blocks():
    """The EMA is a deepcopy of the model: its override must be bound to the copy, not to the original block."""
    model = random_sit()
    apply_activation_checkpointing(model, "full")
    ema = copy.deepcopy(model)
    assert ema.blocks[0].forward.__self__ is ema.blocks[0]
    data = batch(6)
    _, want = grads_of_step(model, data, False)
    model.zero_grad(set_to_none=True)
    _, got = grads_of_step(ema, data, False)
    assert_bitwise_same(got, want)
    assert all(p.grad is None for p in model.parameters())  # the copy's backward never touched the original


@pytest.mark.parametrize("reg", [False, True], ids=["repa", "reg"])
@pytest.mark.parametrize("mode", ["full", "mlp", "every:2"])
def test_erw_warmup_partial_forward_works_and_keeps_gradients(mode, reg):
    """ERW's warm-up runs the first ``num_blocks`` blocks only (objective.warmup_loss), later blocks frozen."""
    plain = random_sit(reg=reg)
    for name, p in plain.named_parameters():
        p.requires_grad_(not name.startswith(("blocks.2.", "blocks.3.", "final_layer.")))
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, mode)
    calls = _count_calls(model, ["blocks.1.attn", "blocks.1.mlp.fc2", "blocks.2.attn"])
    data = batch(7)
    results = []
    for m in (plain, model):
        m.zero_grad(set_to_none=True)
        kw = dict(cls_targets=[data["cls"]]) if reg else {}
        out = warmup_loss(m, data["x0"], data["y"], [data["patch"]], num_blocks=2, impl="ref", **kw)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    assert_bitwise_same(results[1][1], results[0][1])
    assert calls["blocks.2.attn"] == 0 and calls["blocks.1.mlp.fc2"] == 2  # truncated; block 1 recomputed


def test_compiled_checkpointed_blocks_give_the_plain_gradients():
    """torchtitan's order: checkpoint, then compile each block (aot_eager: AOTAutograd, without the C++ toolchain
    inductor needs on CPU). Dynamo must trace the checkpoint as its higher-order op (tag_activation_checkpoint), not
    drop it. Compiled code may reorder floating-point work, so this one is within the fp32 tolerance, not bitwise."""
    from torch._dynamo.backends.debugging import aot_eager

    from tests.conftest import tol

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    plain = random_sit()
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, "full")
    for block in model.blocks:
        block.compile(backend=backend)
    data = batch(8)
    _, want = grads_of_step(plain, data, False)
    _, got = grads_of_step(model, data, False)
    assert graphs and all("tag_activation_checkpoint" in code for code in graphs)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol(torch.float32, "reduction"))


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_full_keeps_only_the_block_inputs_and_mlp_drops_the_mlp_hidden_activations(autocast_dtype):
    """Bytes autograd keeps between forward and backward (engine.profiling.saved_bytes, parameters excluded): a
    fully checkpointed block keeps exactly its inputs x (N, T, D) and c (N, D); the MLP mode no longer keeps the two
    (N, T, 4D) hidden activations (fc1's output, GELU's output) and keeps the MLP input h instead."""
    from repa_fast.engine.profiling import saved_bytes

    model = random_sit()
    skip = [*model.parameters(), *model.buffers()]
    x, c = torch.randn(B, T, 48, requires_grad=True), torch.randn(B, 48, requires_grad=True)
    amp = dict(device_type="cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    seen = {}
    # fc1 runs as the fused linear_gelu op (kernels/bias_gelu.py, no module call): the MLP's own input is h, fc2's
    # input is GELU's output, of fc1's output size
    model.blocks[1].mlp.register_forward_hook(lambda m, a, o: seen.update(h=a[0]))
    model.blocks[1].mlp.fc2.register_forward_hook(lambda m, a, o: seen.update(hidden=a[0]))
    saved = {}
    for mode in ("none", "full", "mlp"):
        apply_activation_checkpointing(model, mode)
        with torch.autocast(**amp):
            saved[mode] = saved_bytes(model.blocks[1], x, c, exclude=skip)
    assert saved["full"] == x.nbytes + c.nbytes
    hidden = seen["hidden"].nbytes  # (N, T, 4D) in the compute dtype; GELU's output has the same size
    assert saved["none"] - saved["mlp"] >= 2 * hidden - seen["h"].nbytes > 0


def test_trainer_steps_with_checkpointing_give_the_same_weights_and_ema_through_erws_phase_switch(tmp_path):
    """Four trainer steps (optimizer, EMA, ERW's warm-up -> full switch at step 3) with every:2 checkpointing applied
    to the built model end bitwise where the plain model's end."""
    from .helpers import StepRig, tiny_cfg

    ends = []
    for mode in ("none", "every:2"):
        torch.manual_seed(0)
        rig = StepRig(tiny_cfg(tmp_path / mode, "--warmup-steps", 3, "--l2r-depth", 2, "--encoder-depth", 3, steps=6))
        apply_activation_checkpointing(rig.model, mode)
        rig.enter(rig.state.phase)
        for _ in range(4):
            phase = rig.state.recipe.phase(rig.state.step)  # the trainer loop's phase check (engine/trainer.py)
            if phase.name != rig.state.phase.name:
                rig.enter(phase)
            rig.step()
        assert rig.state.phase.name == "full"
        ends.append((rig.model.state_dict(), rig.state.ema.state_dict()))
    (model_a, ema_a), (model_b, ema_b) = ends
    assert list(model_a) == list(model_b) and list(ema_a) == list(ema_b)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
