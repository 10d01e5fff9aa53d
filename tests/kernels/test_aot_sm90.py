"""Every Triton kernel of repa_fast/kernels, compiled ahead of time for an H100 (sm_90a) on the CPU.

The interpreter (how every other kernel test runs here) accepts programs that compiled Triton rejects or runs
badly: tile shapes, ``tl.dot`` constraints, register pressure. This test calls the real launchers on "meta"
tensors (no data, no device; ``num_sms`` models an H100's 132 SMs there) at the SiT/DINOv2 shapes, records each
kernel launch they make (arguments, constexprs, ``num_warps``), specialises the arguments as Triton's JIT does at
run time, and compiles each distinct launch with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`` and the wheel's bundled ptxas. From the cubin (the wheel's cuobjdump) it asserts:

- it compiles;
- no local memory: a stack frame, LOCAL bytes or LDL/STL in the SASS are register spills;
- occupancy: registers (allocated per warp in units of 256) and shared memory (+1 KB the hardware reserves per
  block) leave at least ``TARGET_WARPS_PER_SM`` = 16 warps resident per SM (25%). These kernels are memory-bound:
  by Little's law an SM must keep about 3 TB/s x ~0.6 us / 132 SMs = ~14 KB of loads in flight; 16 warps = 512
  threads with a few independent 16-byte loads each do (each thread's row chunk gives several), so fewer resident
  warps would starve the memory system while more buys little;
- 16-byte global loads (``LDG.E.128``) on every row tensor where the layout allows: each case lists the loads
  that cannot be 16 bytes wide (per-row scalars) and the assertion allows only those.

Compilation runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it, and it is read when
``@triton.jit`` decorates a function, so in this process the kernels are interpreter objects). The same file is
the worker: ``python tests/kernels/test_aot_sm90.py OUT.json [CASE-SUBSTRING]``. Two toy kernels prove the checks
can fail: one that spills (an 8K-value row held by one warp) and one that does not compile (a 24-wide tile).

What this test found and what was changed (sm_90a; triton 3.8, and 3.6 as on the device): the adaLN backward used
~255 registers at 4 warps and spilled (gated, D=384 and D=1152); it now runs 2K-value tiles at 8 warps (98-127
registers). The adaLN forward spilled 8 bytes at 4 warps under triton 3.6 (RMSNorm + weight, D=384); it runs at 8
warps (40-56 registers). The RoPE kernels loaded even and odd channels with stride-2 scalar loads (no LDG.E.128),
used 150-255 registers and spilled in the backward; they now load whole contiguous head rows and pair channels in
registers (38-128 registers, LDG.E.128).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch

from repa_fast.kernels._dispatch import tl, triton

ROOT = Path(__file__).resolve().parents[2]

# SiT-S/B/L/XL widths and DINOv2-S/B/L/g embedding widths (projector outputs for the alignment loss); head dims of
# SiT-S/B/L (64) and SiT-XL (72); 256 tokens (SiT-*/2 at 256 px, DINOv2 at 224 px after resampling).
WIDTHS = (384, 768, 1024, 1152, 1536)
HEAD_DIMS = (64, 72)
BATCH, TOKENS = 32, 256

# H100 SXM (sm_90) per-SM limits: CUDA C Programming Guide, "Compute Capabilities", table 21.
SM90_REGS = 65536
SM90_REG_UNIT = 256  # registers are allocated per warp in units of 256
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32
SM90_SMEM = 233472  # 228 KB per SM
SM90_SMEM_RESERVED = 1024  # per block, reserved by the system
TARGET_WARPS_PER_SM = 16


# ----------------------------------------------------------------------------------------------------------------
# Bundled tools, occupancy, SASS parsing (pure functions, used on both sides of the subprocess)
# ----------------------------------------------------------------------------------------------------------------
def nvidia_tool(name: str) -> Path | None:
    """A tool shipped in the triton wheel (backends/nvidia/bin): ptxas, cuobjdump, nvdisasm; None if absent."""
    try:
        import triton as real_triton
    except ImportError:
        return None
    path = Path(real_triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def resident_warps(regs: int, smem: int, num_warps: int) -> int:
    """Warps of this kernel resident on one sm_90 SM, limited by registers, shared memory, warps and blocks."""
    regs_per_warp = -(-regs * 32 // SM90_REG_UNIT) * SM90_REG_UNIT
    by_regs = SM90_REGS // max(1, regs_per_warp * num_warps)
    by_smem = SM90_SMEM // (smem + SM90_SMEM_RESERVED)
    blocks = min(by_regs, by_smem, SM90_MAX_WARPS // num_warps, SM90_MAX_BLOCKS)
    return blocks * num_warps


def parse_resource_usage(text: str) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) function in ``cuobjdump --dump-resource-usage`` output."""
    line = next((ln for ln in text.splitlines() if "REG:" in ln), None)
    if line is None:
        raise ValueError(f"no resource line in cuobjdump output:\n{text}")
    keys = {"REG": "regs", "STACK": "stack", "SHARED": "shared", "LOCAL": "local"}
    return {v: int(re.search(rf"\b{k}:(\d+)", line).group(1)) for k, v in keys.items()}


