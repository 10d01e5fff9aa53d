"""The losses of one step as kernels: sample_posterior, the interpolant, the denoising MSE, the alignment loss (fused
kernel, its PyTorch reference, or the reference's per-sample loop) and REG's class-token terms.

Each function mirrors the code it prices op for op (trainer.micro_step, objective.training_loss, kernels/align_loss.py,
sihyun-yu/REPA loss.py:81-88, Martinser/REG loss.py:71-90); tests/test_cost_crosscheck.py runs the real code.
"""

from repa_fast.cost.ops import F32, Op, cast, ew, staged, times


def posterior_and_interpolant(B: int, N: int) -> list[Op]:
    """x0 = (mean + std eps) scale (objective.sample_posterior), t, the noise, x_t and v_t (objective.training_loss)."""
    fwd = [ew("posterior.randn", 0, 4 * N), ew("posterior.std_eps", 8 * N, 4 * N), ew("posterior.mean", 8 * N, 4 * N)]
    fwd += [ew("posterior.scale", 4 * N, 4 * N), ew("t.rand", 0, 4 * B), ew("noise.randn", 0, 4 * N)]
    fwd += [ew(f"interpolant.{i}", 4 * B * (i % 2), 4 * B) for i in range(4)]
    fwd += [ew(f"xt_vt.mul{i}", 4 * B + 4 * N, 4 * N) for i in range(4)]
    return fwd + [ew("xt.add", 8 * N, 4 * N), ew("vt.add", 8 * N, 4 * N)]


def reg_class_token(B: int, z: int) -> list[Op]:
    """REG's diffused class token (objective._class_token): the noise, alpha c + sigma n and d_alpha c + d_sigma n."""
    e = 4 * B * z
    ops = [ew("cls.randn", 0, e)]
    for name in ("cls.input", "cls.target"):
        ops += [ew(f"{name}.mul0", e + 4 * B, e), ew(f"{name}.mul1", e + 4 * B, e), ew(f"{name}.add", 2 * e, e)]
    return ops


def mse(name: str, N: float, B: int, a: int) -> tuple[list, list]:
    """objective.denoising_loss on N elements of B samples: the prediction cast to fp32, (p - t)^2, the per-sample
    mean, the batch mean; the backward down to the prediction (cast back to its dtype)."""
    fwd = cast(f"{name}.to_fp32", N, a, F32) + [ew(f"{name}.sub", 8 * N, 4 * N), ew(f"{name}.pow", 4 * N, 4 * N)]
    fwd += [ew(f"{name}.mean1", 4 * N, 4 * B), ew(f"{name}.mean", 4 * B, 4)]
    bwd = [ew(f"{name}.mean_bwd", 4, 4 * B), ew(f"{name}.mean1_bwd", 4 * B, 4 * N)]
    bwd += [ew(f"{name}.pow_bwd0", 4 * N, 4 * N), ew(f"{name}.pow_bwd1", 4 * N, 4 * N)]
    bwd += [ew(f"{name}.pow_bwd2", 8 * N, 4 * N)] + cast(f"{name}.dt", N, F32, a)
    return fwd, staged(bwd, "bwd")


def fused_alignment(name: str, M: int, z: int, a: int) -> tuple[list, list]:
    """kernels/align_loss.py ``alignment_loss``: one cosine kernel over the M rows, the mean, -total / K."""
    fwd = [ew(f"{name}.cos", a * M * z + 4 * M * z, 4 * M, saved=a * M * z + 4 * M * z)]
    fwd += [ew(f"{name}.mean", 4 * M, 4), ew(f"{name}.add", 4, 4), ew(f"{name}.neg", 4, 4), ew(f"{name}.div", 4, 4)]
    bwd = [ew(f"{name}.mean_bwd", 4, 4 * M), ew(f"{name}.cos_bwd", 4 * M + a * M * z + 4 * M * z, a * M * z)]
    return fwd, staged(bwd, "bwd")


def _normalize(name: str, rows: float, z: int) -> list[Op]:
    """F.normalize(x, dim=-1) on fp32 rows: the norm, its clamp, the division by the broadcast denominator."""
    return [
        ew(f"{name}.norm", 4 * rows * z, 4 * rows),
        ew(f"{name}.clamp", 4 * rows, 4 * rows),
        ew(f"{name}.div", 4 * rows * z + 4 * rows, 4 * rows * z, saved=4 * rows * z),
    ]


