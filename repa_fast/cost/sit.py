"""The SiT forward, backward and losses of one step as kernels (``Op``), for a ``StepStructure``.

Each function mirrors the code it prices, op for op as an eager step dispatches them (the CPU cross-check,
tests/test_cost_crosscheck.py, runs the real modules and compares):
- ``impl="triton"``: models/sit.py with kernels/adaln.py (``adaln_modulate``, ``gated_residual_adaln``, custom ops
  whose launchers copy an input whose rows are not unit-stride: ``_rows``), kernels/attention.py, the MLP and the
  gated residual ``x + gate2 * mlp(h)`` in plain PyTorch, kernels/align_loss.py for the alignment loss.
- ``impl="ref"``: the same modules with the PyTorch references, which is also the reference's SiTBlock
  (sihyun-yu/REPA models/sit.py:129-136: LayerNorm, ``modulate``, gated residual adds).
Under autocast the residual stream is fp32 (the patch embedding's bf16 output plus the fp32 ``pos_embed``), the
linear layers run in the autocast dtype and the adaLN outputs are fp32 unless ``adaln_out="amp"``. The reference
path keeps the residual D-strided through every block (PatchEmbed's ``flatten(2).transpose(1, 2)``, then
TensorIterator preserves the layout) and LayerNorm copies a non-contiguous input (``expect_contiguous``); our
fused path writes a contiguous residual from block 0's gated kernel on, so only block 0 pays the copies.
"""

from dataclasses import dataclass, replace

from repa_fast.cost.attention import attention_flops, padding_factor
from repa_fast.cost.ops import F32, Linear, Op, cast, ew, staged, times
from repa_fast.cost.shapes import SiTShape
from repa_fast.cost.structure import StepStructure

MIN_CHUNK_TOKENS = 32  # kernels/adaln.py: tokens per backward chunk (each chunk writes fp32 partial sums)