def global_accesses(sass: str) -> Counter:
    """Counts of global and local load/store opcodes (``LDG.E.128``, ``STL``...) in a SASS listing."""
    return Counter(re.findall(r"\b((?:LDG|STG|LDL|STL)(?:\.[A-Z0-9_]+)*)\b", sass))


def problems(report: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when it passes every check)."""
    if report.get("error"):
        return [f"does not compile for sm_90a: {report['error']}"]
    out = []
    ops = Counter(report["accesses"])
    spill_ops = {k: v for k, v in ops.items() if k.startswith(("LDL", "STL"))}
    if report["stack"] or report["local"] or spill_ops:
        out.append(f"spills: stack {report['stack']} B, local {report['local']} B, {spill_ops}")
    warps = resident_warps(report["regs"], report["smem"], report["num_warps"])
    if warps < TARGET_WARPS_PER_SM:
        out.append(
            f"occupancy: {report['regs']} registers x {report['num_warps']} warps and {report['smem']} B shared "
            f"leave {warps} warps per SM < {TARGET_WARPS_PER_SM}"
        )
    narrow = sum(v for k, v in ops.items() if k.startswith("LDG") and ".128" not in k)
    if report["wide_loads"] and (ops.get("LDG.E.128", 0) == 0 or narrow > report["narrow_loads_allowed"]):
        out.append(
            f"global loads: {dict(ops)} has {narrow} loads narrower than 16 bytes "
            f"(allowed: {report['narrow_loads_allowed']}, per-row scalars)"
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Worker side: record the launchers' launches, specialise, compile (runs without TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------------------------
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}


def specialize(fn, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) as Triton's JIT builds them at launch (runtime/jit.py): tensors are
    pointers, 16-byte aligned when their offset is (allocations are 256-byte aligned); ints equal to 1 become
    constexprs, ints divisible by 16 get ``tt.divisibility`` 16; floats are fp32; bools u1; None a constexpr."""
    names = fn.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr or v is None or (type(v) is int and v == 1):
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[v.dtype]
            if v.storage_offset() * v.element_size() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[name] = "u1"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={v!r}")
    return signature, constexprs, attrs, options


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: ``kernel[grid](*args, **kwargs)`` records instead of
    launching."""

    def __init__(self, fn, sink: list, label: list):
        self.fn, self.sink, self.label = fn, sink, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.label[0], self.fn, args, kwargs))

        return launch


def _m(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _adaln_calls(adaln):
    """Forward and backward launches of adaln_modulate / gated_residual_adaln / gated_residual as SiT calls them:
    under bf16 autocast (fp32 residual stream, bf16 branch and adaLN Linear chunks, bf16 modulated outputs: y_dtype),
    under autocast with fp32 outputs (the ops' default dtype), in pure bf16, and RMSNorm+weight."""
    f32, bf16 = torch.float32, torch.bfloat16
    schemes = (("amp", f32, bf16, False), ("amp-f32", f32, f32, False), ("bf16", bf16, bf16, False))
    for D in WIDTHS:
        mods = _m(BATCH, 6 * D).chunk(6, dim=1)  # adaLN_modulation Linear output: strided (B, D) chunks
        for scheme, xd, yd, rms in schemes + (("rms", bf16, bf16, True),):
            w = _m(D) if rms else None
            x, br = _m(BATCH, TOKENS, D, dtype=xd), _m(BATCH, TOKENS, D)
            tag = f"D={D} {scheme}"
            yield f"adaln fwd {tag}", partial(adaln.adaln_fwd, x, None, None, mods[0], mods[1], w, 1e-6, rms, None, yd)
            yield f"gated fwd {tag}", partial(adaln.adaln_fwd, x, br, mods[2], mods[0], mods[1], w, 1e-6, rms, xd, yd)
            dy = _m(BATCH, TOKENS, D, dtype=yd)
            yield f"adaln bwd {tag}", partial(adaln.adaln_bwd, dy, None, x, None, None, mods[1], w, 1e-6, rms, xd)
            yield f"gated bwd {tag}", partial(adaln.adaln_bwd, dy, x, x, br, mods[2], mods[1], w, 1e-6, rms, xd)
            if scheme in ("amp", "bf16"):  # the block's last residual x + gate2 * fc2(h): no norm, no dy
                yield (
                    f"residual fwd {tag}",
                    partial(adaln.adaln_fwd, x, br, mods[5], None, None, None, 0.0, False, xd, None),
                )
                yield (
                    f"residual bwd {tag}",
                    partial(adaln.adaln_bwd, None, x, None, br, mods[5], None, None, 0.0, False, None),
                )


def _bias_gelu_calls(bias_gelu):
    """bias + GELU(tanh) on fc1's output (B*T, 4D) as linear_gelu calls it: bf16 u with the fp32 bias parameter
    (autocast) and with a bf16 bias (a bf16 model), forward and backward."""
    for D in WIDTHS:
        u, dy = _m(BATCH * TOKENS, 4 * D), _m(BATCH * TOKENS, 4 * D)
        for bd in (torch.float32, torch.bfloat16):
            tag = f"F={4 * D} bias {str(bd)[6:]}"
            yield f"bias_gelu fwd {tag}", partial(bias_gelu.bias_gelu_fwd, u, _m(4 * D, dtype=bd))
            yield f"bias_gelu bwd {tag}", partial(bias_gelu.bias_gelu_bwd, dy, u, _m(4 * D, dtype=bd))


def _rope_calls(rope):
    """qk_norm_rope (LayerNorm + affine, with and without RoPE) and apply_rope_2d on q read from the qkv GEMM output
    (a strided (B, N, H, Dh) view), forward and backward, bf16 q under autocast (fp32 norm output) and pure bf16."""
    f32, bf16 = torch.float32, torch.bfloat16
    for dh in HEAD_DIMS:
        H = 1152 // dh if dh == 72 else 768 // dh
        q = _m(BATCH, TOKENS, 3, H, dh).unbind(2)[0]
        cos, sin = _m(TOKENS, dh, dtype=f32), _m(TOKENS, dh, dtype=f32)
        w, b = _m(dh, dtype=f32), _m(dh, dtype=f32)
        cases = (
            ("qknorm+rope amp", w, b, cos, sin, 1, f32),
            ("qknorm+rope bf16", w.bfloat16(), b.bfloat16(), cos, sin, 1, bf16),
            ("qknorm", w, b, None, None, 1, f32),
            ("rope", None, None, cos, sin, 0, bf16),
            ("rms+rope", w, None, cos, sin, 2, f32),
        )
        for name, w_, b_, c, s, norm, yd in cases:
            tag = f"Dh={dh} {name}"
            yield f"rope fwd {tag}", partial(rope.norm_rope_fwd, q, w_, b_, c, s, 1e-5, norm, yd)
            dy = _m(BATCH, TOKENS, H, dh, dtype=yd)
            yield f"rope bwd {tag}", partial(rope.norm_rope_bwd, dy, q, w_, c, s, 1e-5, norm, bf16)


def _align_calls(align):
    """The per-row cosine of the alignment loss: bf16 projector output against bf16 or fp32 encoder features; the
    upstream gradient of ``.mean()`` is an expanded scalar (stride 0); dz only when the target needs a gradient."""
    for D in WIDTHS:
        for pd, zd in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
            p, z = _m(BATCH * TOKENS, D, dtype=pd), _m(BATCH * TOKENS, D, dtype=zd)
            dcos = _m(1, dtype=torch.float32).expand(BATCH * TOKENS)
            tag = f"D={D} {str(pd)[6:]}/{str(zd)[6:]}"
            yield f"cos fwd {tag}", partial(align.cos_rows_fwd, p, z, 1e-12)
            yield f"cos bwd {tag}", partial(align.cos_rows_bwd, dcos, p, z, 1e-12, True, False)
            yield f"cos bwd dz {tag}", partial(align.cos_rows_bwd, dcos, p, z, 1e-12, True, True)


# Loads that cannot be 16 bytes wide, per kernel: vectors loaded once per program and spread over all its threads
# (fewer than 16 bytes each), and per-row scalars. Everything else (rows of activations, the (B, D) modulation
# rows of the forward, rotation tables) must use LDG.E.128.
NARROW_LOADS_ALLOWED = {
    "_adaln_fwd_kernel": 1,  # the RMSNorm weight, (D,) once per program
    "_adaln_bwd_kernel": 3,  # scale, gate, weight: (D,) vectors of one sample, loaded once per program
    "_cos_rows_bwd_kernel": 4,  # the upstream gradient, one fp32 per row (BLOCK_M rows, stride 0 after .mean())
    "_norm_rope_fwd_kernel": 2,  # qk-norm weight and bias, (HEAD_DIM,) once per program
    "_norm_rope_bwd_kernel": 1,  # qk-norm weight
    "_bias_gelu_fwd_kernel": 1,  # the bias, (BLOCK_F,) once per program
    "_bias_gelu_bwd_kernel": 1,  # the bias
}


def record_launches() -> list:
    """[(label, kernel, args, kwargs)] of every launch the launchers make for the cases above, plus the list of
    every @triton.jit kernel (name ending in ``_kernel``) of repa_fast.kernels, to prove coverage."""
    import importlib

    from repa_fast.kernels import adaln, align_loss, rope

    bias_gelu = importlib.import_module("repa_fast.kernels.bias_gelu")  # the package re-exports a function of that name
    sink, label, kernels = [], [""], {}
    modules = (adaln, align_loss, rope, bias_gelu)
    saved = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction):
                kernels[name] = obj
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink, label))
    try:
        for calls in (_adaln_calls(adaln), _align_calls(align_loss), _rope_calls(rope), _bias_gelu_calls(bias_gelu)):
            for case, call in calls:
                label[0] = case
                call()
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)
    return sink, sorted(kernels)


