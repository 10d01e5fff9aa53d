"""The cost model (repa_fast.cost) against real steps on CPU: bytes, launches and saved activations op by op.

What runs: the real modules and step functions of repa_fast (models/sit.py with its Triton custom ops or their
references, objective.training_loss, engine/parallel/base.Backend.clip_and_step with torch's fused AdamW,
engine/ema.EMA, models/dinov2.py) and, for the reference's own structure, the same torch calls its train.py makes
(foreach AdamW, GradScaler's unscale op, clip_grad_norm_, the per-parameter EMA loop, the per-sample alignment
loop). They run on FakeTensors (CPU dispatch keys, CPU autocast, no data: SiT-XL/2's 675M parameters cost no memory)
or meta tensors, under bench/traffic.py's TrafficCounter, which charges each dispatched op the bytes it reads and
writes. Why the counts are exact and not scaled: every shape is the real one (SiT-XL/2 and SiT-B/2 at full depth,
batch 2); only the values are absent, and no count depends on values.

Two things the counter sees otherwise than a GPU runs them are corrected by rule, as the model prices them:
launchers and LayerNorm copy a 3-D input that is not contiguous (kernels/adaln.py ``_rows``, ATen's
``expect_contiguous``), one extra read and write of it each; an embedding lookup reads the rows it gathers, not the
whole table the counter charges. CPU autocast differs from CUDA's in two places, softmax (which the SiT flash path
does not run) and layer_norm (REG's ``wg_norm`` on B x D values): CUDA runs both in fp32, CPU in bf16, which the
model's ``Policy(softmax_fp32=False, layer_norm_fp32=False)`` states. Where the CPU takes another path than a GPU by
choice (the EMA kernel's gate picks its reference on CPU), the test makes the GPU's choice. A model that is wrong
must fail: the ``perturbed`` tests feed deliberately wrong structures and check that the same comparison rejects
them.
"""

from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.traffic import TrafficCounter
from repa_fast.cost.encoder import encoder_ops
from repa_fast.cost.fixed import clip_ops, ema_ops, optimizer_ops
from repa_fast.cost.losses import per_sample_alignment
from repa_fast.cost.shapes import sit_shape
from repa_fast.cost.sit import Policy, SiTStep, math_attention_forward
from repa_fast.cost.structure import AS_BUILT, BEFORE_ISSUE_18, REFERENCE
from repa_fast.models.encoder_archs import encoder_arch

# Issue 18 asks for the model's bytes and launches within 10% of the measured counts. The model prices these ops
# one by one, so it is held to 2%: at 10%, a model missing the reference path's LayerNorm copies (9% of its
# elementwise bytes) would pass.
TOL = 0.02
CPU = Policy(
    softmax_fp32=False, layer_norm_fp32=False, interpreted=True
)  # CPU autocast: softmax, LN low precision; 1 chunk
GEMMS = {"addmm", "mm", "bmm", "convolution", "convolution_backward"}
COPIES_STRIDED = {
    "native_layer_norm",
    "native_layer_norm_backward",
    "adaln_modulate",
    "gated_residual_adaln",
    "adaln_modulate_bwd",
}
BATCH = 2


def classify(records, param_ids: set, grad_shapes: set) -> dict:
    """{part: [bytes, launches]} with the model's parts: gemm, attention, weight_cast (autocast casts of parameters
    and of weight gradients back to fp32), elementwise (everything else, plus the copies of strided inputs)."""
    parts = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        name = r["name"]
        if name.startswith("_scaled_dot_product"):
            part = "attention"
        elif name in GEMMS:
            part = "gemm"
        elif name == "_to_copy" and (
            set(r["in_ids"]) & param_ids or (r["out_dtypes"] == [torch.float32] and r["out_shapes"][0] in grad_shapes)
        ):
            part = "weight_cast"
        else:
            part = "elementwise"
        read = r["read"]
        if name == "embedding":  # a gather reads the rows it returns and the indices, not the whole table
            read = r["written"] + sum(r["in_bytes"][1:])
        parts[part][0] += read + r["written"]
        parts[part][1] += 1
        if name in COPIES_STRIDED:
            parts["elementwise"][0] += 2 * sum(r["strided_3d"])
            parts["elementwise"][1] += len(r["strided_3d"])
    return dict(parts)


