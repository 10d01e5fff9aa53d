"""The SiT forward, backward and losses of one step as kernels (``Op``), for a ``StepStructure``.

Each function mirrors the code it prices, op for op as an eager step dispatches them (the CPU cross-check,
tests/test_cost_crosscheck.py, runs the real modules and compares):
- ``impl="triton"``: models/sit.py with kernels/adaln.py (``adaln_modulate``, ``gated_residual_adaln``,
  ``gated_residual``: custom ops whose launchers copy an input whose rows are not unit-stride, ``_rows``),
  kernels/bias_gelu.py (``linear_gelu``: fc1 as an mm, one bias + GELU op), kernels/attention.py, and
  kernels/align_loss.py for the alignment loss. Which of these an older structure still ran unfused is a switch of
  the structure (``adaln_out``, ``bias_gelu``, ``mlp_gate``).
- ``impl="ref"``: the same modules with the PyTorch references, which is also the reference's SiTBlock
  (sihyun-yu/REPA models/sit.py:129-136: LayerNorm, ``modulate``, gated residual adds, ``gelu(fc1(x))``).
Under autocast the residual stream is fp32 (the patch embedding's bf16 output plus the fp32 ``pos_embed``), the
linear layers run in the autocast dtype and the adaLN outputs are fp32 unless ``adaln_out="amp"``. Without cut 2a
the reference path keeps the residual D-strided through every block (PatchEmbed's ``flatten(2).transpose(1, 2)``,
then TensorIterator preserves the layout) and LayerNorm copies a non-contiguous input (``expect_contiguous``); the
fused path writes a contiguous residual from block 0's gated kernel on, so only block 0 pays the copies. With cut
2a, PatchEmbed copies its output once (``.contiguous()``) and no block copies.

REG (``SiTShape.reg``): the class token joins the tokens, so every block, the projectors and the alignment loss run
on 1 + T tokens; REG's embedding, final layer and class-token loss are ``repa_fast.cost.heads``. Activation
checkpointing (``StepStructure.act_ckpt``, engine/activation_checkpoint.py): a checkpointed block keeps only its
input x, a checkpointed MLP only its input h, and their forward runs again in the backward. fp8
(``StepStructure.fp8``, engine/fp8.py): the blocks' qkv, proj, fc1 and fc2 are torchao Float8Linear, and the MLP
then runs ``gelu(fc1(x))`` (models/sit.py Mlp keeps a converted fc1's own forward).
"""

from dataclasses import dataclass, replace

from repa_fast.cost import heads
from repa_fast.cost.attention import attention_flops, padding_factor
from repa_fast.cost.ops import F32, Linear, Op, cast, ew, staged, times
from repa_fast.cost.shapes import SiTShape
from repa_fast.cost.structure import StepStructure

MIN_CHUNK_TOKENS = 32  # kernels/adaln.py: tokens per backward chunk (each chunk writes fp32 partial sums)
BIAS_GELU_ROWS_PER_CHUNK = 128  # kernels/bias_gelu.py ROWS_PER_CHUNK: rows per fp32 partial row of the bias gradient


