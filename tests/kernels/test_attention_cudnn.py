"""cuDNN attention beside FlashAttention 2/3 and SDPA (issue 18, cut 2e): the "auto" order per compute capability and
every cuDNN gate, proven on CPU by monkeypatching the capability functions; the call itself goes through SDPA
pinned to SDPBackend.CUDNN_ATTENTION (a stand-in SDPA checks that, and the layout it receives)."""

import importlib
import logging
import sys
import types

import pytest
import torch
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

from repa_fast.kernels import _dispatch
from repa_fast.kernels.attention import BACKENDS, attention, attention_ref, auto_order, select_backend
from tests.conftest import assert_close

attn_mod = importlib.import_module("repa_fast.kernels.attention")  # the package re-exports a function of that name
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _no_installs(monkeypatch):
    """Nothing installed and no cuDNN unless a test says so, whatever this machine has."""
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    for name in ("flash_attn", "flash_attn_interface", "xformers", "xformers.ops"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(attn_mod, "has_cudnn_attention", lambda: False)


def _cap(monkeypatch, cap):
    monkeypatch.setattr(attn_mod, "cuda_capability", lambda device: cap)


def _cudnn(monkeypatch, available=True):
    monkeypatch.setattr(attn_mod, "has_cudnn_attention", lambda: available)


def _install_flash(monkeypatch, module):
    mod = types.ModuleType(module)
    mod.flash_attn_func = lambda q, k, v, softmax_scale=None: attention_ref(q, k, v, softmax_scale)
    monkeypatch.setitem(sys.modules, module, mod)


def _q(Dh=72, dtype=BF16, B=2, N=9, H=3):
    return torch.randn(B, N, H, Dh, dtype=dtype)


def test_cudnn_is_a_backend_name():
    assert "cudnn_attention" in BACKENDS


def test_auto_order_per_capability():
    assert auto_order((9, 0)) == ("flash3", "cudnn_attention", "flash2", "xformers")  # H100 / H200
    for blackwell in ((10, 0), (10, 3)):  # B200 / B300
        assert auto_order(blackwell) == ("cudnn_attention", "flash2", "xformers")
    for cap in ((8, 0), (8, 6), (8, 9), (12, 0)):  # A100, A10/A40, L40S, consumer Blackwell: cuDNN measured slower
        assert auto_order(cap) == ("flash2", "xformers")


def test_auto_on_hopper_prefers_fa3_then_cudnn_then_fa2(monkeypatch):
    _cap(monkeypatch, (9, 0))
    _install_flash(monkeypatch, "flash_attn")
    q = _q()
    assert select_backend(q) == "flash2"  # no cuDNN: FA2
    _cudnn(monkeypatch)
    assert select_backend(q) == "cudnn_attention"  # cuDNN beats FA2 on Hopper
    _install_flash(monkeypatch, "flash_attn_interface")
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    assert select_backend(q) == "flash3"  # an installed FA3 comes first
    assert select_backend(q, "flash") == "flash3"


def test_auto_elsewhere(monkeypatch):
    _cudnn(monkeypatch)
    q = _q()
    _cap(monkeypatch, (10, 0))
    assert select_backend(q) == "cudnn_attention"
    _cap(monkeypatch, (8, 0))
    assert select_backend(q) == "sdpa"  # Ampere: cuDNN only on request; no FA2 installed -> SDPA (its own FA2)
    _install_flash(monkeypatch, "flash_attn")
    monkeypatch.setattr(attn_mod, "_PROBES", {})  # imports are probed once
    assert select_backend(q) == "flash2"
    _cap(monkeypatch, None)
    assert select_backend(q) == "sdpa"  # CPU


@pytest.mark.parametrize(
    "q, why",
    [
        (_q(dtype=torch.float32), "fp16/bf16"),
        (_q(Dh=136), "multiple of 8 and <= 128"),  # 136 <= 256: flash-attn could, cuDNN's backward cannot
        (_q(Dh=60), "multiple of 8"),
        (_q(N=1), "2\\+ tokens"),
        (torch.randn(65536, 2, 1, 8, dtype=BF16), "<= 65535"),
    ],
)
def test_cudnn_gates(monkeypatch, q, why):
    _cap(monkeypatch, (9, 0))
    _cudnn(monkeypatch)
    with pytest.raises(RuntimeError, match=why):
        select_backend(q, "cudnn_attention")
    assert select_backend(q) != "cudnn_attention"


def test_cudnn_refused_where_pytorch_refuses_it(monkeypatch):
    q = _q()
    with pytest.raises(RuntimeError, match="needs CUDA"):
        select_backend(q, "cudnn_attention")
    _cap(monkeypatch, (7, 5))
    with pytest.raises(RuntimeError, match="sm80..sm121"):
        select_backend(q, "cudnn_attention")
    _cap(monkeypatch, (9, 0))
    with pytest.raises(RuntimeError, match="no cuDNN"):
        select_backend(q, "cudnn_attention")
    _cudnn(monkeypatch)
    assert select_backend(q, "cudnn_attention") == "cudnn_attention"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with pytest.raises(RuntimeError, match="not deterministic"):
        select_backend(q, "cudnn_attention")


def test_has_cudnn_attention_reads_pytorch(monkeypatch):
    monkeypatch.undo()  # the real function
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92400)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    assert attn_mod.has_cudnn_attention()
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)  # enable_cudnn_sdp(False)
    assert not attn_mod.has_cudnn_attention()
    monkeypatch.setattr(attn_mod, "_PROBES", {})
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 8907)  # cuDNN 8: no PyTorch cuDNN attention
    assert not attn_mod.has_cudnn_attention()


