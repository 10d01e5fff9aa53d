"""The once-per-step work over the parameters: gradient clipping, the optimizer, the EMA, gradient communication.

These costs do not grow with the batch (``repa_fast.cost.step`` amortises them over it). Op by op, for P trainable
fp32 elements in n tensors:
- clipping, ``torch.nn.utils.clip_grad_norm_(foreach=True)`` (``clip="separate"``: the reference through accelerate,
  and our code before cut 2c): ``_foreach_norm`` (reads 4P), the norms stacked and reduced, the clip coefficient (4
  scalar ops), ``_foreach_mul_`` (reads and writes 4P): 12 B/element. ``clip="in_step"`` (cut 2c,
  engine/parallel/base.py ``clip_and_step``): the same norm (``get_total_norm``), the divisor
  ``clamp((norm + 1e-6) / max_norm, min=1)`` (3 scalar ops) passed to the fused step as its ``grad_scale``, which
  makes the kernel store the scaled gradient back (pytorch aten/src/ATen/native/cuda/fused_adam_utils.cuh:
  ``if (i != kGradIdx || grad_scale_ptr) store``): 4P read + 4P written instead of 4P read + 8P moved.
  ``clip="norm_only"`` (--max-grad-norm 0): the norm is still computed, it is the non-finite check, and the step
  gets no ``grad_scale`` (no write-back).
- torch's fused AdamW (``fused=True``): one kernel reading p, g, m, v and writing p, m, v (28 B/element), plus the
  step counters (``_foreach_add_``, and ``_foreach_sub_`` by ``found_inf`` undoing it on a skipped step) and our
  device-side skip test (``~isfinite(norm)``: abs, ne, eq, mul, not; ``found_inf = skipped.float()``).
- the reference's foreach AdamW (torch.optim.adam ``_multi_tensor_adam``, weight decay 0): lerp_ m, mul_ v, addcmul_
  v, sqrt, div_, add_ eps, addcdiv_ p: 7 passes, 72 B/element; its step counters live on the host (a host op and two
  ``.item()`` per tensor for the bias corrections). Before it, GradScaler's unscale
  (``_amp_foreach_non_finite_check_and_unscale_``: 8 B/element) and a host read of found_inf.
- EMA with the device-side skip: ``foreach3`` (before cut 2b; today's CPU reference ``ema_update_ref``): the 0-dim
  weight, then per 64 tensors ``_foreach_sub`` (reads p and e, writes the difference), ``_foreach_mul_``,
  ``_foreach_add_``: 32 B/element; ``one_pass`` (cut 2b, kernels/ema_update.py, the path CUDA takes): one op that
  reads p, e and the 1-byte skip flag and writes e, 12 B/element; the reference's loop (train.py:81-91): ``mul_``
  then ``add_`` per tensor, 20 B/element, frozen ``pos_embed`` included.
- communication per rank over W ranks (an ``Op`` with rate "link" whose ``read`` is the bytes sent; ring
  collectives move (W-1)/W of the payload each way): DDP all-reduces the fp32
  gradients (2x) and copies them into and out of its buckets; ZeRO-1/2 reduce-scatter the gradients and all-gather
  the updated fp32 weights (2x); FSDP2 without a mixed-precision policy all-gathers fp32 weights in the forward and
  again in the backward and reduce-scatters the gradients (3x).
Sharding (ZeRO-1/2, FSDP2; ``shard_ema`` for the EMA) divides the optimizer and EMA passes by W; ZeRO-2 and FSDP2
also divide the clipping norm.
"""

import math

from repa_fast.cost.ops import Op, ew
from repa_fast.cost.structure import StepStructure

EMA_CHUNK = 64  # engine/ema.py _CHUNK: tensors per multi-tensor launch with a device-side skip flag


def _p(name, part, read, write, launches=1.0):
    return Op(part, name, read, write, launches, stage="step")


def clip_ops(st: StepStructure, P: float, n: int, world: int) -> list[Op]:
    if st.clip == "off":
        return []
    shard = world if st.parallel in ("zero2", "fsdp") else 1
    Ps = P / shard
    ops = [_p("clip.norms", "clip", 4 * Ps, 4 * n), _p("clip.stack", "clip", 4 * n, 4 * n)]
    ops += [_p("clip.total", "clip", 4 * n, 4)]
    if st.clip == "separate":
        ops += [_p(f"clip.coef{i}", "clip", 4, 4) for i in range(4)] + [_p("clip.scale", "clip", 4 * Ps + 4, 4 * Ps)]
    elif st.clip == "in_step":  # grad_scale = clamp((norm + 1e-6) / max_norm, min=1): add, div, clamp
        ops += [_p(f"clip.divisor{i}", "clip", 4, 4) for i in range(3)]
    return ops