def adaln_chunks(tokens: int, dim: int, batch: int, num_sms: int, interpreted: bool = False) -> int:
    """Chunks per sample of the adaLN backward's fp32 partial sums: kernels/adaln.py ``_launch_config`` (backward)
    and ``_num_chunks`` (tests/test_cost.py checks the two agree); 1 under the CPU interpreter."""
    if interpreted:
        return 1
    block_m = max(1, min(16, 2048 // (1 << max(0, dim - 1).bit_length())))
    chunks = max(1, min(_cdiv(tokens, MIN_CHUNK_TOKENS), _cdiv(4 * num_sms, max(batch, 1))))
    rows_per_chunk = _cdiv(_cdiv(tokens, chunks), block_m) * block_m
    return _cdiv(tokens, rows_per_chunk)


def bias_gelu_chunks(rows: int, width: int, interpreted: bool = False) -> int:
    """fp32 partial rows of the bias + GELU backward: kernels/bias_gelu.py ``_num_chunks`` (tests/test_cost.py)."""
    if interpreted:
        return 1
    block_f = min(1 << max(0, width - 1).bit_length(), 256)
    block_m = max(1, 2048 // block_f)
    return _cdiv(rows, _cdiv(BIAS_GELU_ROWS_PER_CHUNK, block_m) * block_m)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Policy:
    """Device behaviour the cost depends on: CUDA autocast runs softmax and layer_norm in fp32 (CPU autocast keeps
    them in bf16); SMs size the adaLN partial sums; the interpreter launches one chunk."""

    softmax_fp32: bool = True
    layer_norm_fp32: bool = True
    num_sms: int = 132
    interpreted: bool = False


class SiTStep:
    """Kernels of one SiT forward + backward + losses at ``batch`` images: ``ops()``, in execution order."""

    def __init__(self, shape: SiTShape, structure: StepStructure, batch: int, policy: Policy = Policy()):
        self.sh, self.st, self.B, self.pol = shape, structure, batch, policy
        self.a = structure.amp_bytes
        self.T = shape.seq  # tokens through the blocks (1 + T with REG)
        self.M = batch * self.T
        self.D = shape.dim
        self.MD = self.M * shape.dim
        self.BD = batch * shape.dim
        ref = structure.impl == "ref"
        self.y = F32 if (ref or structure.adaln_out == "fp32" or self.a == F32) else self.a  # adaLN output bytes
        self.chunks = adaln_chunks(self.T, shape.dim, batch, policy.num_sms, policy.interpreted)
        self.full_blocks, self.mlp_ckpt = structure.checkpointed(shape.depth)

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

    # -- one block -------------------------------------------------------------------------------------------------
    def modulation(self, name: str, chunks: int, accumulate: bool = True) -> tuple[list, list]:
        """silu(c) -> Linear(D, chunks*D) on the (B, D) conditioning, whose output the modulation kernels keep; its
        backward, the cat of the chunk grads, and the accumulation of c's gradient over its consumers (the first one
        in the backward, the final layer's, is not an add; c itself is kept once, by the embedding: every block's
        SiLU saves the same tensor)."""
        BD, a = self.BD, self.a
        lin = self.linear(name, self.B, self.D, chunks * self.D, F32)
        fwd = [ew(f"{name}.silu", 4 * BD, 4 * BD)] + lin.forward()
        fwd[-1] = replace(fwd[-1], saved=fwd[-1].saved + chunks * a * BD)
        bwd = [ew(f"{name}.cat", chunks * a * BD, chunks * a * BD)] + lin.backward()
        bwd += [ew(f"{name}.silu_bwd", 8 * BD, 4 * BD)] + ([ew(f"{name}.dc.add", 8 * BD, 4 * BD)] if accumulate else [])
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
        fwd += [ew(f"{name}.ln", 4 * MD, 4 * MD + 8 * M, saved=4 * MD + 8 * M)]
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
        sh, a, MD, T = self.sh, self.a, self.MD, self.T
        backend = self.st.attn_backend
        useful = attention_flops(T, sh.dim, self.B, forward_only=True)
        pad = padding_factor(backend, sh.head_dim, T)
        pad_bwd = padding_factor(backend, sh.head_dim, T, backward=True)
        lse = 4 * self.B * sh.heads * T
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
        fwd = math_attention_forward(name, self.B, self.sh.heads, self.T, self.D, self.a, self.pol)
        a, MD, S = self.a, self.MD, self.B * self.sh.heads * self.T**2
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

    def mlp(self, i: int) -> tuple[list, list]:
        """fc1 - bias + GELU - fc2 (models/sit.py Mlp): the bias + GELU kernel after an mm without bias, GELU after
        an addmm (the reference, impl="ref", an fp8 fc1: its own forward, then compile fuses its bias add into the
        GELU, which is the kernel's traffic), or GELU in fc1's epilogue (not built)."""
        st, M, D, F, a, y = self.st, self.M, self.D, self.sh.hidden, self.a, self.y
        fp8 = st.fp8
        H = a * M * F
        kernel = st.bias_gelu == "kernel" and (st.impl == "triton" or fp8 != "none")
        aux = H if st.bias_gelu == "epilogue" else 0.0
        fc1 = self.linear(f"b{i}.fc1", M, D, F, y, bias=not kernel, epilogue_write=aux, epilogue_saved=aux, fp8=fp8)
        fc2 = self.linear(f"b{i}.fc2", M, F, D, a, dx_epilogue_read=aux, fp8=fp8)
        if kernel:
            part = 4 * bias_gelu_chunks(M, F, self.pol.interpreted) * F
            act_f = [ew(f"b{i}.bias_gelu", H + 4 * F, H, saved=H)]
            act_b = [ew(f"b{i}.bias_gelu.bwd", 2 * H + 4 * F, H + part), ew(f"b{i}.bias_gelu.dbias", part, 4 * F)]
        elif aux:
            act_f, act_b = [], []
        else:
            act_f, act_b = [ew(f"b{i}.gelu", H, H, saved=H)], [ew(f"b{i}.gelu_bwd", 2 * H, H)]
        return fc1.forward() + act_f + fc2.forward(), staged(fc2.backward() + act_b + fc1.backward(), "bwd")

    def block(self, i: int) -> tuple[list, list]:
        st, a, y, M, D = self.st, self.a, self.y, self.M, self.D
        strided = self.strided(i)
        cross = st.mlp_gate == "next_block" and i > 0 and st.impl == "triton"
        mod_f, mod_b = self.modulation(f"b{i}.adaLN", 6)
        ad1_f, ad1_b = self.adaln(f"b{i}.adaln1", strided, gated=cross)
        qkv = self.linear(f"b{i}.qkv", M, D, 3 * D, y, fp8=st.fp8)
        at_f, at_b = self.attention(f"b{i}.attn")
        proj = self.linear(f"b{i}.proj", M, D, D, a, save_x=False, fp8=st.fp8)
        ad2_f, ad2_b = self.adaln(f"b{i}.adaln2", strided, gated=True)
        mlp_f, mlp_b = self.mlp(i)
        if self.mlp_ckpt:  # the MLP keeps its input h and recomputes the rest before its backward
            mlp_b = staged(_unsaved(_recomputed(mlp_f)), "bwd") + mlp_b
            mlp_f = _unsaved(mlp_f)
            mlp_f[0] = replace(mlp_f[0], saved=y * self.MD)
        end_f, end_b = self.block_end(i)
        acc = [] if cross else [ew(f"b{i}.dx.add", 8 * self.MD, 4 * self.MD)]
        fwd = mod_f + ad1_f + qkv.forward() + at_f + proj.forward() + ad2_f + mlp_f + end_f
        bwd = end_b + mlp_b + ad2_b + proj.backward() + at_b + qkv.backward()
        bwd = staged(bwd + ad1_b + acc + mod_b, "bwd")
        if i in self.full_blocks:  # the block keeps its input x (c is kept anyway), runs its forward again first
            bwd = staged(_unsaved(_recomputed(fwd)), "bwd") + bwd
            fwd = _unsaved(fwd)
            fwd[0] = replace(fwd[0], saved=4 * self.MD)
        return fwd, bwd

    def block_end(self, i: int) -> tuple[list, list]:
        """x + gate2 * mlp(h): unfused (mul, add), the gated-residual kernel, or folded into the next adaLN kernel."""
        mode = self.st.mlp_gate if self.st.impl == "triton" else "unfused"
        if mode == "unfused":
            return self._gate(f"b{i}.mlp_gate")
        if mode == "next_block" and i < self.sh.depth - 1:
            return [], []
        MD, a, BD = self.MD, self.a, self.BD
        part = 4 * self.B * self.chunks * self.D
        fwd = [ew(f"b{i}.mlp_gate", 4 * MD + a * MD + a * BD, 4 * MD, saved=a * MD)]
        bwd = [ew(f"b{i}.mlp_gate.bwd", 4 * MD + a * MD + a * BD, a * MD + part), ew(f"b{i}.dgate", part, 4 * BD)]
        return fwd, staged(bwd + cast(f"b{i}.dgate", BD, F32, a), "bwd")

    # -- the whole model -------------------------------------------------------------------------------------------
    def largest_backward_write(self) -> float:
        """Bytes of the largest single output of the backward (a transient on top of the saved activations)."""
        ops = self.block(min(1, self.sh.depth - 1))[1] + heads.final(self)[1] + heads.projector(self)[1]
        return max(o.write for o in ops + heads.loss(self)[1])

    def recompute_peak(self) -> float:
        """Bytes a checkpointed region holds while its backward runs, beyond what stays kept: one recomputed block's
        (or MLP's) activations and weight copies at a time (0 without checkpointing)."""
        if not (self.full_blocks or self.mlp_ckpt):
            return 0.0
        plain = SiTStep(self.sh, replace(self.st, act_ckpt="none"), self.B, self.pol)
        i = min(1, self.sh.depth - 1)
        if self.full_blocks:
            return sum(o.saved for o in plain.block(i)[0]) - 4 * self.MD  # the input x stays kept
        return sum(o.saved for o in plain.mlp(i)[0]) - self.y * self.MD  # the input h stays kept

    def ops(self) -> list[Op]:
        """Forward (embedders, blocks, projectors, final layer), losses, then the backward in reverse order."""
        emb_f, emb_b = heads.embed(self)
        blk_f, blk_b = self.blocks()
        proj_f, proj_b = heads.projector(self)
        fin_f, fin_b = heads.final(self)
        loss_f, loss_b = heads.loss(self)
        return emb_f + blk_f + proj_f + fin_f + loss_f + loss_b + fin_b + proj_b + blk_b + emb_b

    def blocks(self) -> tuple[list, list]:
        """Forward and backward of all blocks: block 0 (the strided one without cut 2a), then the others as scaled
        records of one generic block each for the plain and the checkpointed ones (SiT-XL's 27 as one or two)."""
        first = self.block(0)
        fwd, bwd = list(first[0]), list(first[1])
        rest = range(1, self.sh.depth)
        for full in (False, True):
            group = [i for i in rest if (i in self.full_blocks) == full]
            if group:
                f, b = self.block(group[0])
                fwd, bwd = fwd + times(f, len(group)), times(b, len(group)) + bwd
        return fwd, bwd


def _unsaved(ops: list[Op]) -> list[Op]:
    return [replace(o, saved=0.0) for o in ops]


def _recomputed(ops: list[Op]) -> list[Op]:
    """What a non-reentrant checkpoint recomputes of a region: its ops up to the last one that saves a tensor for the
    backward (torch.utils.checkpoint stops early once every saved tensor is back). An ATen op saves its inputs before
    its kernel runs (the generated autograd code sets the node's saved variables first), so when that last op is a
    GEMM keeping its input (the MLP's fc2), its kernel is not rerun; a custom op saves in ``setup_context``, after
    its kernel (the block's gated residual, the last op of a whole block)."""
    last = max((k for k, o in enumerate(ops) if o.saved), default=-1)
    return ops[:last] if last >= 0 and ops[last].part == "gemm" else ops[: last + 1]


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
