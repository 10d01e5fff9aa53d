"""The REPA objective (docs/objective.md): interpolants, time sampling, denoising and alignment losses.

Conventions (§Conventions): t = 0 is clean data, t = 1 is pure noise; the model gets t unscaled in [0, 1].
    x_t = alpha_t x0 + sigma_t eps,   v = d_alpha_t x0 + d_sigma_t eps            (reference loss.py:36-78)
    L_den  = mean over all elements of (v_hat - v)^2                              (loss.py:78, train.py:309)
    L_proj = -(1/K) sum_k mean_{b,t} cos(proj_k(h)[b,t], z_k[b,t])               (loss.py:80-88)
    loss   = L_den + proj_coeff * L_proj                                          (train.py:311)
Both losses are computed in fp32 on the model outputs cast to fp32, as accelerate's output cast does in the reference,
and in float64 for float64 inputs (never below the input precision; docs/objective.md §Losses).
"""

import contextlib
import math
from typing import Sequence

import torch

from repa_fast.kernels import alignment_loss
from repa_fast.kernels._dispatch import loss_dtype

PATH_TYPES = ("linear", "cosine")
WEIGHTINGS = ("uniform", "lognormal")
PREDICTIONS = ("v",)


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {choices}")


def interpolant(t, path_type: str = "linear"):
    """(alpha_t, sigma_t, d_alpha_t, d_sigma_t) for a tensor t of any shape, or a Python float (docs/objective.md
    §Interpolants; reference loss.py:36-50 and samplers.py ``expand_t_like_x``/``get_score_from_velocity``).

    The one interpolant of the project: training (tensors in x0's dtype) and the samplers (float64 Python floats,
    the reference samplers' numbers bit for bit) both call it.
    """
    _check_choice("path_type", path_type, PATH_TYPES)
    tensor = isinstance(t, torch.Tensor)
    if path_type == "linear":
        return (1 - t, t, -torch.ones_like(t), torch.ones_like(t)) if tensor else (1.0 - t, t, -1.0, 1.0)
    cos, sin = (torch.cos, torch.sin) if tensor else (math.cos, math.sin)
    half_pi_t = t * (math.pi / 2)
    return cos(half_pi_t), sin(half_pi_t), -(math.pi / 2) * sin(half_pi_t), (math.pi / 2) * cos(half_pi_t)


def sample_time(
    batch_size: int,
    weighting: str = "uniform",
    path_type: str = "linear",
    device=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t of shape (B,), fp32, drawn on ``device`` (the reference draws on the CPU: same law, other stream).

    "uniform": t ~ U[0, 1). "lognormal": s = exp(n), n ~ N(0, 1); linear t = s / (1 + s), cosine t = (2/pi) atan(s).
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("path_type", path_type, PATH_TYPES)
    if weighting == "uniform":
        return torch.rand(batch_size, device=device, generator=generator)
    s = torch.randn(batch_size, device=device, generator=generator).exp()
    return s / (1 + s) if path_type == "linear" else (2 / math.pi) * torch.atan(s)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of the squared error over C, H, W, then the batch mean, in fp32 or the inputs' wider dtype."""
    acc = loss_dtype(pred, target)
    return (pred.to(acc) - target.to(acc)).pow(2).flatten(1).mean(1).mean()


def training_loss(
    model,
    x0: torch.Tensor,
    y: torch.Tensor,
    targets: Sequence[torch.Tensor] | None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    path_type: str = "linear",
    prediction: str = "v",
    weighting: str = "uniform",
    proj_coeff: float = 0.5,
    autocast_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> dict:
    """The REPA training loss on one batch.

    x0 (B, C, H, W) clean latents (already scaled), y (B,) labels, targets: one (B, T, z_dim) tensor per encoder
    (or None / [] for plain SiT training). ``t`` (B,) and ``noise`` (like x0) are drawn when not given.
    ``autocast_dtype`` wraps only the model forward in autocast (the losses stay fp32). ``impl`` picks the fused
    alignment-loss kernel or its reference ("auto" | "triton" | "ref").
    Returns scalar tensors {"loss", "denoising", "alignment"} (no host synchronisation).
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    if t is None:
        t = sample_time(x0.shape[0], weighting, path_type, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    t = t.to(device=x0.device, dtype=x0.dtype)
    alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, *([1] * (x0.dim() - 1))), path_type)
    x_t = alpha * x0 + sigma * noise
    v_target = d_alpha * x0 + d_sigma * noise

    need_zs = bool(targets)
    amp = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        v_hat, zs = model(x_t, t, y, return_zs=need_zs)

    den = denoising_loss(v_hat, v_target)
    if need_zs:
        check_token_grid(zs, targets)
        align = alignment_loss(list(zs), list(targets), impl=impl)
    else:
        align = torch.zeros((), device=x0.device)
    return {"loss": den + proj_coeff * align, "denoising": den, "alignment": align}


def warmup_loss(
    model,
    x0: torch.Tensor,
    y: torch.Tensor,
    targets: Sequence[torch.Tensor],
    *,
    num_blocks: int,
    proj_coeff: float = 0.5,
    autocast_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> dict:
    """ERW's warm-up loss: proj_coeff x L_proj of the first ``num_blocks`` blocks on the clean latent at t = 0.

    The model runs truncated (nothing after block ``num_blocks``), its projectors read that block, RoPE is off and
    there is no denoising term (LINs-lab/ERW loss.py:66-69, train.py:278-284). L_proj is averaged over every sample
    of the batch; ERW's released loss (loss.py:56-61) only counts the last one (README §ERW).
    Returns scalar tensors {"loss", "denoising" (0), "alignment"}.
    """
    t = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    amp = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        _, zs = model(x0, t, y, num_blocks=num_blocks, align_depth=num_blocks, use_rope=False)
    check_token_grid(zs, targets)
    align = alignment_loss(list(zs), list(targets), impl=impl)
    return {"loss": proj_coeff * align, "denoising": torch.zeros((), device=x0.device), "alignment": align}


def check_token_grid(zs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    """Clear error when the SiT token grid does not match the encoder's (e.g. SiT-XL/4 against DINOv2 at 256px)."""
    if len(zs) != len(targets):
        raise ValueError(
            f"the model has {len(zs)} projector(s) but {len(targets)} target encoder(s) were given; "
            "build the model with z_dims=[encoder.embed_dim for encoder in encoders]"
        )
    for k, (z, target) in enumerate(zip(zs, targets)):
        if z.shape[1] != target.shape[1]:
            g, ge = math.isqrt(z.shape[1]), math.isqrt(target.shape[1])
            raise ValueError(
                f"token grid mismatch for encoder {k}: the SiT has {z.shape[1]} tokens ({g}x{g}) but the encoder gives "
                f"{target.shape[1]} ({ge}x{ge}). REPA aligns token by token: use a patch size that gives a {ge}x{ge} "
                "grid (patch 2 on 32x32 latents at 256px, 64x64 at 512px)."
            )
        if z.shape[2] != target.shape[2]:
            raise ValueError(
                f"projector {k} outputs {z.shape[2]} channels but encoder {k} gives {target.shape[2]}: "
                "set z_dims to the encoders' embed_dim in the same order as --enc-type"
            )


def sample_posterior(moments: torch.Tensor, scale: float) -> torch.Tensor:
    """x0 = (mean + std * eps) * scale with [mean, std] stacked on the channel axis (reference train.py:71-77)."""
    mean, std = moments.float().chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * scale
