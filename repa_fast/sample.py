"""ODE/SDE samplers with classifier-free guidance and the guidance interval (docs/objective.md §Samplers, §Guidance).

Conventions (docs/objective.md §Conventions): t = 1 is pure noise, t = 0 is clean data; the model predicts the velocity
v = d_alpha x0 + d_sigma eps. Samplers integrate from t = 1 to t = 0 in float64 and call the model in the
latents' dtype, as the reference ``samplers.py`` (``euler_sampler``, ``euler_maruyama_sampler``) does.

- ODE: grid linspace(1, 0, N + 1); Euler x <- x + (t_next - t_cur) d; Heun adds a second evaluation at
  t_next and averages (not on the last step): 2N - 1 model calls.
- SDE (Euler-Maruyama): grid linspace(1, 0.04, N) then 0; drift d = v - 0.5 w s with diffusion w = 2t and
  the score s from the velocity; x <- x + d dt + sqrt(w) sqrt(|dt|) eps; the last step (0.04 -> 0) is
  deterministic. N model calls.
- CFG: where guidance_low <= t_cur <= guidance_high the batch is doubled with the null label and
  d = d_u + cfg_scale (d_c - d_u) (on the velocity for the ODE, on the drift for the SDE, as the reference).
  Heun's second evaluation follows the decision taken at t_cur. Callers pass B latents and B labels and get
  B samples: unlike generate.py, do not pre-double the batch (the reference then runs 4B rows per call).

- REG (docs/methods.md §REG): with ``cls_latents`` and a REG SiT (``model(x, t, y, cls_token=c) -> (v, zs, cls_v)``)
  the class token is integrated jointly with the image by the same steps (REG samplers.py; per SDE step the image
  noise, then the class-token noise, both before the model call); where the image is guided, the class token is
  guided with ``cls_cfg_scale`` (<= 0: its conditional half). REG has no ODE sampler: ours is defined the same way.

Differences from the reference, on purpose: the null label is the model's ``num_classes`` (the reference
hard-codes 1000); a model returning a plain tensor is accepted (the reference always takes ``[0]``);
``return_zs=False`` is passed to models that accept it so REPA projectors do not run; ``cfg_scale < 1``,
an empty guidance interval and ``heun=True`` for the SDE raise instead of being silently ignored.
Evaluation helpers: ``decode_to_uint8`` rounds (the reference truncates), ``class_balanced_labels`` and an
atomic ``save_npz`` in the ADM evaluator's layout.
"""

import inspect
import math
import os
import warnings

import numpy as np
import torch

from repa_fast.objective import PATH_TYPES, interpolant  # one interpolant for training and sampling

LEGACY_NULL_CLASS = 1000  # samplers.py / generate.py hard-code this null label
SDE_T_LAST = 0.04  # samplers.py: the stochastic grid stops here, then one deterministic step to 0
REG_CLS_CFG_SCALE = 1.5  # Martinser/REG generate.py:213: --cls-cfg-scale default
# Wrappers that forward keyword arguments to `.module` unchanged (looked up by name: no optional imports).
_FORWARDING_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


