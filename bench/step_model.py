"""The whole-step cost model as a table: predicted img/s of the reference step, of ours, and of each cut.

    python bench/step_model.py --model SiT-XL/2 --enc-type dinov2-vit-b --gpu h100             # text table
    python bench/step_model.py --model SiT-XL/2 --enc-type dinov2-vit-b --gpu h100 --json      # {"rows": [...]}
    python bench/step_model.py --model SiT-XL/2 --enc-type dinov2-vit-b --gpu h100 --markdown  # the results file

Every number is a prediction of repa_fast.cost (datasheet peaks, the efficiencies given as flags, bytes and FLOPs
counted op by op and cross-checked on CPU by tests/test_cost_crosscheck.py); nothing here is measured. Rows: the
reference's step structure ("reference"), ours before issue 18, then issue 18's cuts applied cumulatively up to ours
as built ("ours (as built)"), then what goes beyond them, then alternatives. Without ``--batch`` each row runs at
the largest per-GPU batch predicted to fit the card. Model flags (--reg, --projection-layer-type) change what is
trained in every row; structure flags (--impl, --attn-backend, --targets, --fp8, --parallel, --act-ckpt, --amp)
add one "custom" row: ours as built with those changes.
"""

import argparse
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repa_fast.cost.attention import padding_factor  # noqa: E402
from repa_fast.cost.hardware import DEFAULT_ATTN_EFF, GPUS, Efficiency, card  # noqa: E402
from repa_fast.cost.memory import max_batch  # noqa: E402
from repa_fast.cost.shapes import Config  # noqa: E402
from repa_fast.cost.step import predict  # noqa: E402
from repa_fast.cost.structure import AS_BUILT, ATTN_BACKENDS, PARALLEL, REFERENCE, alternatives, cuts  # noqa: E402

TARGET_IMG_S = 600.0  # issue 18: SiT-XL/2 + DINOv2-B, 256 px, per H100
PART_COLUMNS = [  # (heading, parts summed)
    ("GEMM", ("gemm",)),
    ("attn", ("attention",)),
    ("elem", ("elementwise",)),
    ("enc", ("encoder",)),
    ("casts", ("weight_cast",)),
    ("opt+clip+EMA", ("optimizer", "clip", "ema")),
    ("comm", ("comm",)),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-XL/2")
    p.add_argument("--enc-type", default="dinov2-vit-b", help="comma-separated target encoders")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--encoder-depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the largest predicted to fit)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (data parallel)")
    p.add_argument("--reg", action="store_true", help="REG's class token: 1 + T tokens (docs/methods.md)")
    p.add_argument("--projection-layer-type", default="mlp", choices=("mlp", "linear", "conv"), help="iREPA")
    p.add_argument("--proj-kernel-size", type=int, default=3, help="iREPA's conv projector kernel")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help='print {"rows": [...]}')
    out.add_argument("--markdown", action="store_true", help="print the bench/results report")
    e = Efficiency()
    g = p.add_argument_group("assumed efficiencies (printed with every table)")
    g.add_argument("--matmul-eff", type=float, default=e.matmul, help="fraction of the dense BF16 peak, GEMMs")
    g.add_argument("--fp8-eff", type=float, default=e.fp8_matmul, help="fraction of the FP8 peak, tensorwise GEMMs")
    g.add_argument("--fp8-rowwise-eff", type=float, default=e.fp8_rowwise, help="fraction of the FP8 peak, rowwise")
    g.add_argument("--bw-eff", type=float, default=e.bandwidth, help="fraction of HBM bandwidth, memory-bound kernels")
    g.add_argument("--attn-eff", default="", help=f"backend=fraction,... (defaults {DEFAULT_ATTN_EFF})")
    g.add_argument("--kernel-us", type=float, default=e.kernel_us, help="GPU time lost per kernel launch")
    g.add_argument("--host-us", type=float, default=e.host_us, help="host time per eager op")
    g.add_argument("--sync-us", type=float, default=e.sync_us, help="GPU idle per device->host sync")
    g.add_argument("--nvlink-eff", type=float, default=e.nvlink, help="fraction of one NVLink direction")
    g.add_argument("--comm-overlap", type=float, default=e.comm_overlap, help="fraction of communication hidden")
    g.add_argument("--reserved-gb", type=float, default=e.reserved_gb, help="memory not available to tensors")
    g.add_argument("--fragmentation", type=float, default=e.fragmentation, help="allocator overhead fraction")
    s = p.add_argument_group("a custom row: ours as built with these changes")
    s.add_argument("--amp", choices=("bf16", "fp16", "no"))
    s.add_argument("--impl", choices=("triton", "ref"))
    s.add_argument("--attn-backend", choices=ATTN_BACKENDS)
    s.add_argument("--targets", choices=("computed", "cached"))
    s.add_argument("--fp8", choices=("none", "tensorwise", "rowwise"))
    s.add_argument("--parallel", choices=PARALLEL, help="none, ddp, zero1, zero2 (ZeRO stages) or fsdp")
    s.add_argument("--act-ckpt", help="none, full, mlp or every:K (engine/activation_checkpoint.py)")
    return p.parse_args(argv)