def _normalize_bwd(name: str, rows: float, z: int) -> list[Op]:
    """Autograd's backward of F.normalize for the input that needs a gradient: the division's two branches
    (grad / d, and -grad x / d^2 reduced over the broadcast), clamp_min's mask, the norm's backward, and the sum of
    the two contributions."""
    e, r = 4 * rows * z, 4 * rows
    ops = [ew(f"{name}.div_bwd", e + r, e), ew(f"{name}.ddenom.div", e + r, e), ew(f"{name}.ddenom.neg", e, e)]
    ops += [ew(f"{name}.ddenom.mul", 2 * e, e), ew(f"{name}.ddenom.div2", e + r, e), ew(f"{name}.ddenom.sum", e, r)]
    ops += [ew(f"{name}.clamp.zero", 0, 4), ew(f"{name}.clamp.gt", r, rows), ew(f"{name}.clamp.where", r + rows + 4, r)]
    ops += [ew(f"{name}.norm_bwd.div", e + r, e), ew(f"{name}.norm_bwd.eq", r, rows)]
    ops += [
        ew(f"{name}.norm_bwd.fill", e + rows, e),
        ew(f"{name}.norm_bwd.mul", r + e, e),
        ew(f"{name}.dx.add", 2 * e, e),
    ]
    return ops


def ref_alignment(name: str, M: int, z: int, a: int) -> tuple[list, list]:
    """kernels/align_loss.py ``alignment_loss_ref``: normalize both (the prediction cast to fp32), multiply, sum,
    mean; the backward through normalize for the prediction only (targets need no gradient)."""
    fwd = cast(f"{name}.p", M * z, a, F32) + _normalize(f"{name}.p", M, z) + _normalize(f"{name}.z", M, z)
    fwd += [ew(f"{name}.mul", 8 * M * z, 4 * M * z), ew(f"{name}.sum", 4 * M * z, 4 * M), ew(f"{name}.mean", 4 * M, 4)]
    fwd += [ew(f"{name}.{op}", 4, 4) for op in ("add", "neg", "div")]
    bwd = [ew(f"{name}.mean_bwd", 4, 4 * M), ew(f"{name}.mul_bwd", 4 * M + 4 * M * z, 4 * M * z)]
    bwd += _normalize_bwd(f"{name}.p", M, z) + cast(f"{name}.dp", M * z, F32, a)
    return fwd, staged(bwd, "bwd")


def per_sample_alignment(name: str, B: int, T: int, z: int, a: int) -> tuple[list, list]:
    """The reference's loop (sihyun-yu/REPA loss.py:81-88): accelerate casts the projector output to fp32 once, then
    for each sample normalize both, multiply, sum over channels, negate and average (``mean_flat``), accumulate; the
    backward runs the same per sample and stacks the per-sample gradients (iterating a tensor is ``unbind``)."""
    M = B * T
    fwd = cast(f"{name}.p", M * z, a, F32)
    one = _normalize(f"{name}.p", T, z) + _normalize(f"{name}.z", T, z)
    one += [
        ew(f"{name}.mul", 8 * T * z, 4 * T * z),
        ew(f"{name}.sum", 4 * T * z, 4 * T),
        ew(f"{name}.neg", 4 * T, 4 * T),
    ]
    one += [ew(f"{name}.mean", 4 * T, 4), ew(f"{name}.acc", 8, 4)]
    fwd += times(one, B) + [ew(f"{name}.div", 4, 4)]
    one_b = [ew(f"{name}.mean_bwd", 4, 4 * T), ew(f"{name}.neg_bwd", 4 * T, 4 * T)]
    one_b += [ew(f"{name}.mul_bwd", 4 * T + 4 * T * z, 4 * T * z)] + _normalize_bwd(f"{name}.p", T, z)
    bwd = [ew(f"{name}.div_bwd", 4, 4)] + times(one_b, B) + [ew(f"{name}.unbind_bwd", 4 * M * z, 4 * M * z)]
    bwd += cast(f"{name}.dp", M * z, F32, a)
    return fwd, staged(bwd, "bwd")