# ---------------------------------------------------------------------------------------------------------
# Model introspection (once per sampler call, never per step)
# ---------------------------------------------------------------------------------------------------------
def _unwrap(model):
    """The user's module behind DDP / FSDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in _FORWARDING_WRAPPERS:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model


def accepts_return_zs(model) -> bool:
    """True when the callable (or the module it wraps) names a `return_zs` parameter in its signature."""
    target = _unwrap(model)
    fn = target.forward if isinstance(target, torch.nn.Module) else target
    try:
        param = inspect.signature(fn).parameters.get("return_zs")
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def resolve_null_class(model, null_class=None) -> int:
    """`null_class`, else the model's `num_classes` (the SiT label table's extra row), else the reference 1000."""
    if null_class is not None:
        return int(null_class)
    num_classes = getattr(_unwrap(model), "num_classes", None)
    return int(num_classes) if isinstance(num_classes, int) else LEGACY_NULL_CLASS


# ---------------------------------------------------------------------------------------------------------
# The score from the velocity (docs/objective.md §Samplers; the interpolant is repa_fast.objective.interpolant)
# ---------------------------------------------------------------------------------------------------------
def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str = "linear") -> torch.Tensor:
    """Score of x_t from the velocity: s = (r v - x) / (sigma^2 - r d_sigma sigma), r = alpha / d_alpha.

    Linear path: s = (-(1 - t) v - x) / t (docs/objective.md §Samplers); cosine: the denominator is 1. The operation
    order is the reference's (get_score_from_velocity), so float64 results agree bit for bit. Needs t > 0 for "linear".
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)  # python floats (float64)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def _validate(latents, y, num_steps, cfg_scale, guidance_low, guidance_high, path_type):
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        raise TypeError(f"latents: expected a floating-point tensor (B, C, H, W), got {type(latents).__name__}")
    if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != latents.shape[0] or y.is_floating_point():
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y: expected integer class labels of shape ({latents.shape[0]},), got {shape}")
    if y.device != latents.device:
        raise ValueError(f"y is on {y.device} but latents on {latents.device}: move them to the same device")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected an integer >= 1")
    if not cfg_scale >= 1.0:  # also rejects NaN
        raise ValueError(f"cfg_scale={cfg_scale}: must be >= 1 (1 = no guidance), as generate.py asserts")
    if cfg_scale > 1.0 and not guidance_low <= guidance_high:
        raise ValueError(f"guidance interval [{guidance_low}, {guidance_high}] is empty: use cfg_scale=1.0 instead")
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type={path_type!r}: expected one of {PATH_TYPES}")