def model_parts(ops) -> dict:
    parts = defaultdict(lambda: [0.0, 0.0])
    for o in ops:
        parts[o.part][0] += o.bytes
        parts[o.part][1] += o.launches
    return dict(parts)


def assert_close(predicted: dict, measured: dict, tol: float = TOL):
    assert set(predicted) == set(measured), (predicted.keys(), measured.keys())
    for part, (m_bytes, m_launch) in measured.items():
        p_bytes, p_launch = predicted[part]
        assert abs(p_bytes - m_bytes) <= tol * m_bytes, (part, "bytes", p_bytes, m_bytes)
        assert abs(p_launch - m_launch) <= tol * m_launch, (part, "launches", p_launch, m_launch)


def within(predicted: dict, measured: dict, tol: float = TOL) -> bool:
    try:
        assert_close(predicted, measured, tol)
    except AssertionError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# The SiT step: forward, losses, backward
# ---------------------------------------------------------------------------------------------------------------
def _measure_sit(model: str, impl: str, amp: bool, depth: int | None = None, model_kw=(), ac: str = "none"):
    """Bytes/launches by part and saved-for-backward bytes of one training_loss + backward, as the trainer runs it
    (``model_kw``: REG / iREPA keywords of the SiT; ``ac``: engine/activation_checkpoint.py applied to it)."""
    from repa_fast.engine.activation_checkpoint import apply_activation_checkpointing
    from repa_fast.engine.trainer import sample_posterior
    from repa_fast.models.sit import build_sit
    from repa_fast.objective import training_loss

    model_kw = dict(model_kw)
    with FakeTensorMode(allow_non_fake_inputs=True):
        extra = dict(depth=depth, encoder_depth=2) if depth else {}
        m = build_sit(model, input_size=32, z_dims=[768], impl=impl, attn_backend="sdpa", **extra, **model_kw)
        apply_activation_checkpointing(m, ac)
        weights = {p.untyped_storage()._cdata for p in m.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in weights:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        moments, y = torch.randn(BATCH, 8, 32, 32), torch.randint(0, 1000, (BATCH,))
        targets = [torch.randn(BATCH, 256, 768)]
        cls = dict(cls_targets=[torch.randn(BATCH, 768)]) if model_kw.get("reg") else {}
        with TrafficCounter(record=True) as counter:
            x0 = sample_posterior(moments, 0.18215)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                amp_dtype = torch.bfloat16 if amp else None
                losses = training_loss(m, x0, y, targets, impl=impl, autocast_dtype=amp_dtype, **cls)
            losses["loss"].backward()
        params = {id(p) for p in m.parameters()}
        grad_shapes = {tuple(p.shape) for p in m.parameters() if p.requires_grad}
    return classify(counter.records, params, grad_shapes), sum(saved.values())


def _model_sit(model: str, structure, depth: int | None = None, model_kw=()):
    sh = sit_shape(model, encoder_depth=8, **dict(model_kw))
    if depth:
        sh = replace(sh, depth=depth, encoder_depth=2)
    return SiTStep(sh, structure, BATCH, CPU).ops()


def _structure(impl: str = "triton", amp: bool = True, **change):
    """AS_BUILT as the CPU runs it: any flash SDPA backend costs the same bytes (the CPU runs SDPA's flash kernel)."""
    return replace(AS_BUILT, impl=impl, amp="bf16" if amp else "no", attn_backend="sdpa-flash", **change)


# SiT-XL/2 runs 3 of its 28 blocks (its widths, 1152 and 16 heads of 72): the model is evaluated at the same depth,
# so nothing is scaled; blocks are identical, and block 0 and the projector block are included. REG (1 + T tokens,
# its embedding, final layer and class-token loss) and iREPA's conv projector run SiT-B/2 at 4 blocks.
XL_DEPTH = 3
REG = (("reg", True),)
CONV = (("projection_layer_type", "conv"),)
SIT_CASES = [
    ("SiT-XL/2", "triton", True, XL_DEPTH, ()),
    ("SiT-B/2", "triton", True, None, ()),
    ("SiT-B/2", "ref", True, None, ()),
    ("SiT-B/2", "triton", False, None, ()),
    ("SiT-B/2", "triton", True, 4, REG),
    ("SiT-B/2", "triton", True, 4, CONV),
]


def _case_id(c) -> str:
    return f"{c[0]}-{c[1]}-{'bf16' if c[2] else 'fp32'}" + "".join(f"-{k}={v}" for k, v in c[4])


@pytest.fixture(scope="module")
def measured_sit():
    return {case: _measure_sit(*case) for case in SIT_CASES}


@pytest.mark.parametrize("case", SIT_CASES, ids=_case_id)
def test_sit_step_bytes_and_launches_match(measured_sit, case):
    model, impl, amp, depth, model_kw = case
    parts, _ = measured_sit[case]
    predicted = model_parts(_model_sit(model, _structure(impl, amp), depth, model_kw))
    assert_close(predicted, parts)
    assert (
        parts["elementwise"][1] > 150 and parts["gemm"][0] > 1e8
    )  # the counter saw a whole step (XL at 3 blocks: 180)


@pytest.mark.parametrize("case", [c for c in SIT_CASES if c[2]], ids=_case_id)
def test_saved_activations_match_the_memory_model(measured_sit, case):
    """Saved-for-backward storages = the model's activations + the autocast bf16 weight copies it marks kept."""
    model, impl, amp, depth, model_kw = case
    _, saved = measured_sit[case]
    ops = _model_sit(model, _structure(impl), depth, model_kw)
    predicted = sum(o.saved for o in ops if o.stage == "fwd")
    assert abs(predicted - saved) <= 0.02 * saved, (predicted, saved)


def test_perturbed_sit_model_fails(measured_sit):
    """Each merged cut is visible: claiming the code without it (fp32 adaLN outputs, GELU or the gated residual
    unfused, block 0 strided) or the reference's unfused path is rejected."""
    parts, _ = measured_sit[SIT_CASES[0]]
    for wrong in (
        dict(adaln_out="fp32"),
        dict(bias_gelu="unfused"),
        dict(mlp_gate="unfused"),
        dict(contiguous_residual=False),
        dict(impl="ref"),
    ):
        predicted = model_parts(_model_sit("SiT-XL/2", _structure(**wrong), XL_DEPTH))
        assert not within(predicted, parts), wrong


def test_perturbed_reference_path_fails(measured_sit):
    """The reference path now gets a contiguous residual too: claiming its LayerNorm copies (no cut 2a) is
    rejected, and so is the model of the other path."""
    parts, _ = measured_sit[SIT_CASES[2]]
    for wrong in (dict(contiguous_residual=False), dict(impl="triton")):
        structure = replace(_structure("ref"), **wrong)
        assert not within(model_parts(_model_sit("SiT-B/2", structure)), parts), wrong


def test_perturbed_reg_and_projector_fail(measured_sit):
    """A model without REG's class token, or with REPA's MLP instead of iREPA's conv projector, is rejected."""
    reg, conv = (measured_sit[c][0] for c in SIT_CASES[4:6])
    assert not within(model_parts(_model_sit("SiT-B/2", _structure(), 4)), reg)
    assert not within(model_parts(_model_sit("SiT-B/2", _structure(), 4, (("projection_layer_type", "linear"),))), conv)
    assert not within(model_parts(_model_sit("SiT-B/2", _structure(), 4)), conv)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, clipping, EMA on SiT-XL/2's 675M parameters (real shapes, no data)
# ---------------------------------------------------------------------------------------------------------------
def _xl_params(device_ctx):
    from repa_fast.models.sit import build_sit

    with device_ctx:
        m = build_sit("SiT-XL/2", input_size=32, z_dims=[768])
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
    return m


def _totals(records, host: str | None = None) -> dict:
    """{"device" | "host": [bytes, launches]}; ``host``: the device type of tensors that live on the host in a GPU
    run (the reference's AdamW step counters, "cpu" when everything else is on "meta")."""
    out = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        part = "host" if r["in_devices"] == {host} else "device"
        out[part][0] += r["read"] + r["written"] if part == "device" else 0.0  # host memory is not HBM traffic
        out[part][1] += 1
    return dict(out)


def _counts(m):
    trainable = [p for p in m.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    return float(sum(p.numel() for p in trainable)), len(trainable), float(frozen)


def _fixed_step(max_norm: float, ema_kernel: bool):
    """Backend.clip_and_step (one norm, the clip as the fused AdamW's grad_scale, the device-side skip) then
    EMA.update, on the second step (lazy state made by the first). ``ema_kernel``: the EMA gate's CUDA choice, the
    one-pass kernel (tests/engine/test_ema_one_pass.py's way: ``use_triton`` patched to True; under FakeTensorMode the
    custom op's fake runs, so the counter sees one ``ema_update_`` reading and writing what the kernel does);
    otherwise the CPU's choice, the three-pass reference."""
    from repa_fast.engine.ema import EMA
    from repa_fast.engine.parallel.base import Backend
    from repa_fast.kernels import ema_update

    with pytest.MonkeyPatch.context() as mp, FakeTensorMode(allow_non_fake_inputs=True) as mode:
        if ema_kernel:
            mp.setattr(ema_update, "use_triton", lambda op, impl, x: True)
        m = _xl_params(mode)
        backend = Backend("cpu")
        backend.optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
        backend.clip_and_step(m, max_norm)  # lazy state
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        ema = EMA(m)
        with TrafficCounter(record=True) as opt:
            _, skipped = backend.clip_and_step(m, max_norm)
        with TrafficCounter(record=True) as avg:
            ema.update(m, 0.9999, skipped)
        counts = _counts(m)
    return opt.records, avg.records, counts


@pytest.fixture(scope="module")
def ours_fixed():
    return _fixed_step(1.0, ema_kernel=True)


def _model_totals(ops) -> dict:
    out = defaultdict(lambda: [0.0, 0.0])
    for o in ops:
        key = "host" if o.part == "host" else "device"
        out[key][0] += o.bytes
        out[key][1] += o.launches
    return dict(out)


def test_ours_clip_and_optimizer_match(ours_fixed):
    """Cut 2c as built: the norm (3 ops), the divisor, the skip test, the step counters and one fused AdamW that also
    writes the scaled gradients back; the clipping before the cut (a scale pass of its own) is rejected."""
    opt, _, (P, n, _) = ours_fixed
    ops = clip_ops(AS_BUILT, P, n, 1) + optimizer_ops(AS_BUILT, P, n, 1)
    assert_close(_model_totals(ops), _totals(opt))
    norm = 3  # _foreach_norm, stack, linalg_vector_norm: the clipping's one reduction
    assert_close(_model_totals(clip_ops(AS_BUILT, P, n, 1)[:norm]), _totals(opt[:norm]))
    fused = next(r for r in opt if r["name"] == "_fused_adamw_")
    assert fused["written"] == 16 * P  # p, m, v and the scaled gradients
    for wrong in (BEFORE_ISSUE_18, replace(AS_BUILT, clip="norm_only"), replace(AS_BUILT, optimizer="foreach")):
        assert not within(_model_totals(clip_ops(wrong, P, n, 1) + optimizer_ops(wrong, P, n, 1)), _totals(opt))


def test_no_clipping_still_computes_the_norm_and_writes_no_gradients():
    """--max-grad-norm 0: the norm is the non-finite check, the step gets no grad_scale (clip="norm_only")."""
    opt, _, (P, n, _) = _fixed_step(0.0, ema_kernel=True)
    st = replace(AS_BUILT, clip="norm_only")
    assert_close(_model_totals(clip_ops(st, P, n, 1) + optimizer_ops(st, P, n, 1)), _totals(opt))
    assert next(r for r in opt if r["name"] == "_fused_adamw_")["written"] == 12 * P
    assert not within(_model_totals(clip_ops(AS_BUILT, P, n, 1) + optimizer_ops(AS_BUILT, P, n, 1)), _totals(opt))


def test_ours_ema_matches(ours_fixed):
    """Cut 2b as the GPU runs it: one op, 2 reads + 1 write per element and the 1-byte skip flag."""
    _, avg, (P, n, frozen) = ours_fixed
    assert [r["name"] for r in avg] == ["ema_update_"]
    assert_close(_model_totals(ema_ops(AS_BUILT, P, n, frozen, 1)), _totals(avg))
    assert not within(_model_totals(ema_ops(BEFORE_ISSUE_18, P, n, frozen, 1)), _totals(avg))


def test_cpu_ema_reference_is_the_three_pass_model():
    """Where the gate picks the reference (CPU), the EMA is the three foreach passes the model calls foreach3."""
    _, avg, (P, n, frozen) = _fixed_step(1.0, ema_kernel=False)
    assert_close(_model_totals(ema_ops(BEFORE_ISSUE_18, P, n, frozen, 1)), _totals(avg))
    assert not within(_model_totals(ema_ops(AS_BUILT, P, n, frozen, 1)), _totals(avg))


def test_reference_optimizer_clip_and_ema_match():
    """The reference's calls (train.py: GradScaler.unscale_ via accelerate, clip_grad_norm_, foreach AdamW with
    weight decay 0, update_ema) on meta tensors; its AdamW step counters stay on the host, as on a GPU."""
    m = _xl_params(torch.device("meta"))
    params = list(m.parameters())
    P, n, frozen = _counts(m)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
    opt.step()
    ema = {k: torch.empty_like(p) for k, p in m.named_parameters()}
    with TrafficCounter(record=True) as c:
        found, inv = torch.zeros((), device="meta"), torch.ones((), device="meta")
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params if p.grad is not None], found, inv)
        opt.step()
        with torch.no_grad():
            for k, p in m.named_parameters():
                ema[k].mul_(0.9999).add_(p.data, alpha=1e-4)
    st = replace(REFERENCE, clip="off")  # clip_grad_norm_ cannot run foreach on meta: checked on fake CPU below
    predicted = optimizer_ops(st, P, n, 1) + ema_ops(st, P, n, frozen, 1)
    measured = _totals(c.records, host="cpu")
    measured["device"][1] -= 2  # the zeros/ones made here stand for GradScaler's own found_inf / inv_scale
    predicted = [o for o in predicted if o.name not in ("scaler.found_inf", "scaler.inv_scale", "scaler.update")]
    assert_close(_model_totals(predicted), measured)


