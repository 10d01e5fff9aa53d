"""Part 1, the headline: whole training steps, measured first so that a call cut short still has them.

SiT-XL/2 + DINOv2-B (random weights), 256 px, bf16, synthetic data, per-GPU batch 32 (``--headline-batch``), one
process. Providers (``PROVIDERS``), all built from bench/throughput.py's steps, i.e. from repa_fast.build as the
trainer builds them:
  reference eager        the reference train.py step structure (throughput.ReferenceStep), --kernels ref
  reference compiled     the same with each SiT block compiled
  ours impl=ref          repa_fast's step, --kernels ref, each block compiled (--compile)
  ours triton            repa_fast's step, --kernels triton, --compile
  ours + cuDNN attention --kernels triton --attn-backend cudnn_attention --compile (skipped where cuDNN cannot run)
  ours + fp8             --kernels triton --fp8 tensorwise --compile (skipped below sm_89)
All are built (first step: compilation, timed apart; in ``BUILD_ORDER``, stopping early enough to time the ones
built) before any is timed; then ``--headline-steps`` (>= 20 on the device) steps each, timed one by one with a
synchronisation, in rounds of 5 that rotate the order (providers interleaved, so clock and thermal drift hit them
alike). One JSON line per round and per provider at the end; a
deadline stops the rounds and the providers keep the steps they have (``n_steps``, ``partial``).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .core import Check

PROVIDERS = (
    "reference eager",
    "reference compiled",
    "ours impl=ref",
    "ours triton",
    "ours + cuDNN attention",
    "ours + fp8",
)
# Built in this order, so that a short budget keeps the baseline and the headline number first.
BUILD_ORDER = (
    "reference eager",
    "ours triton",
    "reference compiled",
    "ours + cuDNN attention",
    "ours + fp8",
    "ours impl=ref",
)
OURS = {  # provider: (--kernels, model options)
    "ours impl=ref": ("ref", {}),
    "ours triton": ("triton", {}),
    "ours + cuDNN attention": ("triton", {"attn_backend": "cudnn_attention"}),
    "ours + fp8": ("triton", {"fp8": "tensorwise"}),
}


def step_args(check: Check, batch: int):
    import throughput

    if check.smoke:
        argv = ["--model", "SiT-T/2", "--enc-type", "dinov2-vit-t", "--resolution", "32", "--encoder-depth", "2"]
        argv += ["--mixed-precision", "no", "--warmup", "1"]
    else:
        argv = ["--model", "SiT-XL/2", "--enc-type", "dinov2-vit-b", "--resolution", "256", "--encoder-depth", "8"]
        argv += ["--mixed-precision", "bf16", "--warmup", "3"]
    return throughput.parse_args([*argv, "--batch-size", str(batch), "--compile"])


class OursStep:
    """throughput.RepaFastStep's step with the speed options of ``OURS`` set on the config before the build."""

    def __init__(self, args, device, kernels: str, options: dict, compile_backend: str):
        import throughput

        from repa_fast import build as B
        from repa_fast.data import ResumableDistributedSampler
        from repa_fast.engine import trainer as T
        from repa_fast.engine.metrics import LossMeter
        from repa_fast.engine.parallel import Backend
        from repa_fast.recipe import build_recipe

        self.cfg = throughput.make_cfg(args, kernels)
        self.cfg.model.compile, self.cfg.model.compile_backend = args.compile, compile_backend
        for key, value in options.items():
            setattr(self.cfg.model, key, value)
        model, self.encoders = throughput.models_from_config(self.cfg, device)
        self.backend = Backend(device.type)
        recipe = build_recipe(self.cfg)
        fixed = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
        train_model, opt, ema = B.build_phase(self.cfg, self.backend, model, recipe.phase(0), fixed)
        sampler = ResumableDistributedSampler(args.batch_size, args.batch_size)
        self.state = T.State(model, train_model, ema, opt, None, sampler, recipe=recipe, fixed=fixed)
        self.state.phase = recipe.phase(0)
        self.meter, self.amp, self._T = LossMeter(device), B.AMP_DTYPES[args.mixed_precision], T

    def __call__(self, batch):
        T = self._T
        losses = T.micro_step(self.cfg, self.state, self.backend, batch, self.encoders, self.amp, last=True)
        self.meter.add_losses(losses)
        T.optimizer_step(self.cfg, self.state, self.backend, self.meter)


def unavailable(check: Check, name: str, args) -> str:
    """Why ``name`` cannot run on this machine ("" if it can)."""
    from repa_fast.cost.shapes import sit_shape

    if name == "ours + cuDNN attention":
        from repa_fast.kernels.attention import select_backend

        dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        probe = torch.empty(1, 16, 1, sit_shape(args.model).head_dim, device=check.device, dtype=dtype)
        try:
            select_backend(probe, "cudnn_attention")
        except RuntimeError as e:
            return str(e)
    if name == "ours + fp8":
        from repa_fast.engine.fp8 import fp8_supported

        if not fp8_supported(check.device):
            return f"fp8 needs an sm_89+ GPU and torchao; this is {check.device}"
    return ""


def build(check: Check, name: str, args):
    import throughput

    if name.startswith("reference"):
        step = throughput.ReferenceStep(args, check.device)
        if name == "reference compiled":
            for block in step.model.blocks:
                block.compile(backend=check.compile_backend, dynamic=False)
        return step
    kernels, options = OURS[name]
    return OursStep(args, check.device, kernels, options, check.compile_backend)