def reg_cls_latents(model, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor | None:
    """The class token's starting noise (n, z_dims[0]) for a REG SiT (REG generate.py:131, ``torch.randn(n,
    args.cls)``), drawn after the image noise by the caller's convention; None for a model without REG."""
    inner = _unwrap(model)
    if not getattr(inner, "reg", False):
        return None
    where = generator.device if generator is not None else device  # drawn where the generator lives (REG: on device)
    return torch.randn(n, inner.cls_dim, generator=generator, device=where).to(device)


def _validate_cls(model, latents, cls_latents, cls_cfg_scale):
    """REG's class-token latents: given exactly when the model is a REG SiT (``reg``), shape (B, z), same device."""
    reg = getattr(_unwrap(model), "reg", None)
    if reg is True and cls_latents is None:
        dim = getattr(_unwrap(model), "cls_dim", "z_dims[0]")
        raise ValueError(
            f"the model is a REG SiT (reg=True): pass cls_latents=torch.randn(B, {dim}), the class token's starting "
            "noise, sampled jointly with the image (REG samplers.py / generate.py:131)"
        )
    if cls_latents is None:
        return
    if reg is False:
        raise ValueError("cls_latents was given but the model is not a REG SiT (reg=False): drop cls_latents")
    if not torch.is_tensor(cls_latents) or not cls_latents.is_floating_point() or cls_latents.dim() != 2:
        raise ValueError(f"cls_latents: expected a floating-point (B, z) tensor, got {cls_latents!r:.80}")
    if cls_latents.shape[0] != latents.shape[0] or cls_latents.device != latents.device:
        raise ValueError(
            f"cls_latents {tuple(cls_latents.shape)} on {cls_latents.device} does not match latents "
            f"{tuple(latents.shape)} on {latents.device}: one class token per image, same device"
        )
    if not math.isfinite(cls_cfg_scale):
        raise ValueError(f"cls_cfg_scale={cls_cfg_scale}: must be a finite number (<= 0: the conditional half)")


class _GuidedVelocity:
    """Model evaluation for one sampler run: dtype casts, label doubling and the guidance schedule.

    Everything that does not change across steps is built here once: the doubled labels, the time inputs
    (float64 grid cast to the model dtype, as the reference casts ``time_input``), the per-step guidance
    decision (python floats: no device sync in the loop) and the `return_zs` keyword.
    """

    def __init__(self, model, latents, y, grid, cfg_scale, guidance_low, guidance_high, null_class, cls_cfg=1.5):
        self.model, self.cfg_scale, self.dtype = model, float(cfg_scale), latents.dtype
        self.cls_cfg_scale = float(cls_cfg)
        self.kwargs = {"return_zs": False} if accepts_return_zs(model) else {}
        self.guided = [cfg_scale > 1.0 and guidance_low <= t <= guidance_high for t in grid]
        b = latents.shape[0]
        self.y = y
        self.y2 = torch.cat([y, torch.full_like(y, resolve_null_class(model, null_class))]) if any(self.guided) else y
        grid64 = torch.tensor(grid, dtype=torch.float64, device=latents.device)
        self.t_table = grid64.to(self.dtype)[:, None].repeat(1, 2 * b)  # (len(grid), 2B) in the model dtype
        if isinstance(model, torch.nn.Module) and model.training:
            warnings.warn("sampling a model in train mode (label dropout?): call model.eval() first", stacklevel=4)

    def __call__(self, x: torch.Tensor, k: int, guided: bool, cls: torch.Tensor | None = None):
        """Velocity at grid point k, float64: (2B, ...) with [cond; uncond] halves when guided, else (B, ...).

        With REG's class token ``cls`` (B, z): (velocity, class-token velocity), the token doubled like x and cast
        to the model dtype as REG's samplers.py:80-100 does."""
        x_in = x.to(self.dtype)
        if guided:
            x_in = torch.cat([x_in, x_in])  # (2B, C, H, W): conditional half, then null-label half
        kwargs = self.kwargs
        if cls is not None:
            c_in = cls.to(self.dtype)
            kwargs = {**kwargs, "cls_token": torch.cat([c_in, c_in]) if guided else c_in}
        n = x_in.shape[0]
        out = self.model(x_in, self.t_table[k, :n], self.y2 if guided else self.y, **kwargs)
        v = out[0] if isinstance(out, (tuple, list)) else out  # SiT returns (prediction, zs[, cls_v])
        _check_output(v, x_in.shape, "a velocity")
        if cls is None:
            return v.to(torch.float64)
        cls_v = out[2] if isinstance(out, (tuple, list)) and len(out) == 3 else None  # REG: (v, zs, cls_v)
        _check_output(cls_v, (n, cls.shape[1]), "REG's (v, zs, cls_v) with a class-token velocity")
        return v.to(torch.float64), cls_v.to(torch.float64)

    def combine(self, d: torch.Tensor) -> torch.Tensor:
        """CFG on a doubled-batch quantity: d_u + w (d_c - d_u) (docs/objective.md §Guidance)."""
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + self.cfg_scale * (d_cond - d_uncond)

    def combine_cls(self, d: torch.Tensor) -> torch.Tensor:
        """REG's class-token guidance where the image is guided: d_u + w_cls (d_c - d_u), or the conditional half
        when cls_cfg_scale <= 0 (REG samplers.py:114-118)."""
        d_cond, d_uncond = d.chunk(2)
        if self.cls_cfg_scale > 0:
            return d_uncond + self.cls_cfg_scale * (d_cond - d_uncond)
        return d_cond


def _check_output(v, shape, what: str) -> None:
    if not torch.is_tensor(v) or v.shape != shape:
        got = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ValueError(f"model output: expected {what} of shape {tuple(shape)}, got {got}")


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def euler_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int | None = None,
    cls_latents: torch.Tensor | None = None,
    cls_cfg_scale: float = REG_CLS_CFG_SCALE,
) -> torch.Tensor:
    """Probability-flow ODE from t = 1 (latents ~ N(0, I)) to t = 0; returns float64 samples like the latents.

    model: any callable ``model(x, t, y)`` returning the velocity or a tuple whose first item is it.
    path_type only matters to the SDE (the ODE needs the velocity alone); it is validated for symmetry.
    REG (``cls_latents`` (B, z), a model returning (v, zs, cls_v)): REG has no ODE sampler; ours integrates the
    class token with the same Euler (Heun) steps as the image and guides it as the SDE does (docs/methods.md §REG).
    """
    _validate(latents, y, num_steps, cfg_scale, guidance_low, guidance_high, path_type)
    _validate_cls(model, latents, cls_latents, cls_cfg_scale)
    grid = torch.linspace(
        1, 0, num_steps + 1, dtype=torch.float64
    ).tolist()  # docs/objective.md §Samplers: float64 t grid
    velocity = _GuidedVelocity(
        model, latents, y, grid, cfg_scale, guidance_low, guidance_high, null_class, cls_cfg_scale
    )
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = grid[i], grid[i + 1]
        d_cur, cls_d = _ode_slope(velocity, x, i, velocity.guided[i], cls)
        x_next = x + (t_next - t_cur) * d_cur
        cls_next = None if cls is None else cls + (t_next - t_cur) * cls_d
        if heun and i < num_steps - 1:
            # Second evaluation at t_next, guided or not by the decision taken at t_cur (samplers.py).
            d_prime, cls_prime = _ode_slope(velocity, x_next, i + 1, velocity.guided[i], cls_next)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            if cls is not None:
                cls_next = cls + (t_next - t_cur) * (0.5 * cls_d + 0.5 * cls_prime)
        x, cls = x_next, cls_next
    return x