def test_reference_clip_matches():
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        m = _xl_params(mode)
        P, n, _ = _counts(m)
        with TrafficCounter(record=True) as c:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
    assert_close(_model_totals(clip_ops(REFERENCE, P, n, 1)), _totals(c.records))


# ---------------------------------------------------------------------------------------------------------------
# Target encoder, the reference's attention and alignment loop
# ---------------------------------------------------------------------------------------------------------------
def test_encoder_forward_matches():
    from repa_fast.models.encoders import load_encoders

    enc = load_encoders("dinov2-vit-b", 256, pretrained=False, attn_backend="sdpa")[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.randint(0, 256, (BATCH, 3, 256, 256), dtype=torch.uint8)
        with TrafficCounter(record=True) as c, torch.autocast("cpu", dtype=torch.bfloat16):
            enc(images)
    st = replace(AS_BUILT, encoder_attn="sdpa-flash")
    ops = encoder_ops(st, encoder_arch("dinov2-vit-b"), BATCH, 256, 16, CPU)
    measured = {"encoder": [float(sum(r["read"] + r["written"] for r in c.records)), float(len(c.records))]}
    assert_close(model_parts(ops), measured)


def _hub_attention(qkv_linear, x, heads):
    """The op sequence of dinov2/layers/attention.py Attention.forward (reshape/permute, q * scale, explicit
    softmax, transpose back), to measure what the hub encoder's fallback dispatches."""
    B, N, C = x.shape
    qkv = qkv_linear(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def test_hub_math_attention_matches():
    B, N, C, H = BATCH, 257, 768, 12
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(B, N, C, dtype=torch.bfloat16)
        qkv = torch.nn.functional.linear(x, torch.randn(3 * C, C, dtype=torch.bfloat16))
        with TrafficCounter(record=True) as c, torch.no_grad():
            _hub_attention(lambda _: qkv, x, H)  # the attention only, not the projection
    measured = {"attention": [float(sum(r["read"] + r["written"] for r in c.records)), float(len(c.records))]}
    assert_close(model_parts(math_attention_forward("attn", B, H, N, C, 2, CPU)), measured)


def test_reference_per_sample_alignment_matches():
    """sihyun-yu/REPA loss.py:81-88 (accelerate hands the loss fp32 outputs): the per-sample loop, forward and
    backward down to the projector output."""
    B, T, z = BATCH, 256, 768
    with FakeTensorMode(allow_non_fake_inputs=True):
        leaf = torch.randn(B, T, z, dtype=torch.bfloat16, requires_grad=True)
        zs = [torch.randn(B, T, z)]
        with TrafficCounter(record=True) as c:
            zs_tilde = [leaf.float()]
            proj_loss = 0.0
            for zk, zt in zip(zs, zs_tilde):
                for z_j, zt_j in zip(zk, zt):
                    zt_j = torch.nn.functional.normalize(zt_j, dim=-1)
                    z_j = torch.nn.functional.normalize(z_j, dim=-1)
                    proj_loss += torch.mean(-(z_j * zt_j).sum(dim=-1), dim=[])
            proj_loss /= len(zs) * B
            proj_loss.backward()
    fwd, bwd = per_sample_alignment("align", B, T, z, 2)
    scalar_grad = 1  # backward() seeds the scalar gradient with ones_like
    measured = {"elementwise": [float(sum(r["read"] + r["written"] for r in c.records)), float(len(c.records))]}
    predicted = model_parts(fwd + bwd)
    predicted["elementwise"][1] += scalar_grad
    assert_close(predicted, measured)


def test_sit_with_explicit_attention_totals_match():
    """attn_backend="math" (kernels/attention.py attention_ref, the reference's --no-fused-attn): the model prices the
    scores, softmax and copies as attention; the counter sees them as bmm and elementwise ops, so totals compare."""
    from repa_fast.engine.trainer import sample_posterior
    from repa_fast.models.sit import build_sit
    from repa_fast.objective import training_loss

    with FakeTensorMode(allow_non_fake_inputs=True):
        m = build_sit("SiT-B/2", input_size=32, z_dims=[768], impl="triton", attn_backend="math")
        moments, y = torch.randn(BATCH, 8, 32, 32), torch.randint(0, 1000, (BATCH,))
        with TrafficCounter(record=True) as c:
            x0 = sample_posterior(moments, 0.18215)
            losses = training_loss(
                m, x0, y, [torch.randn(BATCH, 256, 768)], impl="triton", autocast_dtype=torch.bfloat16
            )
            losses["loss"].backward()
        grads = {tuple(p.shape) for p in m.parameters() if p.requires_grad}
        parts = classify(c.records, {id(p) for p in m.parameters()}, grads)
    predicted = model_parts(_model_sit("SiT-B/2", replace(AS_BUILT, attn_backend="math")))
    total = lambda d: {"all": [sum(v[0] for v in d.values()), sum(v[1] for v in d.values())]}  # noqa: E731
    assert_close(total(predicted), total(parts))
