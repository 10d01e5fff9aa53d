"""Part 2, kernel micro-benchmarks at SiT-XL/2 shapes (batch 32 and 256, 256 tokens, D 1152; the loss at z-dim 768).

Per op: ``ref`` eager, ``compile(ref)``, ``triton`` at each tile configuration of a small sweep (launch config
overridden), modes fwd and fwd+bwd; ``triton.testing.do_bench`` medians with ``grad_to_none`` (the inputs' gradients
reset between runs, so accumulation is not timed; it flushes L2 before each run); GB/s from the analytic bytes
(bench/traffic.py) as a fraction of the copy bandwidth when the env part measured one. Each triton configuration
also records its largest difference to ``ref`` (forward output) on the same inputs: parity of the compiled kernels,
never through the Triton interpreter on the device (core.subprocess_env, and driver.main refuses it).
One JSON line per (op, batch, provider, mode).
"""

from __future__ import annotations

import time

import torch

from .core import Check, bench_ms, md_table

OPS = ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "rope_2d", "alignment_loss")


def _sweep(op: str):
    """(module, [(name, launch-config override or None)]) of an op: the default config, then fixed tiles."""
    from repa_fast.kernels import _dispatch, adaln, align_loss, rope

    def tiles(mod, tile_counts):
        orig = mod._launch_config

        def fixed(rows, warps):
            if mod is align_loss:
                return lambda n_rows, D, dev: (rows, orig(n_rows, D, dev)[1], warps)
            if mod is rope:

                def cfg(n_rows, Dh, dev):
                    _, bd, per_prog, _ = orig(n_rows, Dh, dev)
                    return rows, bd, _dispatch.cdiv(per_prog, rows) * rows, warps

                return cfg

            def cfg(n_rows, n_tok, D, dev, backward=False):
                _, bd, per_chunk, _ = orig(n_rows, n_tok, D, dev, backward)
                return rows, bd, _dispatch.cdiv(per_chunk, rows) * rows, warps

            return cfg

        return mod, [("default", None)] + [(f"rows{r}_w{w}", fixed(r, w)) for r, w in tile_counts]

    if op in ("adaln_modulate", "gated_residual_adaln"):
        return tiles(adaln, [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8)])
    if op == "alignment_loss":
        return tiles(align_loss, [(2, 4), (4, 4), (4, 8), (8, 8), (16, 8)])
    return tiles(rope, [(8, 4), (16, 4), (32, 4), (16, 8), (32, 8)])


def _real_inputs(meta_inputs, device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for m in meta_inputs:
        t = torch.randn(m.shape, generator=gen, device=device, dtype=torch.float32).to(m.dtype)
        out.append(t.requires_grad_(m.requires_grad))
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _parity(ref, fn, inputs) -> float:
    with torch.no_grad():
        a, b = _first(ref(*inputs)), _first(fn(*inputs))
    return (a.double() - b.double()).abs().max().item()


def _measure(check: Check, row: dict, fn, ref, inputs, nbytes, kind: str) -> list[dict]:
    from _common import _timed_fn

    rows = []
    grads = [t for t in inputs if t.requires_grad]
    err = _parity(ref, fn, inputs) if row["provider"].startswith("triton") else ""
    for mode in ("fwd", "full"):
        p50, p20, p80 = bench_ms(check, _timed_fn(fn, inputs, mode), grad_to_none=grads)
        b = getattr(nbytes[kind], mode)
        gbps = b / (p50 * 1e-3) / 1e9
        copy = check.keep.get("copy_gbps")
        rows.append(
            check.record(
                "kernel",
                **row,
                mode=mode,
                ms_p50=round(p50, 4),
                ms_p20=round(p20, 4),
                ms_p80=round(p80, 4),
                bytes=b,
                GB_per_s=round(gbps, 1),
                frac_copy_bw=round(gbps / copy, 3) if copy else "",
                max_abs_err_vs_ref=err,
            )
        )
    return rows


def part_kernels(check: Check) -> str:
    import traffic

    hidden, heads = (1152, 16) if not check.smoke else (64, 2)
    batches = (32, 256) if not check.smoke else (1,)
    dtype = torch.bfloat16 if check.cuda else torch.float32
    torch._functorch.config.donated_buffer = False  # the bwd replay of _timed_fn retains the graph
    rows, errors = [], 0
    jobs = []
    for op in OPS:
        mod, sweep = _sweep(op)
        if check.smoke:  # the interpreter's cost is per program: the default and the largest fixed tile only
            sweep = [sweep[0], sweep[-1]]
        jobs += [(op, batch, mod, sweep) for batch in batches]
    for i, (op, batch, mod, sweep) in enumerate(jobs):
        if check.expired():
            check.deadline_hit("kernel micro-benchmarks", [f"{o} batch {b}" for o, b, _, _ in jobs[i:]])
            break
        ref, fused, meta = traffic.CASES[op](batch, hidden, heads, dtype)
        nbytes = {p: traffic.measure(f, meta) for p, f in (("ref", ref), ("fused", fused))}
        inputs = _real_inputs(meta, check.device, seed=batch)
        providers = [("ref", ref, None, "ref"), ("compile(ref)", None, None, "ref")]
        providers += [(f"triton:{name}", fused, cfg, "fused") for name, cfg in sweep]
        for provider, fn, cfg, kind in providers:
            row = {"op": op, "batch": batch, "D": hidden, "dtype": str(dtype)[6:], "provider": provider}
            saved = mod._launch_config
            try:
                if cfg is not None:
                    mod._launch_config = cfg
                if provider == "compile(ref)":
                    fn = torch.compile(ref, backend="inductor" if check.cuda else "aot_eager", dynamic=False)
                    t0 = time.perf_counter()
                    fn(*inputs)
                    check.sync()
                    row["compile_s"] = round(time.perf_counter() - t0, 2)
                rows += _measure(check, row, fn, ref, inputs, nbytes, kind)
            except Exception as e:  # one provider failing (compile error, OOM) must not hide the others
                errors += 1
                check.record("kernel", **row, mode="error", error=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                mod._launch_config = saved
                for t in inputs:
                    t.grad = None
    check.sections.append(
        "## 2. Kernel micro-benchmarks (results.jsonl, kind kernel)\n\n'bytes': analytic (compile(ref) charged the "
        "unfused bytes, an upper bound).\n\n" + md_table(_best_per_op(rows))
    )
    if errors:
        raise RuntimeError(f"{errors} kernel providers failed (results.jsonl)")
    return f"{len(rows)} timings; fastest triton tile per op in report.md"


def _best_per_op(rows: list[dict]) -> list[dict]:
    """Per (op, batch, mode): ref, compile(ref) and the fastest triton configuration."""
    out = {}
    for r in rows:
        key = (r["op"], r["batch"], r["mode"])
        slot = out.setdefault(key, {"op": r["op"], "batch": r["batch"], "mode": r["mode"]})
        if r["provider"].startswith("triton:"):
            if "triton_ms" not in slot or r["ms_p50"] < slot["triton_ms"]:
                slot |= {"triton_ms": r["ms_p50"], "best_tile": r["provider"][7:], "err": r["max_abs_err_vs_ref"]}
        else:
            slot[f"{r['provider']}_ms"] = r["ms_p50"]
    return list(out.values())