def _ode_slope(velocity: _GuidedVelocity, x, k: int, guided: bool, cls=None):
    """(d, d_cls): the (guided) velocity of the image and, with REG, of the class token (else None)."""
    if cls is None:
        d = velocity(x, k, guided)
        return (velocity.combine(d) if guided else d), None
    d, cls_d = velocity(x, k, guided, cls)
    return (velocity.combine(d), velocity.combine_cls(cls_d)) if guided else (d, cls_d)


def _score_drift(v: torch.Tensor, x: torch.Tensor, t: float, path_type: str, guided: bool) -> torch.Tensor:
    """d = v - 0.5 w s(v, x) with w = 2t, on the (B or 2B) rows of v; x has B rows."""
    if guided:
        v = v.reshape(2, *x.shape)  # [cond, uncond] halves share x: broadcast instead of concatenating it
    d = v - (0.5 * (2 * t)) * score_from_velocity(v, x, t, path_type)
    return d.reshape(-1, *x.shape[1:]) if guided else d


def _sde_drift(velocity: _GuidedVelocity, x: torch.Tensor, k: int, t: float, path_type: str, cls=None):
    """(d, d_cls): drift of the image (CFG on the drift of both halves, as the reference) and, with REG, of the
    class token (REG samplers.py:104-118; else None)."""
    guided = velocity.guided[k]
    out = velocity(x, k, guided, cls)
    v, cls_v = out if cls is not None else (out, None)
    d = _score_drift(v, x, t, path_type, guided)
    d = velocity.combine(d) if guided else d
    if cls is None:
        return d, None
    cls_d = _score_drift(cls_v, cls, t, path_type, guided)
    return d, (velocity.combine_cls(cls_d) if guided else cls_d)


