"""The one-pass EMA kernel (repa_fast/kernels/ema_update.py) through Triton's interpreter, and compiled for sm_90a.

Bit for bit the three-pass reference it replaces (fresh random lists: odd sizes, multi-block tensors, ragged tails,
unaligned views, empty tensors; skip False / True / None), within 2 ulps of REPA's ``ema.mul_(decay).add_(param,
alpha=1 - decay)`` (train.py:81-91), an exact no-op on a skipped step, and chosen by the gate only where it runs.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from repa_fast.kernels import ema_update as K
from repa_fast.kernels.ema_update import ema_update_, ema_update_ref

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1152,), (37,), (300, 7), (1,), (0,), (1000, 3), (2 * K.BLOCK_INTERPRETED + 5,), (8, 130)]


def _lists(near: bool = True):
    """Fresh EMA / parameter lists; two unaligned views (an odd offset into a buffer) among them."""
    ema = [torch.randn(s) for s in SHAPES] + [torch.randn(131)[1:], torch.randn(3, 77)[:, 1:].contiguous()]
    params = [e + 0.01 * torch.randn_like(e) if near else torch.randn_like(e) for e in ema]
    params[-2] = torch.randn(133)[3:]  # a view at another odd offset
    return ema, params


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in fp32 representable steps (same-sign values: the int32 bit patterns are ordered)."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@pytest.mark.parametrize("decay", [0.9999, 0.75])
@pytest.mark.parametrize("skip", [False, True, None])
def test_kernel_equals_the_three_pass_reference_bitwise(decay, skip):
    ema, params = _lists()
    want = [e.clone() for e in ema]
    flag = None if skip is None else torch.tensor(skip)
    ema_update_ref(want, params, decay, flag)
    before = [e.clone() for e in ema]
    ema_update_(ema, params, decay, flag, impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(ema, want))
    moved = [not torch.equal(a, b) for a, b in zip(ema, before) if a.numel()]
    assert all(moved) if not skip else not any(moved)  # every element written, or none


def test_plan_splits_aligned_and_ragged_blocks():
    ema, params = _lists()
    pairs = [(e, p) for e, p in zip(ema, params) if e.numel()]
    _, _, tables = K.launch_plan([e for e, _ in pairs], [p for _, p in pairs], K.BLOCK_INTERPRETED)
    assert [aligned for _, aligned in tables] == [True, False]
    counts = torch.cat([t[:, 2] for t, _ in tables])
    assert int(counts.sum()) == sum(e.numel() for e in ema) and int(counts.max()) <= K.BLOCK_INTERPRETED
    aligned = tables[0][0]
    assert bool((aligned % 4 == 0).all())


def test_several_steps_stay_within_two_ulps_of_the_reference_formula():
    """REPA's mul/add form with d = fl32(decay) vs ours with 1 - w: each within 1 ulp of its exact value, apart by at
    most 2 ulps (the kernel's docstring); and the kernel is within 1 ulp of the exact (1 - w) e + w p."""
    ema, params = _lists()
    ema, params = [e for e in ema if e.numel()], [p for p in params if p.numel()]
    repa = [e.clone() for e in ema]
    decay = 0.9999
    w = torch.tensor(1 - decay, dtype=torch.float32).double()
    for _ in range(3):
        exact = [e.double() + w * (p.double() - e.double()) for e, p in zip(ema, params)]
        ema_update_(ema, params, decay, torch.tensor(False), impl="triton")
        for r, p in zip(repa, params):
            r.mul_(decay).add_(p, alpha=1 - decay)
        for e, r, x in zip(ema, repa, exact):
            same = (e.sign() == r.sign()) & (e.sign() == x.sign()) & (e != 0)
            assert _ulps(e[same], r[same]) <= 2
            assert _ulps(e[same], x.float()[same]) <= 1
            torch.testing.assert_close(e.double(), x, atol=1e-7, rtol=1e-7)
        for r, e in zip(repa, ema):  # restart the comparison from a common state each step
            r.copy_(e)
        params = [p + 0.01 * torch.randn_like(p) for p in params]


def test_skipped_step_is_an_exact_no_op_even_for_non_finite_params():
    ema, params = _lists()
    params[0] = params[0].clone().fill_(float("inf"))
    params[2][0, 0] = float("nan")
    before = [e.clone() for e in ema]
    ema_update_(ema, params, 0.9999, torch.tensor(True), impl="triton")
    assert all(torch.equal(a, b) for a, b in zip(ema, before))


def test_gate_picks_the_kernel_only_where_it_runs(monkeypatch):
    """impl=auto on CPU tensors: the reference (three foreach passes); with the gate forced, the one kernel op."""
    from repa_fast.engine.profiling import count_ops

    ema, params = _lists()
    counts = count_ops(lambda: ema_update_(ema, params, 0.9, torch.tensor(False)))
    assert counts["aten._foreach_sub"] >= 1 and "repa_fast.ema_update_" not in counts
    monkeypatch.setattr(K, "use_triton", lambda op, impl, x: True)
    counts = count_ops(lambda: ema_update_(ema, params, 0.9, torch.tensor(False)))
    assert counts["repa_fast.ema_update_"] == 1 and "aten._foreach_sub" not in counts
    bf16 = [e.bfloat16() for e in ema]  # not fp32: the kernel does not take it, the reference does
    counts = count_ops(lambda: ema_update_(bf16, [p.bfloat16() for p in params], 0.9, torch.tensor(False)))
    assert "repa_fast.ema_update_" not in counts
    with pytest.raises(ValueError, match="2 EMA tensors but 1 parameters"):
        ema_update_(ema[:2], params[:1], 0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("skip", [False, True])
def test_compiled_kernel_equals_the_reference_on_cuda(skip):
    """On a GPU: the compiled kernel (one pass, no FMA) against the reference's CUDA foreach passes, bit for bit."""
    ema, params = _lists()
    ema, params = [e.cuda() for e in ema], [p.cuda() for p in params]
    want = [e.clone() for e in ema]
    flag = torch.tensor(skip, device="cuda")
    ema_update_ref(want, params, 0.9999, flag)
    ema_update_(ema, params, 0.9999, flag)  # impl="auto" picks the kernel on CUDA
    assert all(torch.equal(a, b) for a, b in zip(ema, want))


# ----------------------------------------------------------------------------------------------------------------
# Compiled for sm_90a (no GPU needed): the launch the trainer makes on a GPU compiles, keeps the op-by-op rounding
# (no FFMA: enable_fp_fusion=False), uses 16-byte loads on aligned blocks and does not spill.
# ----------------------------------------------------------------------------------------------------------------
def _worker(out_path: str) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.kernels import test_aot_sm90 as A

    A._TRITON_TYPES[torch.uint8] = "u8"  # the skip flag (a bool viewed as one byte)
    meta = lambda *s, dtype=torch.float32: torch.empty(s, dtype=dtype, device="meta")  # noqa: E731
    reports = []
    for aligned in (True, False):
        for fusion in (False, True):
            args = (meta(64), meta(64), meta(1, dtype=torch.uint8), meta(9, 3, dtype=torch.int64), 1e-4)
            kw = dict(BLOCK=K.BLOCK, HAS_SKIP=True, ALIGNED=aligned, num_warps=K.NUM_WARPS, enable_fp_fusion=fusion)
            sig, const, attrs, opts = A.specialize(K._ema_update_kernel, args, kw)
            src = ASTSource(K._ema_update_kernel, sig, const, attrs)
            compiled = A.triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / "k.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                sass = A._run([str(A.nvidia_tool("cuobjdump")), "--dump-sass", str(cubin)])
                usage = A._run([str(A.nvidia_tool("cuobjdump")), "--dump-resource-usage", str(cubin)])
            reports.append(
                {
                    "aligned": aligned,
                    "fusion": fusion,
                    "ffma": sass.count("FFMA"),
                    "accesses": dict(A.global_accesses(sass)),
                    **A.parse_resource_usage(usage),
                }
            )
    Path(out_path).write_text(json.dumps(reports))


@pytest.mark.slow
def test_compiles_for_sm90_without_fma_and_with_vector_loads():
    pytest.importorskip("triton")
    from tests.kernels.test_aot_sm90 import nvidia_tool, resident_warps

    if nvidia_tool("ptxas") is None or nvidia_tool("cuobjdump") is None:
        pytest.skip("the triton wheel has no bundled ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports = json.loads(out.read_text())
    by = {(r["aligned"], r["fusion"]): r for r in reports}
    for aligned in (True, False):
        r = by[(aligned, False)]  # what the launcher runs
        assert r["ffma"] == 0 and r["stack"] == 0 and r["local"] == 0, r
        assert resident_warps(r["regs"], r["shared"], K.NUM_WARPS) >= 16, r
    assert by[(True, True)]["ffma"] > 0  # the check can fail: with contraction on, d * w + e becomes an FFMA
    vec = by[(True, False)]["accesses"]
    assert vec.get("LDG.E.128", 0) >= 8 and vec.get("STG.E.128", 0) >= 4 and "LDG.E" not in vec, vec
    assert "LDG.E.128" not in by[(False, False)]["accesses"]  # unaligned blocks: scalar loads, still one pass


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1])
