"""What a SiT step runs around its blocks, as kernels: the embeddings (with REG's class token), the alignment
projectors (REPA's MLP, iREPA's linear or conv layer), the final layer (with REG's class-token head) and the losses.

Functions of a ``repa_fast.cost.sit.SiTStep`` (its shapes, structure and policy), each mirroring models/sit.py,
models/projectors.py and objective.training_loss op for op (tests/test_cost_crosscheck.py runs the real code):
- ``embed``: PatchEmbed's convolution (and with cut 2a its ``.contiguous()`` copy), the timestep and label
  embedders, and with REG ``wg_norm(cls_projectors2(cls_token))`` concatenated before the patch tokens
  (Martinser/REG models/sit.py:291-297) - under CUDA autocast ``layer_norm`` runs in fp32 and ``cat`` promotes the
  bf16 patch tokens to it; CPU autocast keeps both in bf16 (``Policy.layer_norm_fp32``).
- ``projector``: at block ``encoder_depth`` on the fp32 residual, per token (MLP, linear) or over the token grid
  (conv: a (D, g, g) map with channels-last strides, whose weight gradient comes back channels-last and is copied
  into the parameter's layout by autograd's accumulation).
- ``final``: adaLN + Linear over the patch tokens; with REG the patch rows are sliced out of the 1 + T (a copy: the
  slice is not a flat view, so the matmul copies it and adds the bias apart) and ``linear_cls`` reads token 0.
- ``loss``: ``repa_fast.cost.losses`` with the alignment over 1 + T rows and REG's class-token MSE.
"""

from repa_fast.cost import losses
from repa_fast.cost.ops import F32, Op, cast, ew, staged


def embed(s) -> tuple[list, list]:
    """x_embedder (+ its contiguous copy), pos_embed, the timestep and label embedders, REG's class token."""
    sh, a, B, BD = s.sh, s.a, s.B, s.BD
    Mp = B * sh.tokens
    MpD = Mp * sh.dim
    conv = s.linear("x_embedder", Mp, sh.pixels, sh.dim, F32, need_dx=False, bias_grad_in_gemm=True, saves_weight=True)
    cls_f, cls_b = _reg_embed(s) if sh.reg else ([], [])
    fwd = cls_f + conv.forward()
    fwd += [ew("x_embedder.contiguous", a * MpD, a * MpD)] if s.st.contiguous_residual else []
    tok = a  # bytes of the tokens pos_embed is added to
    if sh.reg:
        tok = F32 if (s.pol.layer_norm_fp32 and a < F32) else a
        fwd += cast("cat.promote", MpD, a, tok) + [ew("cat", tok * (BD + MpD), tok * s.MD)]
    fwd += [ew("pos_embed.add", tok * s.MD + F32 * s.T * sh.dim, F32 * s.MD)]
    fwd += _timestep(s)
    fwd += [ew("y.rand", 0, 4 * B), ew("y.lt", 4 * B, B), ew("y.null", 0, 8), ew("y.where", 9 * B + 8, 8 * B)]
    fwd += [ew("y.embedding", 8 * B + 4 * BD, 4 * BD), ew("c.add", a * BD + 4 * BD, 4 * BD, saved=4 * BD)]
    fc1 = s.linear("t_embedder.fc1", B, sh.freq_dim, sh.dim, F32, need_dx=False)
    fc2 = s.linear("t_embedder.fc2", B, sh.dim, sh.dim, a)
    table = 4 * (sh.num_classes + 1) * sh.dim
    bwd = cast("c.add.dt", BD, F32, a) + [ew("y.embedding_bwd", 4 * BD + 8 * B, table)] + fc2.backward()
    bwd += [ew("t.silu_bwd", 2 * a * BD, a * BD)] + fc1.backward() + cast("pos_embed.add.dt", s.MD, F32, tok)
    bwd += cast("cat.promote.dt", MpD, tok, a) + cls_b + conv.backward()
    return fwd, staged(bwd, "bwd")


def _timestep(s) -> list[Op]:
    """TimestepEmbedder: the 256 sinusoidal features, then Linear - SiLU - Linear."""
    sh, a, B, BD = s.sh, s.a, s.B, s.BD
    half = sh.freq_dim // 2
    ops = [ew("t.arange", 0, 4 * half)] + [ew(f"t.freqs{i}", 4 * half, 4 * half) for i in range(3)]
    ops += [ew("t.args", 4 * B + 4 * half, 4 * B * half), ew("t.cos", 4 * B * half, 4 * B * half)]
    ops += [ew("t.sin", 4 * B * half, 4 * B * half), ew("t.cat", 8 * B * half, 4 * B * sh.freq_dim)]
    fc1 = s.linear("t_embedder.fc1", B, sh.freq_dim, sh.dim, F32, need_dx=False)
    fc2 = s.linear("t_embedder.fc2", B, sh.dim, sh.dim, a)
    return ops + fc1.forward() + [ew("t.silu", a * BD, a * BD, saved=a * BD)] + fc2.forward()


