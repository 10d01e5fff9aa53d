"""impl resolution, import without Triton, torch.library registration (opcheck) and torch.compile of every op."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from repa_fast.kernels import (
    _dispatch,
    adaln,
    adaln_modulate,
    align_loss,
    alignment_loss,
    gated_residual_adaln,
    qk_norm_rope,
    rope,
    rope_2d_cos_sin,
)
from tests.conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_use_triton_resolution(monkeypatch):
    x = torch.randn(2)
    assert _dispatch.use_triton("op", "ref", x) is False
    assert _dispatch.use_triton("op", "auto", x) is False  # CPU tensor: the reference
    assert _dispatch.use_triton("op", "triton", x) is True  # the interpreter is on (tests/conftest.py)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton("op", "triton", x)
    with pytest.raises(ValueError, match="must be one of"):
        _dispatch.use_triton("op", "fast", x)


def test_choice_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    x, s = torch.randn(1, 2, 8), torch.randn(1, 8)
    with caplog.at_level(logging.INFO, logger="repa_fast.kernels"):
        for _ in range(3):
            adaln_modulate(x, s, s, impl="triton")
            adaln_modulate(x, s, s, impl="ref")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("repa_fast.kernels: adaln_modulate uses triton") == 1
    assert msgs.count("repa_fast.kernels: adaln_modulate uses the PyTorch reference") == 1


def test_package_imports_and_runs_without_triton():
    """With triton unimportable: the package imports, references run, 'auto' picks them, 'triton' explains."""
    code = """
import sys; sys.modules["triton"] = None
import torch
import repa_fast.kernels as K
from repa_fast.kernels import _dispatch
assert not _dispatch.has_triton_package()
x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
y = K.adaln_modulate(x, s, s)
assert torch.allclose(y, K.adaln.adaln_modulate_ref(x, s, s))
K.alignment_loss([x], [x]); K.apply_rope_2d(torch.randn(1, 4, 2, 8), *K.rope_2d_cos_sin(8, 2, 2))
try:
    K.adaln_modulate(x, s, s, impl="triton")
except RuntimeError as e:
    assert "needs the triton package" in str(e); print("OK")
"""
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_registered_ops_pass_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every custom op."""
    rg = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    x, br, sh, sc, g, w = rg(2, 5, 130), rg(2, 5, 130), rg(2, 130), rg(2, 130), rg(2, 130), rg(130)
    _opcheck(adaln._adaln_modulate_op, (x, sh, sc, w, 1e-6, True, torch.float32))
    _opcheck(adaln._gated_adaln_op, (x, br, g, sh, sc, None, 1e-6, False, torch.float32, torch.float32))
    _opcheck(
        adaln._adaln_bwd_op,
        (x.detach(), br.detach(), x.detach(), br.detach(), g.detach(), sc.detach(), None, 1e-6, False, torch.float32),
    )
    _opcheck(align_loss._cos_rows_op, (rg(10, 130), torch.randn(10, 130), 1e-12))
    _opcheck(
        align_loss._cos_rows_bwd_op, (torch.randn(10), torch.randn(10, 130), torch.randn(10, 130), 1e-12, True, False)
    )
    cos, sin = rope_2d_cos_sin(8, 2, 2)
    _opcheck(rope._norm_rope_op, (rg(2, 4, 3, 8), rg(8), rg(8), cos, sin, 1e-5, 1, torch.float32))
    _opcheck(
        rope._norm_rope_bwd_op,
        (torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), None, cos, sin, 1e-5, 2, torch.float32),
    )


def _all_ops(impl):
    cos, sin = rope_2d_cos_sin(8, 2, 2)

    def f(x, br, g, sh, sc, qkv, w, b, p, z):
        y = adaln_modulate(x, sh, sc, impl=impl)
        x_new, y2 = gated_residual_adaln(x, br, g, sh, sc, impl=impl)
        q = qk_norm_rope(qkv[:, :, 0], w, b, cos, sin, impl=impl)
        k = rope.apply_rope_2d(qkv[:, :, 1], cos, sin, impl=impl)
        loss = alignment_loss([p], [z], impl=impl)
        return (y * y2).sum() + x_new.square().mean() + (q * k).sum() + loss

    return f


def test_every_op_traces_under_torch_compile_fullgraph():
    """torch.compile(backend="aot_eager", fullgraph=True) over all ops with Triton kernels equals eager."""
    torch._dynamo.reset()
    inputs = [
        torch.randn(*s, requires_grad=True)
        for s in [(2, 5, 130), (2, 5, 130), (2, 130), (2, 130), (2, 130), (2, 4, 3, 3, 8), (8,), (8,), (2, 5, 64)]
    ]
    inputs.append(torch.randn(2, 5, 64))
    eager = _all_ops("triton")(*inputs)
    eager_grads = torch.autograd.grad(eager, [t for t in inputs if t.requires_grad])
    compiled = torch.compile(_all_ops("triton"), backend="aot_eager", fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, [t for t in inputs if t.requires_grad])
    assert_close(compiled, eager)
    for a, e in zip(compiled_grads, eager_grads):
        assert_close(a, e)
    ref = _all_ops("ref")(*inputs)
    assert_close(compiled, ref.double(), "reduction")