def _gaussian(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_maruyama_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 20,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    cls_latents: torch.Tensor | None = None,
    cls_cfg_scale: float = REG_CLS_CFG_SCALE,
) -> torch.Tensor:
    """Reverse SDE dx = (v - 0.5 w s) dt + sqrt(w) dW, w = 2t, from t = 1 to 0 in num_steps model calls.

    Noise is drawn in float64 like the latents' shape, from `generator` when given (reproducible
    sampling), otherwise from the global RNG exactly as ``torch.randn_like`` in the reference.
    `heun` exists for signature compatibility with the reference and must stay False.
    REG (``cls_latents`` (B, z), a model returning (v, zs, cls_v)): the class token is sampled jointly and the image
    latents are returned (REG samplers.py:46-169). Each step draws the image noise, then the class-token noise,
    before the model call; ``cls_cfg_scale`` guides the class token where the image is guided (<= 0: its
    conditional half).
    """
    if heun:
        raise ValueError("heun=True is an ODE option (euler_sampler); the Euler-Maruyama sampler has no Heun step")
    _validate(latents, y, num_steps, cfg_scale, guidance_low, guidance_high, path_type)
    _validate_cls(model, latents, cls_latents, cls_cfg_scale)
    grid = torch.linspace(1.0, SDE_T_LAST, num_steps, dtype=torch.float64).tolist() + [0.0]
    velocity = _GuidedVelocity(
        model, latents, y, grid, cfg_scale, guidance_low, guidance_high, null_class, cls_cfg_scale
    )
    x = latents.to(torch.float64)
    cls = None if cls_latents is None else cls_latents.to(torch.float64)
    for i in range(num_steps - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur
        eps = _gaussian(x, generator)
        cls_eps = None if cls is None else _gaussian(cls, generator)  # after the image noise (REG samplers.py:92-93)
        d_cur, cls_d = _sde_drift(velocity, x, i, t_cur, path_type, cls)
        x = x + d_cur * dt + math.sqrt(2 * t_cur) * (eps * math.sqrt(abs(dt)))
        if cls is not None:
            cls = cls + cls_d * dt + math.sqrt(2 * t_cur) * (cls_eps * math.sqrt(abs(dt)))
    # Last step (t = 0.04 -> 0, or 1 -> 0 when num_steps = 1): the mean of the transition, no noise.
    t_cur = grid[-2]
    return x + (0.0 - t_cur) * _sde_drift(velocity, x, num_steps - 1, t_cur, path_type, cls)[0]


SAMPLERS = {"ode": euler_sampler, "sde": euler_maruyama_sampler}  # generate.py's --mode values


# ---------------------------------------------------------------------------------------------------------
# Evaluation helpers (docs/objective.md §Samplers: decode, labels, the ADM evaluator's .npz)
# ---------------------------------------------------------------------------------------------------------
def decode_to_uint8(images: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """VAE output in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C) on the same device.

    image = clamp(255 (x + 1) / 2, 0, 255), then rounded to nearest (ties to even) by default, or truncated
    like the reference's ``.to(torch.uint8)`` with rounding="truncate". Non-finite input is an error.
    """
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding={rounding!r}: expected 'round' or 'truncate'")
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point (N, C, H, W) tensor in [-1, 1], got {images!r:.80}")
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN/inf: the sampler or the VAE decode diverged")
    x = torch.clamp(255.0 * ((x + 1) / 2), 0, 255)
    x = torch.round(x) if rounding == "round" else torch.trunc(x)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def shard_bounds(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n items; the first n % world_size ranks get one extra."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def class_balanced_labels(n: int, num_classes: int, rank: int = 0, world_size: int = 1, device=None) -> torch.Tensor:
    """Labels of rank's share of n samples whose global label sequence is i % num_classes.

    Every class appears n // num_classes or n // num_classes + 1 times over all ranks (exactly n / num_classes
    when it divides n, e.g. 50 per class for 50k ImageNet samples), instead of generate.py's randint draws.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"n={n}, num_classes={num_classes}: need n >= 0 and num_classes >= 1")
    start, end = shard_bounds(n, rank, world_size)
    return torch.arange(start, end, dtype=torch.long, device=device) % num_classes


def save_npz(path: str | os.PathLike, images) -> str:
    """Write uint8 (N, H, W, 3) images as arr_0 of an .npz (ADM evaluator layout), atomically.

    The array goes to a temporary file in the same directory, is fsynced, then renamed over `path`, so a
    crash never leaves a truncated file that an evaluator would read. Returns the path.
    """
    arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(
            f"save_npz({os.fspath(path)!r}): expected uint8 (N, H, W, 3) with N >= 1, got {arr.dtype} {arr.shape}"
            " (decode_to_uint8 gives this layout)"
        )
    from repa_fast.io import atomic_path

    path = os.fspath(path)
    with atomic_path(path, size_hint=arr.nbytes) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)  # a file object: np.savez would otherwise append ".npz" to the name
    return path
