"""adaLN modulation kernels vs the float64 reference: forward, every input gradient, fp32 / bf16 / mixed dtypes."""

import pytest
import torch

from repa_fast.kernels import adaln
from repa_fast.kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual_adaln, gated_residual_adaln_ref
from tests.conftest import assert_close
from tests.kernels._helpers import check_against_fp64

SHAPES = [(3, 9, 1152), (1, 7, 768), (2, 5, 130)]  # odd token counts, non-power-of-2 widths, batch 1


def _inputs(B, N, D, dtype=torch.float32, mod_dtype=None, gated=False, weight=False):
    mod_dtype = mod_dtype or dtype
    x = torch.randn(B, N, D, dtype=dtype) * 2 + 0.5  # a non-zero mean, so the centring matters
    mods = [(torch.randn(B, D) * 0.5).to(mod_dtype) for _ in range(3 if gated else 2)]  # [gate,] shift, scale
    branch = [torch.randn(B, N, D, dtype=mod_dtype)] if gated else []
    ins = [x] + branch + mods + ([(1 + 0.3 * torch.randn(D)).to(dtype)] if weight else [])
    return [t.requires_grad_() for t in ins]


def _plain(impl, norm="layer", weighted=False):
    if weighted:
        return lambda x, sh, sc, w: adaln_modulate(x, sh, sc, impl=impl, norm=norm, weight=w)
    return lambda x, sh, sc: adaln_modulate(x, sh, sc, impl=impl, norm=norm)


def _gated(impl, norm="layer", weighted=False):
    if weighted:
        return lambda x, br, g, sh, sc, w: gated_residual_adaln(x, br, g, sh, sc, impl=impl, norm=norm, weight=w)
    return lambda x, br, g, sh, sc: gated_residual_adaln(x, br, g, sh, sc, impl=impl, norm=norm)


@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate_fp32(shape):
    check_against_fp64(
        _plain("triton"), _plain("ref"), _inputs(*shape), ["elementwise"], ["elementwise", "reduction", "reduction"]
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_adaln_fp32(shape):
    check_against_fp64(
        _gated("triton"),
        _gated("ref"),
        _inputs(*shape, gated=True),
        ["elementwise", "elementwise"],
        ["elementwise", "elementwise", "reduction", "reduction", "reduction"],
    )


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("shape", [(2, 5, 1152), (1, 3, 130)])
def test_weighted_norm_variants(norm, shape):
    """RMSNorm with a learnable weight (LightningDiT) and LayerNorm with a weight: dweight reduced over all rows."""
    check_against_fp64(
        _plain("triton", norm, True),
        _plain("ref", norm, True),
        _inputs(*shape, weight=True),
        ["elementwise"],
        ["elementwise", "reduction", "reduction", "reduction"],
    )
    check_against_fp64(
        _gated("triton", norm, True),
        _gated("ref", norm, True),
        _inputs(*shape, gated=True, weight=True),
        ["elementwise"] * 2,
        ["elementwise", "elementwise"] + ["reduction"] * 4,
    )


@pytest.mark.parametrize("shape", [(2, 5, 768), (1, 3, 130)])
def test_bf16(shape):
    """bf16 storage: fp32 math inside, one rounding per stored value -> within one bf16 ulp of float64."""
    ins = _inputs(*shape, dtype=torch.bfloat16)
    check_against_fp64(_plain("triton"), _plain("ref"), ins, ["elementwise"], ["elementwise", "reduction", "reduction"])
    x, br, g, sh, sc = _inputs(*shape, dtype=torch.bfloat16, gated=True)
    # x_new is rounded to bf16 when stored and the norm reads the stored value (as eager does): check x_new
    # against float64, then y against the float64 reference evaluated at that stored x_new.
    x_new, y = gated_residual_adaln(x, br, g, sh, sc, impl="triton")
    assert_close(x_new, x.double() + g.double()[:, None] * br.double())
    assert_close(y, adaln_modulate_ref(x_new.double(), sh.double(), sc.double()))
    check_against_fp64(
        lambda br, g, sh, sc: gated_residual_adaln(x_new.detach(), br, g, sh, sc, impl="triton")[1],
        lambda br, g, sh, sc: gated_residual_adaln_ref(x_new.detach().double(), br, g, sh, sc)[1],
        [br, g, sh, sc],
        ["elementwise"],
        ["elementwise"] + ["reduction"] * 3,
    )


def test_mixed_dtypes_as_in_sit_autocast():
    """SiT under bf16 autocast: fp32 residual stream x, bf16 branch (a GEMM output) and bf16 adaLN vectors.
    Outputs promote to fp32 (as eager), each gradient comes back in its input's dtype."""
    ins = _inputs(2, 5, 768, dtype=torch.float32, mod_dtype=torch.bfloat16, gated=True)
    outs, _ = check_against_fp64(
        _gated("triton"),
        _gated("ref"),
        ins,
        ["elementwise"] * 2,
        ["elementwise", "elementwise", "reduction", "reduction", "reduction"],
    )
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]


def test_small_tiles_many_programs_and_chunks(monkeypatch):
    """Force 2-row tiles and 4-token chunks: masked tail tiles, several partial-sum chunks, an overhanging chunk."""
    monkeypatch.setattr(adaln, "_launch_config", lambda n_rows, n_tok, D, dev, backward=False: (2, 256, 4, 4))
    check_against_fp64(
        _gated("triton"),
        _gated("ref"),
        _inputs(2, 9, 130, gated=True),
        ["elementwise"] * 2,
        ["elementwise", "elementwise", "reduction", "reduction", "reduction"],
    )


def test_strided_views_from_sit_layout():
    """shift/scale/gate are chunks of the (B, 6D) adaLN output and x a slice: used in place, without copies."""
    B, N, D = 2, 5, 130
    mod = torch.randn(B, 6 * D, requires_grad=True)
    base = torch.randn(B, N, 2 * D, requires_grad=True)

    def fn(impl):
        sh, sc, g = mod.chunk(6, dim=-1)[:3]
        x_new, y = gated_residual_adaln(base[..., :D], base[..., D:], g, sh, sc, impl=impl)
        return (x_new * 1.5 + y).sum(), x_new, y

    loss_k, *outs_k = fn("triton")
    grads_k = torch.autograd.grad(loss_k, [mod, base])
    loss_r, *outs_r = fn("ref")
    grads_r = torch.autograd.grad(loss_r, [mod, base])
    for a, e in zip(outs_k, outs_r):
        assert_close(a, e)
    assert_close(grads_k[0], grads_r[0], "reduction")
    assert_close(grads_k[1], grads_r[1])


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="shift must have shape"):
        adaln_modulate(x, torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        adaln_modulate(x[0], torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="norm must be one of"):
        adaln_modulate(x, torch.randn(2, 8), torch.randn(2, 8), norm="batch")
    with pytest.raises(ValueError, match="branch must have shape"):
        gated_residual_adaln(x, torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8))