def _reg_embed(s) -> tuple[list, list]:
    """wg_norm(cls_projectors2(cls_token)): the noisy class token (B, z) -> (B, D), an affine LayerNorm."""
    sh, a, B, BD, D = s.sh, s.a, s.B, s.BD, s.sh.dim
    lin = s.linear("cls_projectors2", B, sh.cls_dim, D, F32, need_dx=False)
    n = F32 if (s.pol.layer_norm_fp32 and a < F32) else a  # the LayerNorm's dtype
    fwd = lin.forward() + cast("wg_norm.x", BD, a, n)
    fwd += [ew("wg_norm", n * BD + 8 * D, n * BD + 2 * n * B, saved=n * BD + 2 * n * B)]
    bwd = [ew("wg_norm.bwd", 2 * n * BD + 2 * n * B + 8 * D, n * BD + 8 * D)] + cast("wg_norm.dx", BD, n, a)
    return fwd, staged(bwd + lin.backward(), "bwd")


def projector(s) -> tuple[list, list]:
    """The alignment projectors at block ``encoder_depth`` on the fp32 residual (a copy first where it is D-strided:
    the reference's ``x.reshape(-1, D)``), and the accumulation of their gradients into the residual's."""
    sh = s.sh
    fwd = [s.copy("proj.reshape", s.MD)] if s.strided(sh.encoder_depth - 1) else []
    bwd = []
    for j, z in enumerate(sh.z_dims):
        f, b = _projector(s, j, z)
        fwd, bwd = fwd + f, bwd + b + [ew(f"proj{j}.dx.add", 8 * s.MD, 4 * s.MD)]
    return fwd, staged(bwd, "bwd")


def _projector(s, j: int, z: int) -> tuple[list, list]:
    sh, a, M, D = s.sh, s.a, s.M, s.D
    kind = sh.projection_layer_type
    if kind == "linear":
        lin = s.linear(f"proj{j}.linear", M, D, z, F32)
        return lin.forward(), lin.backward()
    if kind == "conv":
        return _conv_projector(s, j, z)
    l0 = s.linear(f"proj{j}.0", M, D, sh.projector_dim, F32)
    l2 = s.linear(f"proj{j}.2", M, sh.projector_dim, sh.projector_dim, a)
    l4 = s.linear(f"proj{j}.4", M, sh.projector_dim, z, a)
    act = a * M * sh.projector_dim
    silu = [ew(f"proj{j}.silu", act, act, saved=act)]
    silu_b = [ew(f"proj{j}.silu_bwd", 2 * act, act)]
    fwd = l0.forward() + silu + l2.forward() + silu + l4.forward()
    return fwd, l4.backward() + silu_b + l2.backward() + silu_b + l0.backward()


def _conv_projector(s, j: int, z: int) -> tuple[list, list]:
    """iREPA's Conv2d(D, z, k, padding k // 2) over the (g, g) grid: casts of bias, weight (kept) and input (kept),
    one convolution; one convolution_backward (input, weight and bias gradients), their casts to fp32, and the copy
    of the channels-last weight gradient into the parameter's layout."""
    a, M, D, name = s.a, s.M, s.D, f"proj{j}.conv"
    w = z * D * s.sh.proj_kernel_size**2
    flops = 2.0 * M * w
    fwd = cast(f"{name}.b", z, F32, a, "weight_cast") + cast(f"{name}.w", w, F32, a, "weight_cast", saved=a * w)
    fwd += cast(f"{name}.x", M * D, F32, a, saved=a * M * D)
    fwd.append(Op("gemm", name, a * (M * D + w + z), a * M * z, flops=flops, rate=_rate(a)))
    bwd = [Op("gemm", f"{name}.bwd", a * (M * z + M * D + w), a * (M * D + w + z), flops=2 * flops, rate=_rate(a))]
    bwd += cast(f"{name}.dx", M * D, a, F32) + cast(f"{name}.dw", w, a, F32, "weight_cast")
    bwd += cast(f"{name}.db", z, a, F32, "weight_cast") + [ew(f"{name}.dw_layout", F32 * w, F32 * w)]
    return fwd, staged(bwd, "bwd")