def test_cudnn_call_is_sdpa_pinned_to_cudnn_without_copies(monkeypatch, caplog):
    """The call: SDPA inside sdpa_kernel([CUDNN_ATTENTION]) on (B, H, N, Dh) views of the (B, N, H, Dh) inputs (for
    q, k, v unbound from one qkv output, cuDNN's packed layout), output back to (B, N, H, Dh); logged once."""
    _cap(monkeypatch, (9, 0))
    _cudnn(monkeypatch)
    calls = []

    def fake_sdpa(q, k, v, scale=None):
        calls.append((list(_cur_sdpa_kernel_backends()), q.shape, q.stride(), q.data_ptr()))
        return attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fake_sdpa)
    B, N, H, Dh = 2, 9, 3, 72
    qkv = torch.randn(B, N, 3, H, Dh, dtype=BF16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="repa_fast.kernels"):
        for _ in range(3):
            q, k, v = qkv.unbind(2)
            out = attention(q, k, v, attn_backend="cudnn_attention")
    assert len(calls) == 3
    backends, shape, stride, ptr = calls[0]
    assert backends == [SDPBackend.CUDNN_ATTENTION]
    assert shape == (B, H, N, Dh) and stride == (N * 3 * H * Dh, Dh, 3 * H * Dh, 1) and ptr == q.data_ptr()
    assert list(_cur_sdpa_kernel_backends()) != [SDPBackend.CUDNN_ATTENTION]  # restored after the call
    assert out.shape == (B, N, H, Dh)
    q64, k64, v64 = qkv.detach().double().unbind(2)
    assert_close(out, attention_ref(q64, k64, v64))
    out.float().square().sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    msgs = [r.getMessage() for r in caplog.records if "attention uses" in r.getMessage()]
    assert len(msgs) == 1 and "cuDNN" in msgs[0]


def test_models_accept_the_cudnn_backend():
    from repa_fast.models.sit import SiT

    model = SiT(
        input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, z_dims=[], attn_backend="cudnn_attention"
    )
    assert model.blocks[0].attn.attn_backend == "cudnn_attention"
    with pytest.raises(RuntimeError, match="needs CUDA"):  # a CPU run asked for cuDNN: a clear error, not a fallback
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
