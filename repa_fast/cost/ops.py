"""Kernels as records: what each one reads, writes and computes, and builders for the pieces that recur.

An ``Op`` is one dispatched op of an eager step (at least one GPU kernel; a foreach op is one dispatch that a GPU
may split into several multi-tensor launches): bytes read and written in DRAM, hardware FLOPs, the bytes it adds to
the tensors autograd keeps for the backward, and the part of the step it belongs to. Bytes follow the convention of
bench/traffic.py: every input read once, every output written once, nothing kept in cache between ops. The CPU
cross-check (tests/test_cost_crosscheck.py) compares these lists with the ops a real step dispatches.

A Linear under autocast (the pattern of every SiT and encoder matmul) is, per PyTorch's autocast and autograd:
forward: cast the fp32 bias and weight to the autocast dtype (autocast casts parameters at each use), cast an fp32
input, one addmm; backward: mm for the input gradient, mm for the weight gradient, a reduction for the bias
gradient, then casts of the input, weight and bias gradients back to fp32 (the dtypes of their leaves). The bf16
weight copy is kept for the backward wherever the input gradient needs it (addmm saves mat2 when mat1 requires
grad; a convolution always saves its weight): ``saved`` on the weight cast, the "weight copies" of the memory model.
"""

from dataclasses import dataclass, replace

PARTS = ("gemm", "attention", "elementwise", "encoder", "weight_cast", "optimizer", "clip", "ema", "comm", "host")
F32 = 4


@dataclass(frozen=True)
class Op:
    part: str
    name: str
    read: float = 0.0  # bytes per step
    write: float = 0.0
    launches: float = 1.0  # dispatched ops (GPU kernels: at least this many)
    flops: float = 0.0  # hardware FLOPs (matmuls, attention)
    rate: str = "bf16"  # the tensor-core rate the FLOPs run at: "bf16" | "fp8" | "fp8_rowwise" | "fp32"
    saved: float = 0.0  # bytes this op adds to what autograd keeps for the backward
    stage: str = "fwd"  # "fwd" | "bwd" | "step" (after the backward)

    @property
    def bytes(self) -> float:
        return self.read + self.write


def times(ops: list[Op], n: float) -> list[Op]:
    """``n`` copies of ``ops`` (identical blocks), as scaled records."""
    return [
        replace(o, read=o.read * n, write=o.write * n, launches=o.launches * n, flops=o.flops * n, saved=o.saved * n)
        for o in ops
    ]


def staged(ops: list[Op], stage: str) -> list[Op]:
    return [replace(o, stage=stage) for o in ops]


def ew(name: str, read: float, write: float, part: str = "elementwise", saved: float = 0.0, launches: float = 1.0):
    return Op(part, name, read, write, launches, saved=saved)


def cast(name: str, numel: float, src: int, dst: int, part: str = "elementwise", saved: float = 0.0) -> list[Op]:
    """A dtype conversion kernel, or nothing when the dtypes agree."""
    return [] if src == dst or not numel else [ew(name, src * numel, dst * numel, part, saved=saved)]