def compile_sm90(fn, args: tuple, kwargs: dict, wide_loads: bool = True) -> dict:
    """Compile one launch for sm_90a; report registers, stack, local and shared bytes and the SASS global accesses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialize(fn, args, kwargs)
    report = {
        "kernel": fn.__name__,
        "num_warps": options.get("num_warps", 4),
        "constexprs": {k: repr(v) for k, v in constexprs.items()},
        "signature": signature,
        "wide_loads": wide_loads,
        "narrow_loads_allowed": NARROW_LOADS_ALLOWED.get(fn.__name__, 0),
    }
    try:
        src = ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # compile errors of every kind (CompilationError, ptxas failures, MLIR errors)
        return report | {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _run([str(nvidia_tool("cuobjdump")), "--dump-resource-usage", str(cubin)])
        sass = _run([str(nvidia_tool("cuobjdump")), "--dump-sass", str(cubin)])
    usage = parse_resource_usage(usage)
    target = re.search(r"\.target\s+(\S+)", compiled.asm["ptx"]).group(1)
    smem = int(compiled.metadata.shared) + usage["shared"]
    return report | usage | {"smem": smem, "ptx_target": target, "accesses": dict(global_accesses(sass))}


def _run(cmd: list) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


_PENDING: list = []  # (fn, args, kwargs) to compile, shared with forked pool workers by index


def _compile_pending(i: int) -> dict:
    return compile_sm90(*_PENDING[i])


def worker(out_path: str, only: str = "") -> None:
    """Compile every distinct recorded launch (whose case name contains ``only``) and the two toy kernels, in
    parallel over the CPU's cores (forked processes), and write the reports as JSON."""
    launches, kernels = record_launches()
    by_key = {}
    for case, fn, args, kwargs in (launch for launch in launches if only in launch[0]):
        sig, const, attrs, opts = specialize(fn, args, kwargs)
        key = repr((fn.__name__, sig, sorted(const.items()), sorted(attrs), sorted(opts.items())))
        by_key.setdefault(key, (fn, args, kwargs, []))[3].append(case)
    toy_spill = (_toy_spill_kernel, (_m(_TOY_SPILL_BLOCK, dtype=torch.float32),), _TOY_SPILL_META, False)
    toy_bad_tile = (_toy_bad_tile_kernel, (_m(24, dtype=torch.float32),), {"BLOCK": 24}, False)
    _PENDING[:] = [(fn, args, kwargs) for fn, args, kwargs, _ in by_key.values()] + [toy_spill, toy_bad_tile]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        done = pool.map(_compile_pending, range(len(_PENDING)), chunksize=1)
    reports = [r | {"cases": cases} for r, (*_, cases) in zip(done, by_key.values())]
    toys = {"toy_spill": done[-2], "toy_bad_tile": done[-1]}
    Path(out_path).write_text(json.dumps({"kernels": kernels, "reports": reports, "toys": toys}, indent=1))