def efficiency(args) -> Efficiency:
    attn = dict(DEFAULT_ATTN_EFF)
    for item in filter(None, args.attn_eff.split(",")):
        name, _, value = item.partition("=")
        if name not in attn:
            raise SystemExit(f"--attn-eff: unknown backend {name!r}; choose from {sorted(attn)}")
        attn[name] = float(value)
    return Efficiency(
        args.matmul_eff,
        args.fp8_eff,
        args.fp8_rowwise_eff,
        args.bw_eff,
        attn,
        args.kernel_us,
        args.host_us,
        args.sync_us,
        args.nvlink_eff,
        args.comm_overlap,
        args.reserved_gb,
        args.fragmentation,
    )


def structures(args) -> list:
    """The rows: reference, ours and the cuts (cumulative), alternatives, and the custom row if asked for."""
    world = args.world_size
    ref = replace(REFERENCE, parallel="ddp" if world > 1 else "none")
    rows = cuts(world)
    rows = [ref, *rows, *alternatives(rows)]
    custom = {k: getattr(args, k) for k in ("amp", "impl", "attn_backend", "targets", "fp8", "parallel", "act_ckpt")}
    custom = {k: v for k, v in custom.items() if v is not None}
    if custom:
        label = ", ".join(f"{k}={v}" for k, v in custom.items())
        try:
            rows.append(replace(AS_BUILT, name=f"custom: {label}", note="ours as built with these changes", **custom))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return rows


def predict_rows(args, eff: Efficiency) -> list[dict]:
    gpu = card(args.gpu)
    base = config(args, args.batch or 1)
    out = []
    for st in structures(args):
        if st.fp8 != "none" and not gpu.fp8_tflops:
            if st.name.startswith("custom:"):
                raise SystemExit(f"--fp8 {st.fp8}: {gpu.name} has no FP8 tensor cores (sm_89+ needed)")
            continue  # FP8 rows are left out on cards without FP8 (constants_lines says so)
        batch = args.batch or max_batch(base, st, gpu, eff)
        if batch < 1:
            raise SystemExit(f"{st.name}: not even batch 1 is predicted to fit {gpu.name}")
        out.append(predict(replace(base, batch=batch), st, gpu, eff))
    ref = out[0]["predicted_img_s"]
    for r in out:
        r["x_reference"] = r["predicted_img_s"] / ref
    return out


def config(args, batch: int) -> Config:
    encs = tuple(e.strip() for e in args.enc_type.split(","))
    return Config(
        args.model,
        encs,
        args.resolution,
        batch,
        args.world_size,
        args.encoder_depth,
        reg=args.reg,
        projection_layer_type=args.projection_layer_type,
        proj_kernel_size=args.proj_kernel_size,
    )


def part_ms(row: dict, parts) -> float:
    return sum(row["predicted_ms_per_img_by_part"].get(p, 0.0) for p in parts)


