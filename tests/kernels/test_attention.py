"""Attention dispatch: numerics of the CPU backends, and every gate of the GPU chain, proven on CPU by
monkeypatching the capability functions and installing fake flash_attn / flash_attn_interface / xformers modules
that check the call's layout."""

import importlib
import logging
import sys
import types

import pytest
import torch

from repa_fast.kernels import _dispatch
from repa_fast.kernels.attention import attention, attention_ref, select_backend
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64

attn_mod = importlib.import_module("repa_fast.kernels.attention")  # the package re-exports a function of that name


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    for name in ("flash_attn", "flash_attn_interface", "xformers", "xformers.ops"):
        monkeypatch.setitem(sys.modules, name, None)  # "not installed", whatever this machine has


def _qkv(B=2, N=9, H=3, Dh=72, dtype=torch.float32):
    return [torch.randn(B, N, H, Dh, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_cpu_backends_match_fp64(backend):
    check_against_fp64(
        lambda q, k, v: attention(q, k, v, attn_backend=backend),
        attention_ref,
        _qkv(),
        ["elementwise"],
        ["elementwise"] * 3,
    )


def test_custom_scale():
    q, k, v = (t.detach() for t in _qkv(Dh=64))
    assert_close(attention(q, k, v, "sdpa", scale=0.3), attention_ref(q.double(), k.double(), v.double(), 0.3))


class _FakeFlash:
    """Stands in for flash_attn_func: checks (B, N, H, Dh) inputs passed as-is (no transpose, no copy)."""

    def __init__(self, returns_tuple=False):
        self.calls, self.returns_tuple = [], returns_tuple

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.calls.append((q.data_ptr(), k.data_ptr(), v.data_ptr(), tuple(q.shape), softmax_scale, causal))
        out = attention_ref(q.float(), k.float(), v.float(), softmax_scale).to(q.dtype)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if self.returns_tuple else out


def _install(monkeypatch, module, func_name, fn):
    mod = types.ModuleType(module)
    setattr(mod, func_name, fn)
    monkeypatch.setitem(sys.modules, module, mod)
    if module == "xformers.ops":
        parent = types.ModuleType("xformers")
        parent.ops = mod
        monkeypatch.setitem(sys.modules, "xformers", parent)


def _cap(monkeypatch, cap):
    monkeypatch.setattr(attn_mod, "cuda_capability", lambda device: cap)


def test_flash2_gets_bnhd_layout_and_matches(monkeypatch):
    fa2 = _FakeFlash()
    _install(monkeypatch, "flash_attn", "flash_attn_func", fa2)
    _cap(monkeypatch, (8, 0))
    q, k, v = (t.detach() for t in _qkv(dtype=torch.bfloat16))
    assert select_backend(q) == "flash2"
    out = attention(q, k, v)
    assert fa2.calls == [(q.data_ptr(), k.data_ptr(), v.data_ptr(), (2, 9, 3, 72), None, False)]
    assert out.shape == q.shape
    assert_close(out, attention_ref(q.double(), k.double(), v.double()))


def test_flash3_preferred_on_hopper_and_tuple_return(monkeypatch):
    fa2, fa3 = _FakeFlash(), _FakeFlash(returns_tuple=True)
    _install(monkeypatch, "flash_attn", "flash_attn_func", fa2)
    _install(monkeypatch, "flash_attn_interface", "flash_attn_func", fa3)
    _cap(monkeypatch, (9, 0))
    q, k, v = (t.detach() for t in _qkv(dtype=torch.float16))
    out = attention(q, k, v, attn_backend="flash")
    assert len(fa3.calls) == 1 and not fa2.calls
    assert_close(out, attention_ref(q.double(), k.double(), v.double()))
    _cap(monkeypatch, (8, 6))  # FA3 is Hopper-only: Ampere falls back to FA2
    attention(q, k, v)
    assert len(fa2.calls) == 1


def test_gates_fall_through_to_xformers_then_sdpa(monkeypatch):
    xf_calls = []

    def fake_xformers(q, k, v, scale=None):
        xf_calls.append(tuple(q.shape))
        return attention_ref(q.float(), k.float(), v.float(), scale).to(q.dtype)

    _install(monkeypatch, "flash_attn", "flash_attn_func", _FakeFlash())
    _install(monkeypatch, "xformers.ops", "memory_efficient_attention", fake_xformers)
    q = _qkv(dtype=torch.bfloat16)[0].detach()
    _cap(monkeypatch, (7, 5))  # FA2 needs sm80
    assert select_backend(q) == "xformers"
    _cap(monkeypatch, (9, 0))
    assert select_backend(q.float()) == "xformers"  # flash needs fp16/bf16
    assert select_backend(torch.zeros(1, 4, 2, 512, dtype=torch.bfloat16)) == "xformers"  # head_dim > 256
    out = attention(q.float(), q.float(), q.float())
    assert xf_calls == [(2, 9, 3, 72)] and out.shape == q.shape
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    assert select_backend(q.float()) == "sdpa"
    _cap(monkeypatch, None)  # a CPU tensor never leaves SDPA
    assert select_backend(q) == "sdpa"


def test_explicit_backends_fail_clearly_when_unavailable(monkeypatch):
    q = _qkv(dtype=torch.bfloat16)[0].detach()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        select_backend(q, "flash")
    _cap(monkeypatch, (9, 0))
    with pytest.raises(RuntimeError, match=r"repa_fast\[flash\]"):
        select_backend(q, "flash")
    with pytest.raises(RuntimeError, match="pip install xformers"):
        select_backend(q, "xformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend(q, "cudnn")
    with pytest.raises(ValueError, match="of one shape"):
        attention(q, q, q[..., :8])


def test_broken_flash_install_counts_as_absent(monkeypatch):
    broken = types.ModuleType("flash_attn")  # e.g. built without its CUDA extension: no flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    assert not attn_mod.has_flash_attn()


def test_choice_is_logged_once(caplog):
    q, k, v = (t.detach() for t in _qkv())
    with caplog.at_level(logging.INFO, logger="repa_fast.kernels"):
        for _ in range(3):
            attention(q, k, v)
    msgs = [r.getMessage() for r in caplog.records if "attention uses" in r.getMessage()]
    assert len(msgs) == 1 and "scaled_dot_product_attention" in msgs[0]