@dataclass(frozen=True)
class Linear:
    """``rows`` x ``k`` @ ``k`` x ``n`` (+ bias) in ``amp`` bytes; the input arrives in ``x_bytes``."""

    name: str
    rows: float
    k: int
    n: int
    amp: int  # operand bytes: 2 under autocast, 4 without
    x_bytes: int  # bytes of the input as it arrives (4 = fp32: cast under autocast)
    need_dx: bool = True
    bias: bool = True
    save_x: bool = True  # the input is a new saved tensor (False when another op already keeps it)
    saves_weight: bool | None = None  # the GEMM keeps its (cast) weight for the backward; None: when need_dx
    bias_grad_in_gemm: bool = False  # a convolution: its backward op reads the weight and returns the bias gradient
    weights: str = "fp32"  # "fp32": cast per use under autocast; "bf16_copy": already in the operand dtype
    wgrad: str = "cast"  # "cast": the GEMM writes the operand dtype, cast to fp32; "fp32": the GEMM writes fp32
    epilogue_write: float = 0.0  # extra bytes the forward GEMM writes (e.g. the GELU input kept for the backward)
    epilogue_saved: float = 0.0  # bytes of that extra output kept for the backward
    dx_epilogue_read: float = 0.0  # extra bytes the input-gradient GEMM reads (e.g. that GELU input)
    fp8: str = "none"  # "tensorwise" | "rowwise": torchao float8 (see fp8_forward)
    fp8_casts: str = "separate"  # "fused": the producing kernel writes the fp8 copy (and its amax) itself

    @property
    def autocast(self) -> bool:
        return self.amp < F32

    @property
    def keeps_weight(self) -> bool:
        return self.need_dx if self.saves_weight is None else self.saves_weight

    def forward(self) -> list[Op]:
        if self.fp8 != "none":
            return self.fp8_forward()
        a, nk, nb = self.amp, self.n * self.k, self.n if self.bias else 0
        ops = []
        if self.autocast and self.weights == "fp32":
            kept = a * nk if self.keeps_weight else 0.0
            ops += cast(f"{self.name}.b", nb, F32, a, "weight_cast")
            ops += cast(f"{self.name}.w", nk, F32, a, "weight_cast", saved=kept)
        x_cast = self.autocast and self.x_bytes == F32
        save = a * self.rows * self.k if self.save_x else 0.0
        ops += cast(f"{self.name}.x", self.rows * self.k, self.x_bytes, a, saved=save if x_cast else 0.0)
        read = a * (self.rows * self.k + nk + nb)
        write = a * self.rows * self.n + self.epilogue_write
        ops.append(
            Op(
                "gemm",
                self.name,
                read,
                write,
                flops=2.0 * self.rows * self.n * self.k,
                saved=(0.0 if x_cast else save) + self.epilogue_saved,
                rate="bf16" if self.autocast else "fp32",
            )
        )
        return ops

    def backward(self) -> list[Op]:
        if self.fp8 != "none":
            return self.fp8_backward()
        a, nk, rows = self.amp, self.n * self.k, self.rows
        rate, flops = ("bf16" if self.autocast else "fp32"), 2.0 * rows * self.n * self.k
        ops = []
        if self.need_dx:
            read = a * (rows * self.n + nk) + self.dx_epilogue_read
            ops.append(Op("gemm", f"{self.name}.dx", read, a * rows * self.k, flops=flops, rate=rate, stage="bwd"))
        w_out = F32 if (self.wgrad == "fp32" or not self.autocast) else a
        conv = a * nk if self.bias_grad_in_gemm else 0.0  # convolution_backward is handed the weight too
        db = a * self.n if (self.bias and self.bias_grad_in_gemm) else 0.0
        read, write = a * rows * (self.n + self.k) + conv, w_out * nk + db
        ops.append(Op("gemm", f"{self.name}.dw", read, write, flops=flops, rate=rate, stage="bwd"))
        if self.bias and not self.bias_grad_in_gemm:
            ops.append(ew(f"{self.name}.db", a * rows * self.n, a * self.n))
        if self.need_dx:
            ops += cast(f"{self.name}.dx", rows * self.k, a, self.x_bytes)
        ops += cast(f"{self.name}.dw", nk, w_out, F32, "weight_cast")
        if self.bias:
            ops += cast(f"{self.name}.db", self.n, a, F32, "weight_cast")
        return staged(ops, "bwd")

    # -- torchao float8 (dynamic scaling) ----------------------------------------------------------------------------
    # torchao/float8/float8_linear.py ``matmul_with_hp_or_float8_args``: six casts per Linear, each an amax
    # reduction over the high-precision tensor and a scaled cast to float8 (``hp_tensor_to_float8_dynamic``; under
    # torch.compile each pair is at best these two passes: reads b n twice, writes n, i.e. (2b + 1) n bytes for n
    # elements of b bytes). Forward: the input (autocast dtype) and the weight (from its fp32 master: the bf16 copy of
    # autocast is not made, nor kept). Backward: the output gradient for the input-gradient GEMM and again along the
    # other axis for the weight-gradient GEMM, the weight again, the saved high-precision input again. Tensorwise
    # scaling gives the two casts of the output gradient the same scale and values: the compiled backward computes
    # them once (one amax, one cast; the layout each GEMM wants assumed written by that cast kernel); rowwise scales
    # along different axes, so both run. The forward GEMM writes no bias (torchao adds it after: ``output +
    # self.bias.to(output.dtype)``), so the bias is a pass of its own, and its gradient a reduction
    # (tests/test_cost_crosscheck.py counts the casts of a real Float8Linear).
    def _to_fp8(self, name: str, numel: float, src: int, part: str = "elementwise") -> list[Op]:
        if self.fp8_casts == "fused":  # only the extra fp8 output of the kernel that produced the tensor
            return [Op(part, f"{name}.fp8_out", 0.0, 1.0 * numel, launches=0.0)]
        return [ew(f"{name}.amax", src * numel, 4.0, part), ew(f"{name}.to_fp8", src * numel, 1.0 * numel, part)]

    @property
    def _w_src(self) -> int:
        return self.amp if self.weights == "bf16_copy" else F32

    @property
    def _rate(self) -> str:
        return "fp8_rowwise" if self.fp8 == "rowwise" else "fp8"

    @property
    def _separate_bias(self) -> bool:
        return self.bias and self.fp8_casts != "fused"  # a producer that writes fp8 also adds the bias (epilogue)

    def fp8_forward(self) -> list[Op]:
        a, rows, nk, n = self.amp, self.rows, self.n * self.k, self.n
        ops = cast(f"{self.name}.x", rows * self.k, self.x_bytes, a)
        save = a * rows * self.k if self.save_x else 0.0
        ops += self._to_fp8(f"{self.name}.x", rows * self.k, a)
        ops += self._to_fp8(f"{self.name}.w", nk, self._w_src, part="weight_cast")
        bias_read = a * n if (self.bias and not self._separate_bias) else 0.0
        read, write = rows * self.k + nk + bias_read, a * rows * n + self.epilogue_write
        flops = 2.0 * rows * n * self.k
        ops.append(Op("gemm", self.name, read, write, flops=flops, rate=self._rate, saved=save + self.epilogue_saved))
        if self._separate_bias:
            ops += cast(f"{self.name}.b", n, F32, a, "weight_cast")
            ops.append(ew(f"{self.name}.bias_add", a * rows * n + a * n, a * rows * n))
        return ops

    def fp8_backward(self) -> list[Op]:
        a, rows, nk, n, k = self.amp, self.rows, self.n * self.k, self.n, self.k
        ops = self._to_fp8(f"{self.name}.dy", rows * n, a)
        ops += self._to_fp8(f"{self.name}.w_t", nk, self._w_src, part="weight_cast")
        flops = 2.0 * rows * n * k
        if self.need_dx:
            read = rows * n + nk + self.dx_epilogue_read
            ops.append(Op("gemm", f"{self.name}.dx", read, a * rows * k, flops=flops, rate=self._rate))
        ops += self._to_fp8(f"{self.name}.x_t", rows * k, a)
        if self.fp8 == "rowwise":  # the output gradient scaled along the other axis for the weight gradient
            ops += self._to_fp8(f"{self.name}.dy_t", rows * n, a)
        w_out = F32 if self.wgrad == "fp32" else a
        ops.append(Op("gemm", f"{self.name}.dw", rows * (n + k), w_out * nk, flops=flops, rate=self._rate))
        if self.bias:
            ops.append(ew(f"{self.name}.db", a * rows * n, a * n))
        if self.need_dx:
            ops += cast(f"{self.name}.dx", rows * k, a, self.x_bytes)
        ops += cast(f"{self.name}.dw", nk, w_out, F32, "weight_cast")
        if self.bias:
            ops += cast(f"{self.name}.db", n, a, F32, "weight_cast")
        return staged(ops, "bwd")


def fp8_cast_bytes(rows: float, k: int, n: int, recipe: str, amp: int = 2) -> float:
    """Net extra bytes per step of one torchao Float8Linear over the bf16 Linear it replaces (casts only; the fp8
    GEMMs read half the operand bytes, which the roofline charges to the GEMMs): tensorwise 5 (2 M K) + 5 M N +
    (18 - 6) K N, rowwise 10 M K + 10 M N + 12 K N at 2-byte activations (M rows, K in, N out; the bf16 Linear casts
    its fp32 weight once, 6 K N)."""
    b = amp
    x, dy, w = 2 * (2 * b + 1) * rows * k, (2 * b + 1) * rows * n * (2 if recipe == "rowwise" else 1), 2 * 9 * k * n
    return x + dy + w - (4 + b) * k * n