def table_lines(rows: list[dict], sep: str = "  ") -> list[str]:
    head = ["row", "batch", "predicted img/s", "x ref", "predicted MFU", "GFLOP/img", "GB/img"]
    head += [f"predicted ms/img {h}" for h, _ in PART_COLUMNS] + ["predicted GB/GPU", "launches/step"]
    body = []
    for r in rows:
        cells = [r["name"], str(r["batch"]), f"{r['predicted_img_s']:.0f}", f"{r['x_reference']:.2f}"]
        cells += [f"{100 * r['predicted_mfu']:.1f}%", f"{r['flops_per_img'] / 1e9:.0f}"]
        cells += [f"{r['hbm_bytes_per_img'] / 1e9:.2f}"] + [f"{part_ms(r, ps):.3f}" for _, ps in PART_COLUMNS]
        fits = "" if r["fits"] else " (does not fit)"
        cells += [f"{r['predicted_memory_gb']:.1f}{fits}", f"{r['launches_per_step']:.0f}"]
        body.append(cells)
    if sep == "|":
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: sep.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(head), *map(fmt, body)]


def constants_lines(args, eff: Efficiency) -> list[str]:
    gpu = card(args.gpu)
    attn = ", ".join(f"{k} {v:.2f}" for k, v in eff.attention.items())
    return [
        f"Card: {gpu.name}: BF16 {gpu.bf16_tflops} TFLOP/s dense, FP8 {gpu.fp8_tflops or 'none'} TFLOP/s dense, "
        f"HBM {gpu.hbm_tb_s} TB/s, {gpu.memory_gb:.0f} GB, NVLink {gpu.nvlink_gb_s:.0f} GB/s (source: {gpu.source}).",
        f"Assumed efficiencies (flags): matmul {eff.matmul:.2f} of BF16 peak, fp8 {eff.fp8_matmul:.2f} "
        f"(rowwise {eff.fp8_rowwise:.2f}) of FP8 peak, memory-bound kernels {eff.bandwidth:.2f} of HBM, "
        f"attention {attn} of BF16 peak (on the padded FLOPs), {eff.kernel_us} us per launch, {eff.host_us} us host "
        f"per eager op, {eff.sync_us} us per host sync, NVLink {eff.nvlink:.2f}, comm overlap {eff.comm_overlap:.2f}, "
        f"{eff.reserved_gb} GB reserved + {100 * eff.fragmentation:.0f}% allocator overhead.",
        f"Model: {args.model}{' (REG)' if args.reg else ''} + {args.enc_type}, projector {args.projection_layer_type}, "
        f"{args.resolution} px, {args.world_size} GPU(s); per-GPU batch "
        + (str(args.batch) if args.batch else "= the largest predicted to fit (per row)")
        + ".",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    eff = efficiency(args)
    rows = predict_rows(args, eff)
    if args.json:
        print(json.dumps({"rows": rows}, indent=1, default=float))
    elif args.markdown:
        from bench.step_model_report import markdown  # noqa: PLC0415

        print(markdown(args, eff, rows, argv if argv is not None else sys.argv[1:]))
    else:
        print("\n".join(constants_lines(args, eff)))
        print("Every time, rate and memory column is PREDICTED by repa_fast.cost (nothing measured).")
        print("\n".join(table_lines(rows)))
    return 0


def attention_rows(args, eff: Efficiency, batch: int) -> list[tuple]:
    """(backend, padding factor fwd, bwd, predicted attention ms/img) for the SiT at ``batch``: issue 18 item 2e."""
    gpu = card(args.gpu)
    cfg = config(args, batch)
    sh = cfg.shape()
    out = []
    for backend in ("flash2", "sdpa-flash", "flash3", "cudnn"):
        r = predict(cfg, replace(AS_BUILT, attn_backend=backend), gpu, eff)
        fwd, bwd = (padding_factor(backend, sh.head_dim, sh.seq, b) for b in (False, True))
        out.append((backend, fwd, bwd, r["predicted_ms_per_img_by_part"]["attention"]))
    return out


if __name__ == "__main__":
    sys.exit(main())