def optimizer_ops(st: StepStructure, P: float, n: int, world: int) -> list[Op]:
    Ps = P / (world if st.shards_optimizer else 1)
    ops = []
    if st.grad_scaler:
        ops.append(_p("scaler.unscale", "optimizer", 4 * Ps + 8, 4 * Ps + 4))
        ops += [_p("scaler.found_inf", "optimizer", 0, 4), _p("scaler.inv_scale", "optimizer", 4, 4)]
        ops.append(_p("scaler.update", "optimizer", 12, 8))
    if st.optimizer == "foreach":
        names = ("lerp_m", "mul_v", "addcmul_v", "sqrt", "div", "add_eps", "addcdiv_p")
        reads, writes = (8, 4, 8, 4, 4, 4, 12), (4, 4, 4, 4, 4, 4, 4)
        ops += [_p(f"adamw.{m}", "optimizer", r * Ps, w * Ps) for m, r, w in zip(names, reads, writes)]
        return ops + [Op("host", "adamw.steps_and_bias_corrections", launches=1 + 2 * n, stage="step")]
    ops += _skip_test(st)
    scaled = st.clip == "in_step"  # a grad_scale input: the kernel reads it and stores the scaled gradients back
    copies = 2 * Ps if st.weights == "bf16_copy" else 0.0  # a step that also writes the bf16 weights (not torch's)
    ops += [_p("adamw.steps", "optimizer", 4 * n, 4 * n)]
    read = 16 * Ps + 4 * n + 4 + (4 if scaled else 0)  # p, g, m, v, the step counters, found_inf (and grad_scale)
    ops.append(_p("adamw.fused", "optimizer", read, 12 * Ps + (4 * Ps if scaled else 0.0) + copies))
    return ops + [_p("adamw.steps_undo", "optimizer", 4 * n + 4, 4 * n)]


def _skip_test(st: StepStructure) -> list[Op]:
    """skipped = ~isfinite(norm) (abs, ne, eq, mul; not), found_inf = skipped.float(): engine/parallel/base.py. The
    older code (clip="separate") tested the norm clip_grad_norm_ returned, the same ops."""
    if st.clip == "off":
        return []
    rw = ((4, 4), (4, 1), (4, 1), (2, 1), (1, 1), (1, 4))
    return [
        _p(f"skip.{name}", "optimizer", r, w) for name, (r, w) in zip(("abs", "ne", "eq", "mul", "not", "float"), rw)
    ]


def ema_ops(st: StepStructure, P: float, n: int, frozen: float, world: int) -> list[Op]:
    shard = world if (st.shard_ema or st.parallel == "fsdp") else 1
    Ps = P / shard
    if st.ema == "per_param":
        m = n + (1 if st.ema_frozen else 0)
        Pe = (P + (frozen if st.ema_frozen else 0)) / shard
        return [_p("ema.mul_", "ema", 4 * Pe, 4 * Pe, m), _p("ema.add_", "ema", 8 * Pe, 4 * Pe, m)]
    if st.ema == "one_pass":  # kernels/ema_update.py: one op (custom op repa_fast::ema_update_), skip read on device
        return [_p("ema.update", "ema", 8 * Ps + 1, 4 * Ps)]
    weight = [_p("ema.weight0", "ema", 0, 4), _p("ema.weight1", "ema", 0, 4), _p("ema.weight", "ema", 9, 4)]
    chunks = math.ceil(n / EMA_CHUNK)
    ops = [_p("ema.sub", "ema", 8 * Ps, 4 * Ps, chunks), _p("ema.mul_", "ema", 4 * Ps + 4 * chunks, 4 * Ps, chunks)]
    return weight + ops + [_p("ema.add_", "ema", 8 * Ps, 4 * Ps, chunks)]


def comm_ops(st: StepStructure, P: float, world: int) -> list[Op]:
    """Bytes each rank sends over NVLink per step (``read``), and the HBM copies DDP adds (``write`` = 0)."""
    if world <= 1 or st.parallel == "none":
        return []
    ring = (world - 1) / world * 4 * P
    if st.parallel == "ddp":
        return [_link("ddp.all_reduce", 2 * ring), ew("ddp.bucket_copies", 8 * P, 8 * P, "comm")]
    if st.parallel in ("zero1", "zero2"):
        return [_link("zero.reduce_scatter", ring), _link("zero.all_gather", ring)]
    return [_link("fsdp.all_gather_fwd", ring), _link("fsdp.all_gather_bwd", ring), _link("fsdp.reduce_scatter", ring)]


def _link(name: str, nbytes: float) -> Op:
    """A collective: ``read`` holds the bytes this rank sends over NVLink (not HBM traffic: rate "link")."""
    return Op("comm", name, nbytes, 0.0, rate="link", stage="step")