# Toy kernels for the negative tests. One warp holding an 8K-value fp32 row and its running sum needs 512 registers
# per thread (ptxas allows 255): the rest goes to local memory.
_TOY_SPILL_BLOCK = 1 << 13
_TOY_SPILL_META = {"BLOCK": _TOY_SPILL_BLOCK, "num_warps": 1}


@triton.jit
def _toy_spill_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    y = x * tl.sum(x * x, axis=0) + tl.cumsum(x, axis=0)
    tl.store(x_ptr + offs, y)


@triton.jit
def _toy_bad_tile_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # compiled Triton needs power-of-2 tiles: BLOCK = 24 (a head dim of 24) fails
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


# ----------------------------------------------------------------------------------------------------------------
# Test side
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("triton", reason="AOT compile needs the triton package")
    missing = [t for t in ("ptxas", "cuobjdump") if nvidia_tool(t) is None]
    if missing:
        pytest.skip(f"the triton wheel has no bundled {', '.join(missing)} (backends/nvidia/bin)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        proc = subprocess.run(
            [sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200
        )
        assert proc.returncode == 0, f"AOT worker failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(out.read_text())


def _failures(aot, check) -> str:
    bad = [
        f"{r['kernel']} {r['constexprs']} warps={r['num_warps']} ({r['cases'][0]}, ...): {p}"
        for r in aot["reports"]
        for p in check(r)
    ]
    return "\n".join(bad)


@pytest.mark.slow
def test_every_kernel_is_covered(aot):
    launched = {r["kernel"] for r in aot["reports"]}
    assert set(aot["kernels"]) == launched, f"kernels never launched by the cases: {set(aot['kernels']) - launched}"
    assert len(aot["kernels"]) >= 6
    assert all(r.get("ptx_target") == "sm_90a" for r in aot["reports"] if not r.get("error"))


@pytest.mark.slow
def test_every_launch_compiles_for_sm90(aot):
    assert not (msg := _failures(aot, lambda r: [p for p in problems(r) if "compile" in p])), msg


@pytest.mark.slow
def test_no_register_spills(aot):
    assert not (msg := _failures(aot, lambda r: [p for p in problems(r) if p.startswith("spills")])), msg


@pytest.mark.slow
def test_occupancy_budget(aot):
    assert not (msg := _failures(aot, lambda r: [p for p in problems(r) if p.startswith("occupancy")])), msg


@pytest.mark.slow
def test_sixteen_byte_global_loads(aot):
    assert not (msg := _failures(aot, lambda r: [p for p in problems(r) if p.startswith("global loads")])), msg


@pytest.mark.slow
def test_planted_spill_is_caught(aot):
    report = aot["toys"]["toy_spill"]
    assert not report.get("error"), report
    found = problems(report)
    assert any(p.startswith("spills") for p in found), (report, found)
    assert report["stack"] > 0 and any(k.startswith("STL") for k in report["accesses"]), report


@pytest.mark.slow
def test_kernel_that_does_not_compile_is_caught(aot):
    found = problems(aot["toys"]["toy_bad_tile"])
    assert len(found) == 1 and "does not compile" in found[0] and "power of 2" in found[0], found


def test_fake_shapes_match_the_launchers(monkeypatch):
    """The register_fake of each backward sizes its partial sums from the same launch config as the launcher (on
    a GPU: torch.compile traces the fake, then runs the launcher)."""
    from repa_fast.kernels import adaln, rope

    monkeypatch.setattr(adaln, "_adaln_bwd_kernel", _Recorder(None, [], [""]))
    monkeypatch.setattr(rope, "_norm_rope_bwd_kernel", _Recorder(None, [], [""]))
    for B, N, D in ((32, 256, 1152), (64, 290, 256), (3, 9, 384)):  # (64, 290, 256): fwd and bwd chunk counts differ
        h, dy, mods = _m(B, N, D), _m(B, N, D), _m(B, 2 * D).chunk(2, dim=1)
        part = adaln.adaln_bwd(dy, None, h, None, None, mods[0], None, 1e-6, False, torch.bfloat16)[2]
        assert part.shape[2] == adaln._num_chunks(N, D, h.device, B * N), (B, N, D)
        q = _m(B, N, 3, D // 64, 64).unbind(2)[0]
        part = rope.norm_rope_bwd(_m(B, N, D // 64, 64), q, None, None, None, 1e-5, 1, torch.bfloat16)[1]
        assert part.shape[1] == rope._num_progs(B * N * (D // 64), 64, q.device), (B, N, D)


def test_occupancy_model():
    """The occupancy arithmetic against the CUDA occupancy calculator's sm_90 numbers."""
    assert resident_warps(regs=32, smem=0, num_warps=4) == 64  # 2048 threads: the warp limit
    assert resident_warps(regs=128, smem=0, num_warps=4) == 16  # 65536 / (128 * 128) = 4 blocks
    assert resident_warps(regs=129, smem=0, num_warps=4) == 12  # 136 per thread after rounding: 3 blocks
    assert resident_warps(regs=32, smem=100 * 1024, num_warps=8) == 16  # 2 blocks of 101 KB
    assert resident_warps(regs=255, smem=0, num_warps=1) == 8


if __name__ == "__main__":
    worker(*sys.argv[1:3])