def _rate(a: int) -> str:
    return "fp32" if a == F32 else "bf16"


def final(s) -> tuple[list, list]:
    sh, a, M, D = s.sh, s.a, s.M, s.D
    mod_f, mod_b = s.modulation("final.adaLN", 2, accumulate=False)
    cross = s.st.mlp_gate == "next_block" and s.st.impl == "triton"
    ad_f, ad_b = s.adaln("final.adaln", s.strided(sh.depth), gated=cross)
    Mp = s.B * sh.tokens
    out = a * Mp * sh.pixels
    if not sh.reg:
        lin = s.linear("final.linear", M, D, sh.pixels, s.y)
        head_f, head_b = lin.forward(), lin.backward()
    else:
        head_f, head_b = _reg_final(s, Mp)
    fwd = mod_f + ad_f + head_f + [ew("unpatchify", out, out)]
    bwd = [ew("unpatchify.bwd", out, out)] + head_b + ad_b + mod_b
    return fwd, staged(bwd, "bwd")


def _reg_final(s, Mp: int) -> tuple[list, list]:
    """``linear(h[:, 1:])`` (a copy of the slice, an mm, the bias added apart) and ``linear_cls(h[:, 0])``; in the
    backward the two slices' gradients are scattered into zeros of (B, 1 + T, D) and summed."""
    sh, y, a, D, B = s.sh, s.y, s.a, s.D, s.B
    P, MD, MpD = sh.pixels, s.MD, Mp * D
    lin = s.linear("final.linear", Mp, D, P, y, bias=False)
    cls = s.linear("final.linear_cls", B, D, sh.cls_dim, y)
    fwd = [ew("final.h.patches", y * MpD, y * MpD)] + lin.forward() + cast("final.linear.b", P, F32, a, "weight_cast")
    fwd += [ew("final.linear.bias_add", a * Mp * P + a * P, a * Mp * P)] + cls.forward()
    bwd = [ew("final.linear.db", a * Mp * P, a * P)] + cast("final.linear.db", P, a, F32, "weight_cast")
    bwd += lin.backward() + cls.backward()
    bwd += [ew("final.h.cls_bwd", y * B * D, y * MD), ew("final.h.patches_bwd", y * MpD, y * MD)]
    return fwd, bwd + [ew("final.h.dadd", 2 * y * MD, y * MD)]


def loss(s) -> tuple[list, list]:
    """sample_posterior, the interpolant, the denoising MSE, the alignment loss and REG's class-token terms
    (trainer.micro_step, objective.training_loss); the backward of every loss down to the model outputs."""
    sh, a, B = s.sh, s.a, s.B
    N = B * sh.latent_numel
    fwd = losses.posterior_and_interpolant(B, N) + (losses.reg_class_token(B, sh.cls_dim) if sh.reg else [])
    den_f, den_b = losses.mse("den", N, B, a)
    fwd += den_f
    bwd = [ew(f"loss.scalar_bwd{i}", 4, 4) for i in range(4)] + den_b
    for j, z in enumerate(sh.z_dims):
        f, b = _alignment(s, j, z)
        fwd, bwd = fwd + f, bwd + b
    fwd += [ew("loss.coeff", 4, 4), ew("loss.add", 8, 4)]  # den + proj_coeff * align
    if sh.reg:  # + cls_coeff * MSE(cls_v, cls_target)
        cls_f, cls_b = losses.mse("cls", B * sh.cls_dim, B, a)
        fwd += cls_f + [ew("cls.coeff", 4, 4), ew("cls.add", 8, 4)]
        bwd += [ew("cls.coeff_bwd", 4, 4)] + cls_b
    else:  # the "cls" entry of the returned dict: a 0-dim zero
        fwd += [ew("loss.cls_zero", 0, 4)]
    return fwd, staged(bwd, "bwd")


def _alignment(s, j: int, z: int) -> tuple[list, list]:
    M, a, B, T = s.M, s.a, s.B, s.T
    pre = [ew(f"align{j}.targets_cat", 4 * B * z + 4 * B * s.sh.tokens * z, 4 * M * z)] if s.sh.reg else []
    if s.st.loss == "per_sample":
        f, b = losses.per_sample_alignment(f"align{j}", B, T, z, a)
    elif s.st.impl == "ref":
        f, b = losses.ref_alignment(f"align{j}", M, z, a)
    else:
        f, b = losses.fused_alignment(f"align{j}", M, z, a)
    return pre + f, b