def _time_steps(check: Check, step, data, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(data)
        check.sync()
        out.append(time.perf_counter() - t0)
    return out


def _build_all(check: Check, args, data, steps: int) -> dict:
    """Build the providers in ``BUILD_ORDER`` (compile and warm-up included), keeping the time that timing the built
    ones will take (their warm step time x ``steps``, + 30%) plus the longest build so far for the next build."""
    built, step_s, longest = {}, {}, 0.0
    for i, name in enumerate(BUILD_ORDER):
        need = 1.3 * steps * sum(step_s.values()) + longest
        if check.expired() or (built and check.left() < need):
            check.deadline_hit(f"building the providers (keeping {need:.0f} s to time the built ones)", BUILD_ORDER[i:])
            break
        why = unavailable(check, name, args)
        if why:
            check.record("headline", provider=name, status="skipped", why=why)
            continue
        base = torch.cuda.memory_allocated() if check.cuda else 0
        if check.cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            step = build(check, name, args)
            first = _time_steps(check, step, data, 1)[0]
            build_s = time.perf_counter() - t0
            warm = _time_steps(check, step, data, max(1, args.warmup - 1))
        except Exception as e:  # an OOM or a compile error of one provider must not hide the others
            step = None
            check.record("headline", provider=name, status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
            if check.cuda:
                torch.cuda.empty_cache()
            continue
        mem = {}
        if check.cuda:
            mem = {
                "kept_gib": round((torch.cuda.memory_allocated() - base) / 2**30, 2),
                "step_peak_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
            }
        built[name], step_s[name], longest = step, statistics.median(warm), max(longest, build_s)
        check.record("headline_build", provider=name, build_s=round(build_s, 1), first_step_s=round(first, 1), **mem)
    return {name: built[name] for name in PROVIDERS if name in built}  # timed in the table's order


def part_headline(check: Check, batch: int, steps: int) -> str:
    import throughput

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    args = step_args(check, batch)
    torch.manual_seed(0)
    data = throughput.synthetic_batch(args, check.device)
    built = _build_all(check, args, data, steps)
    per_round = min(5, max(1, steps // 2))  # at least two rounds: the order rotates between them
    times: dict[str, list] = {name: [] for name in built}
    names = list(built)
    for r in range(math.ceil(steps / per_round)):
        order = names[r % max(1, len(names)) :] + names[: r % max(1, len(names))]
        for name in order:
            if check.expired():
                check.deadline_hit(f"timing round {r}", [name])
                break
            try:
                ts = _time_steps(check, built[name], data, per_round)
            except Exception as e:
                check.record("headline", provider=name, status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
                names.remove(name)
                continue
            times[name] += ts
            check.record("headline_round", provider=name, round=r, steps=len(ts), ms=[round(t * 1e3, 2) for t in ts])
        else:
            continue
        break
    rows = _summarise(check, args, times, steps)
    if "ours triton" in built:
        check.keep["profile_step"], check.keep["profile_data"] = built["ours triton"], data
    for name in [n for n in built if n != "ours triton"]:
        del built[name]
    head = next((r for r in rows if r["provider"] == "ours triton"), rows[0] if rows else None)
    check.sections.append("## 1. Headline: whole step (results.jsonl, kind headline)\n\n" + _table(rows))
    if not rows:
        if check.part in check.hits:
            return "the deadline came before any timed step (the builds finished are in results.jsonl)"
        raise RuntimeError("no provider finished a timed step")
    return f"{head['provider']}: {head['img_per_s']} img/s at batch {batch} ({head['n_steps']} steps)"


def _summarise(check: Check, args, times: dict, steps: int) -> list[dict]:
    import throughput

    flops = throughput.step_flops_per_image(args) * args.batch_size
    peak = throughput.device_peak(check.device)
    rows = []
    for name, ts in times.items():
        if not ts:
            continue
        ts = sorted(ts)
        sec = statistics.median(ts)
        tflops = flops / sec / 1e12
        rows.append(
            check.record(
                "headline",
                provider=name,
                status="ok",
                model=args.model,
                encoder=args.enc_type,
                batch=args.batch_size,
                n_steps=len(ts),
                partial=len(ts) < steps,
                ms_per_step=round(sec * 1e3, 2),
                ms_p20=round(ts[int(0.2 * (len(ts) - 1))] * 1e3, 2),
                ms_p80=round(ts[int(0.8 * (len(ts) - 1))] * 1e3, 2),
                img_per_s=round(args.batch_size / sec, 1),
                tflops=round(tflops, 1),
                mfu=round(tflops / peak, 3) if peak else "",
            )
        )
    ref = next((r for r in rows if r["provider"] == "reference eager"), None)
    predicted = _predicted(check, args)
    for r in rows:
        r["x_reference"] = round(r["img_per_s"] / ref["img_per_s"], 2) if ref else ""
        r["predicted_img_s"] = predicted.get(r["provider"], {}).get("predicted_img_s", "")
    return rows


def _predicted(check: Check, args) -> dict:
    """The cost model's img/s per provider (predicted.py), each recorded as its own line (kind headline_predicted)."""
    from repa_fast.cost.shapes import sit_shape
    from repa_fast.kernels.attention import select_backend

    from .predicted import predictions

    name = torch.cuda.get_device_name(check.device) if check.cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    probe = torch.empty(1, 16, 1, sit_shape(args.model).head_dim, device=check.device, dtype=dtype)
    attn = select_backend(probe, "auto")
    out = predictions(name, args.model, args.enc_type, args.resolution, args.batch_size, args.mixed_precision, attn)
    for provider, row in out.items():
        check.record("headline_predicted", provider=provider, auto_attention=attn, **row)
    return out


def _table(rows: list[dict]) -> str:
    from .core import md_table

    keys = ("provider", "batch", "n_steps", "ms_per_step", "ms_p20", "ms_p80", "img_per_s", "tflops", "mfu")
    keys += ("x_reference", "predicted_img_s")  # the last column is the cost model's, not a measurement
    return md_table([{k: r.get(k, "") for k in keys} for r in rows])