def adaln_chunks(tokens: int, dim: int, batch: int, num_sms: int, interpreted: bool = False) -> int:
    """Chunks per sample of the adaLN backward's fp32 partial sums: kernels/adaln.py ``_launch_config`` (backward)
    and ``_num_chunks`` (tests/test_cost.py checks the two agree); 1 under the CPU interpreter."""
    if interpreted:
        return 1
    block_m = max(1, min(16, 2048 // (1 << max(0, dim - 1).bit_length())))
    chunks = max(1, min(_cdiv(tokens, MIN_CHUNK_TOKENS), _cdiv(4 * num_sms, max(batch, 1))))
    rows_per_chunk = _cdiv(_cdiv(tokens, chunks), block_m) * block_m
    return _cdiv(tokens, rows_per_chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Policy:
    """Device behaviour the cost depends on: CUDA autocast runs softmax in fp32; SMs size the adaLN partial sums."""

    softmax_fp32: bool = True
    num_sms: int = 132
    interpreted: bool = False


class SiTStep:
    """Kernels of one SiT forward + backward + losses at ``batch`` images: ``ops()``, in execution order."""

    def __init__(self, shape: SiTShape, structure: StepStructure, batch: int, policy: Policy = Policy()):
        self.sh, self.st, self.B, self.pol = shape, structure, batch, policy
        self.a = structure.amp_bytes
        self.M = batch * shape.tokens
        self.D = shape.dim
        self.MD = self.M * shape.dim
        self.BD = batch * shape.dim
        ref = structure.impl == "ref"
        self.y = F32 if (ref or structure.adaln_out == "fp32" or self.a == F32) else self.a  # adaLN output bytes
        self.chunks = adaln_chunks(shape.tokens, shape.dim, batch, policy.num_sms, policy.interpreted)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def linear(self, name, rows, k, n, x_bytes, **kw) -> Linear:
        st = self.st
        if kw.get("fp8", "none") != "none":
            kw["fp8_casts"] = st.fp8_casts
        return Linear(name, rows, k, n, self.a, x_bytes, weights=st.weights, wgrad=st.wgrad, **kw)

    def strided(self, block: int) -> bool:
        """Does block ``block`` (or the final layer, ``block = depth``) see a D-strided residual?"""
        if self.st.contiguous_residual:
            return False
        return self.st.impl == "ref" or block == 0

    def copy(self, name: str, numel: float, nbytes: int = F32) -> Op:
        return ew(f"{name}.contiguous", nbytes * numel, nbytes * numel)

    def casts_to_amp(self, name: str, count: int) -> list[Op]:
        return [o for _ in range(count) for o in cast(name, self.BD, F32, self.a)]

    # -- embedders -------------------------------------------------------------------------------------------------
    def embed(self) -> tuple[list, list]:
        sh, a, B, MD, BD = self.sh, self.a, self.B, self.MD, self.BD
        conv = self.linear("x_embedder", self.M, sh.pixels, sh.dim, F32, need_dx=False, bias_grad_in_gemm=True)
        half = sh.freq_dim // 2
        fwd = conv.forward() + [ew("pos_embed.add", a * MD + F32 * sh.tokens * sh.dim, F32 * MD)]
        fwd += [ew("t.arange", 0, 4 * half)] + [ew(f"t.freqs{i}", 4 * half, 4 * half) for i in range(3)]
        fwd += [ew("t.args", 4 * B + 4 * half, 4 * B * half), ew("t.cos", 4 * B * half, 4 * B * half)]
        fwd += [ew("t.sin", 4 * B * half, 4 * B * half), ew("t.cat", 8 * B * half, 4 * B * sh.freq_dim)]
        fc1 = self.linear("t_embedder.fc1", B, sh.freq_dim, sh.dim, F32, need_dx=False)
        fc2 = self.linear("t_embedder.fc2", B, sh.dim, sh.dim, a)
        fwd += fc1.forward() + [ew("t.silu", a * BD, a * BD, saved=a * BD)] + fc2.forward()
        fwd += [ew("y.rand", 0, 4 * B), ew("y.lt", 4 * B, B), ew("y.null", 0, 8), ew("y.where", 9 * B + 8, 8 * B)]
        fwd += [ew("y.embedding", 8 * B + 4 * BD, 4 * BD), ew("c.add", a * BD + 4 * BD, 4 * BD)]
        table = 4 * (sh.num_classes + 1) * sh.dim
        bwd = cast("c.add.dt", BD, F32, a) + [ew("y.embedding_bwd", 4 * BD + 8 * B, table)] + fc2.backward()
        bwd += [ew("t.silu_bwd", 2 * a * BD, a * BD)] + fc1.backward() + cast("pos_embed.add.dconv", MD, F32, a)
        bwd += conv.backward()
        return fwd, staged(bwd, "bwd")

    # -- one block -------------------------------------------------------------------------------------------------
    def modulation(self, name: str, chunks: int) -> tuple[list, list]:
        """silu(c) -> Linear(D, chunks*D) on the (B, D) conditioning; its backward, cat of the chunk grads, and the
        accumulation of c's gradient over its consumers."""
        BD, a = self.BD, self.a
        lin = self.linear(name, self.B, self.D, chunks * self.D, F32)
        fwd = [ew(f"{name}.silu", 4 * BD, 4 * BD, saved=4 * BD)] + lin.forward()
        bwd = [ew(f"{name}.cat", chunks * a * BD, chunks * a * BD)] + lin.backward()
        bwd += [ew(f"{name}.silu_bwd", 8 * BD, 4 * BD), ew(f"{name}.dc.add", 8 * BD, 4 * BD)]
        return fwd, staged(bwd, "bwd")

    def adaln(self, name: str, strided: bool, gated: bool) -> tuple[list, list]:
        """Norm + modulate (``gated``: x + gate * branch first): the fused kernels, or the reference's ops."""
        if self.st.impl == "ref":
            return self._adaln_ref(name, strided, gated)
        MD, a, y, BD = self.MD, self.a, self.y, self.BD
        parts = 3 if gated else 2
        mods = (3 if gated else 2) * a * BD
        read, write = 4 * MD + mods + (a * MD if gated else 0), y * MD + (4 * MD if gated else 0)
        saved = 4 * MD + (a * MD if gated else 0)  # x (or x_new) and the branch
        fwd = ([self.copy(name, self.MD)] if strided else []) + [Op("elementwise", name, read, write, saved=saved)]
        part = 4 * parts * self.B * self.chunks * self.D
        read = y * MD + 4 * MD + (4 * MD + a * MD if gated else 0) + (2 if gated else 1) * a * BD
        bwd = [self.copy(f"{name}.bwd", self.MD)] if strided and not gated else []
        bwd += [ew(f"{name}.bwd", read, 4 * MD + (a * MD if gated else 0) + part)]
        bwd += [ew(f"{name}.partials", part, 4 * parts * BD)] + self.casts_to_amp(f"{name}.dmod", parts)
        return fwd, staged(bwd, "bwd")

    def _gate(self, name: str) -> tuple[list, list]:
        """x + gate * branch in PyTorch: the bf16 product, the fp32 sum; the backward casts the fp32 gradient to the
        branch dtype, multiplies for both factors and reduces the gate's over the tokens."""
        MD, a, BD = self.MD, self.a, self.BD
        fwd = [ew(f"{name}.mul", a * BD + a * MD, a * MD, saved=a * MD), ew(f"{name}.add", 4 * MD + a * MD, 4 * MD)]
        bwd = cast(f"{name}.dt", MD, F32, a) + [ew(f"{name}.dbranch", a * MD + a * BD, a * MD)]
        bwd += [ew(f"{name}.dgate", 2 * a * MD, a * MD), ew(f"{name}.dgate_sum", a * MD, a * BD)]
        return fwd, staged(bwd, "bwd")

    def _adaln_ref(self, name: str, strided: bool, gated: bool) -> tuple[list, list]:
        MD, a, BD, M = self.MD, self.a, self.BD, self.M
        fwd, bwd = self._gate(f"{name}.gate") if gated else ([], [])
        fwd = fwd + ([self.copy(f"{name}.ln", MD)] if strided else [])
        fwd += [ew(f"{name}.ln", 4 * MD, 4 * MD + 8 * M, saved=(4 * MD if gated else 4 * MD) + 8 * M)]
        fwd += [ew(f"{name}.one_plus_scale", a * BD, a * BD), ew(f"{name}.mul", 4 * MD + a * BD, 4 * MD, saved=4 * MD)]
        fwd += [ew(f"{name}.shift", 4 * MD + a * BD, 4 * MD)]
        mod = [ew(f"{name}.dshift", 4 * MD, 4 * BD)] + cast(f"{name}.dshift", BD, F32, a)
        mod += [ew(f"{name}.dscale_mul", 8 * MD, 4 * MD), ew(f"{name}.dmul", 4 * MD + a * BD, 4 * MD)]
        mod += [ew(f"{name}.dscale", 4 * MD, 4 * BD)] + cast(f"{name}.dscale", BD, F32, a)
        mod += [self.copy(f"{name}.ln.bwd", MD)] if strided else []
        mod += [ew(f"{name}.ln_bwd", 8 * MD + 8 * M, 4 * MD)]
        acc = [ew(f"{name}.dx.add", 8 * MD, 4 * MD)] if gated else []
        return fwd, staged(mod + acc + bwd, "bwd")

    def attention(self, name: str) -> tuple[list, list]:
        sh, a, MD = self.sh, self.a, self.MD
        backend = self.st.attn_backend
        useful = attention_flops(sh.tokens, sh.dim, self.B, forward_only=True)
        pad = padding_factor(backend, sh.head_dim, sh.tokens)
        pad_bwd = padding_factor(backend, sh.head_dim, sh.tokens, backward=True)
        lse = 4 * self.B * sh.heads * sh.tokens
        if backend == "math":
            return self._math_attention(name, useful)
        rate = f"attn:{backend}"
        fwd = [Op("attention", name, 3 * a * MD, a * MD + lse, flops=useful * pad, rate=rate, saved=4 * a * MD + lse)]
        bwd = [Op("attention", f"{name}.bwd", 5 * a * MD + lse, 3 * a * MD, flops=2.5 * useful * pad_bwd, rate=rate)]
        bwd.append(ew(f"{name}.dqkv_stack", 3 * a * MD, 3 * a * MD))
        if self.st.attn_glue == "timm":  # qkv.reshape(...).permute(2, 0, 3, 1, 4): the stacked grads are re-laid out
            bwd.append(ew(f"{name}.dqkv_copy", 3 * a * MD, 3 * a * MD))
        return fwd, staged(bwd, "bwd")

    def _math_attention(self, name: str, useful: float) -> tuple[list, list]:
        fwd = math_attention_forward(name, self.B, self.sh.heads, self.sh.tokens, self.D, self.a, self.pol)
        a, MD, S = self.a, self.MD, self.B * self.sh.heads * self.sh.tokens**2
        s = F32 if (self.pol.softmax_fp32 and a < F32) else a
        bwd = [
            Op("gemm", f"{name}.dp", 2 * a * MD, a * S, flops=useful / 2),
            Op("gemm", f"{name}.dv", a * S + a * MD, a * MD, flops=useful / 2),
        ]
        bwd += cast(f"{name}.dp", S, a, s) + [ew(f"{name}.softmax_bwd", 2 * s * S, s * S)] + cast(f"{name}.ds", S, s, a)
        bwd += [Op("gemm", f"{name}.dq", a * S + a * MD, a * MD, flops=useful / 2)]
        bwd += [
            Op("gemm", f"{name}.dk", a * S + a * MD, a * MD, flops=useful / 2),
            ew(f"{name}.dscale", a * MD, a * MD),
        ]
        bwd += [ew(f"{name}.dqkv_stack", 3 * a * MD, 3 * a * MD)]
        return fwd, staged([replace(o, part="attention") for o in bwd], "bwd")

    def block(self, i: int) -> tuple[list, list]:
        sh, st, a, y, M, D = self.sh, self.st, self.a, self.y, self.M, self.D
        strided = self.strided(i)
        cross = st.mlp_gate == "next_block" and i > 0 and st.impl == "triton"
        mod_f, mod_b = self.modulation(f"b{i}.adaLN", 6)
        ad1_f, ad1_b = self.adaln(f"b{i}.adaln1", strided, gated=cross)
        qkv = self.linear(f"b{i}.qkv", M, D, 3 * D, y, fp8=st.fp8)
        at_f, at_b = self.attention(f"b{i}.attn")
        proj = self.linear(f"b{i}.proj", M, D, D, a, save_x=False, fp8=st.fp8)
        ad2_f, ad2_b = self.adaln(f"b{i}.adaln2", strided, gated=True)
        epi = st.bias_gelu == "epilogue"
        aux = a * M * sh.hidden if epi else 0.0
        fc1 = self.linear(f"b{i}.fc1", M, D, sh.hidden, y, epilogue_write=aux, epilogue_saved=aux, fp8=st.fp8)
        fc2 = self.linear(f"b{i}.fc2", M, sh.hidden, D, a, dx_epilogue_read=aux, fp8=st.fp8)
        gelu_f = [] if epi else [ew(f"b{i}.gelu", a * M * sh.hidden, a * M * sh.hidden, saved=a * M * sh.hidden)]
        gelu_b = (
            []
            if epi
            else [
                ew(
                    f"b{i}.gelu_bwd",
                    2 * a * M * sh.hidden,
                    a * M * sh.hidden,
                )
            ]
        )
        end_f, end_b = self.block_end(i)
        acc = [] if cross else [ew(f"b{i}.dx.add", 8 * self.MD, 4 * self.MD)]
        fwd = mod_f + ad1_f + qkv.forward() + at_f + proj.forward() + ad2_f + fc1.forward() + gelu_f + fc2.forward()
        bwd = end_b + fc2.backward() + gelu_b + fc1.backward() + ad2_b + proj.backward() + at_b + qkv.backward()
        return fwd + end_f, staged(bwd + ad1_b + acc + mod_b, "bwd")

    def block_end(self, i: int) -> tuple[list, list]:
        """x + gate2 * mlp(h): unfused (mul, add), one fused kernel, or folded into the next adaLN kernel."""
        mode = self.st.mlp_gate if self.st.impl == "triton" else "unfused"
        if mode == "unfused":
            return self._gate(f"b{i}.mlp_gate")
        if mode == "next_block" and i < self.sh.depth - 1:
            return [], []
        MD, a, BD = self.MD, self.a, self.BD
        part = 4 * self.B * self.chunks * self.D
        fwd = [ew(f"b{i}.mlp_gate", 4 * MD + a * MD + a * BD, 4 * MD, saved=a * MD)]
        bwd = [ew(f"b{i}.mlp_gate.bwd", 4 * MD + a * MD + a * BD, a * MD + part), ew(f"b{i}.dgate", part, a * BD)]
        return fwd, staged(bwd, "bwd")

    # -- projector, final layer, losses ----------------------------------------------------------------------------
    def projector(self) -> tuple[list, list]:
        """The REPA MLP at block ``encoder_depth`` on the fp32 residual (a copy first where it is D-strided: the
        reference's ``x.reshape(-1, D)``), and the accumulation of its gradient into the residual's."""
        sh, a, M = self.sh, self.a, self.M
        fwd = [self.copy("proj.reshape", self.MD)] if self.strided(sh.encoder_depth - 1) else []
        bwd = []
        for j, z in enumerate(sh.z_dims):
            l0 = self.linear(f"proj{j}.0", M, self.D, sh.projector_dim, F32)
            l2 = self.linear(f"proj{j}.2", M, sh.projector_dim, sh.projector_dim, a)
            l4 = self.linear(f"proj{j}.4", M, sh.projector_dim, z, a)
            act = a * M * sh.projector_dim
            silu = [ew(f"proj{j}.silu", act, act, saved=act)]
            fwd += l0.forward() + silu + l2.forward() + silu + l4.forward()
            silu_b = [ew(f"proj{j}.silu_bwd", 2 * act, act)]
            bwd += l4.backward() + silu_b + l2.backward() + silu_b + l0.backward()
            bwd += [ew(f"proj{j}.dx.add", 8 * self.MD, 4 * self.MD)]
        return fwd, staged(bwd, "bwd")

    def final(self) -> tuple[list, list]:
        sh, a = self.sh, self.a
        mod_f, mod_b = self.modulation("final.adaLN", 2)
        cross = self.st.mlp_gate == "next_block" and self.st.impl == "triton"
        ad_f, ad_b = self.adaln("final.adaln", self.strided(sh.depth), gated=cross)
        lin = self.linear("final.linear", self.M, self.D, sh.pixels, self.y)
        out = a * self.M * sh.pixels
        fwd = mod_f + ad_f + lin.forward() + [ew("unpatchify", out, out)]
        bwd = [ew("unpatchify.bwd", out, out)] + lin.backward() + ad_b + mod_b
        return fwd, staged(bwd, "bwd")

    def loss(self) -> tuple[list, list]:
        """sample_posterior, the interpolant, the denoising MSE and the alignment loss (trainer.micro_step,
        objective.training_loss); the backward of both losses down to the model outputs."""
        sh, a, B = self.sh, self.a, self.B
        N = B * sh.latent_numel
        fwd = [
            ew("posterior.randn", 0, 4 * N),
            ew("posterior.std_eps", 8 * N, 4 * N),
            ew("posterior.mean", 8 * N, 4 * N),
        ]
        fwd += [ew("posterior.scale", 4 * N, 4 * N), ew("t.rand", 0, 4 * B), ew("noise.randn", 0, 4 * N)]
        fwd += [ew(f"interpolant.{i}", 4 * B * (i % 2), 4 * B) for i in range(4)]
        fwd += [ew(f"xt_vt.mul{i}", 4 * B + 4 * N, 4 * N) for i in range(4)]
        fwd += [ew("xt.add", 8 * N, 4 * N), ew("vt.add", 8 * N, 4 * N)] + cast("den.to_fp32", N, a, F32)
        fwd += [ew("den.sub", 8 * N, 4 * N), ew("den.pow", 4 * N, 4 * N), ew("den.mean1", 4 * N, 4 * B)]
        fwd += [ew("den.mean", 4 * B, 4)]
        bwd = [ew(f"loss.scalar_bwd{i}", 4, 4) for i in range(4)]
        bwd += [ew("den.mean_bwd", 4, 4 * B), ew("den.mean1_bwd", 4 * B, 4 * N), ew("den.pow_bwd0", 4 * N, 4 * N)]
        bwd += [ew("den.pow_bwd1", 4 * N, 4 * N), ew("den.pow_bwd2", 8 * N, 4 * N)] + cast("den.dt", N, F32, a)
        for j, z in enumerate(sh.z_dims):
            f, b = self.alignment(j, z)
            fwd, bwd = fwd + f, bwd + b
        fwd += [ew("loss.combine", 8, 4), ew("loss.add", 8, 4)]
        return fwd, staged(bwd, "bwd")

    def alignment(self, j: int, z: int) -> tuple[list, list]:
        M, a = self.M, self.a
        if self.st.loss == "per_sample":
            return per_sample_alignment(f"align{j}", self.B, self.sh.tokens, z, a)
        if self.st.impl == "ref":
            return ref_alignment(f"align{j}", M, z, a)
        fwd = [ew(f"align{j}.cos", a * M * z + 4 * M * z, 4 * M, saved=a * M * z + 4 * M * z)]
        fwd += [ew(f"align{j}.mean", 4 * M, 4), ew(f"align{j}.add", 4, 4), ew(f"align{j}.neg", 4, 4)]
        fwd += [ew(f"align{j}.div", 4, 4)]
        bwd = [ew(f"align{j}.mean_bwd", 4, 4 * M), ew(f"align{j}.cos_bwd", 4 * M + a * M * z + 4 * M * z, a * M * z)]
        return fwd, staged(bwd, "bwd")

    # -- the whole model -------------------------------------------------------------------------------------------
    def largest_backward_write(self) -> float:
        """Bytes of the largest single output of the backward (a transient on top of the saved activations)."""
        ops = self.block(min(1, self.sh.depth - 1))[1] + self.final()[1] + self.projector()[1] + self.loss()[1]
        return max(o.write for o in ops)

    def ops(self) -> list[Op]:
        """Forward (embedders, blocks, projectors, final layer), losses, then the backward in reverse order."""
        emb_f, emb_b = self.embed()
        fwd, bwd = list(emb_f), []
        blocks = [self.block(0)] + ([self.block(1)] if self.sh.depth > 1 else [])
        proj_f, proj_b = self.projector()
        fin_f, fin_b = self.final()
        loss_f, loss_b = self.loss()
        rest = self.sh.depth - 1
        fwd += blocks[0][0] + (times(blocks[1][0], rest) if rest else []) + proj_f + fin_f + loss_f
        bwd += loss_b + fin_b + proj_b + (times(blocks[1][1], rest) if rest else []) + blocks[0][1] + emb_b
        if self.st.act_ckpt == "full":  # every block's forward runs again in the backward, nothing saved inside
            again = blocks[0][0] + (times(blocks[1][0], rest) if rest else [])
            bwd = staged([o.__class__(**{**o.__dict__, "saved": 0.0}) for o in again], "bwd") + bwd
        return fwd + bwd


def math_attention_forward(name: str, batch: int, heads: int, tokens: int, dim: int, a: int, policy: Policy) -> list:
    """Explicit attention as timm/DINOv2 write it without a fused kernel (dinov2/layers/attention.py
    ``Attention.forward``): q * scale, matmul's copies of the permuted q, k^T and v into (B H, T, Dh) batches, the
    scores, softmax (fp32 under CUDA autocast: a cast there and back), the values, the output transposed back."""
    MD, S = batch * tokens * dim, batch * heads * tokens * tokens
    flops = 2.0 * tokens * tokens * dim * batch
    s = F32 if (policy.softmax_fp32 and a < F32) else a
    ops = [ew(f"{name}.scale", a * MD, a * MD)] + [ew(f"{name}.{t}.copy", a * MD, a * MD) for t in ("q", "k")]
    ops += [Op("gemm", f"{name}.qk", 2 * a * MD, a * S, flops=flops)] + cast(f"{name}.scores", S, a, s)
    ops += [ew(f"{name}.softmax", s * S, s * S, saved=s * S)] + cast(f"{name}.probs", S, s, a)
    ops += [ew(f"{name}.v.copy", a * MD, a * MD), Op("gemm", f"{name}.pv", a * S + a * MD, a * MD, flops=flops)]
    return [replace(o, part="attention") for o in ops + [ew(f"{name}.out.copy", a * MD, a * MD)]]


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
