"""The REPA objective (docs/objective.md): interpolants, time sampling, denoising and alignment losses.

Conventions (§Conventions): t = 0 is clean data, t = 1 is pure noise; the model gets t unscaled in [0, 1].
    x_t = alpha_t x0 + sigma_t eps,   v = d_alpha_t x0 + d_sigma_t eps            (reference loss.py:36-78)
    L_den  = mean over all elements of (v_hat - v)^2                              (loss.py:78, train.py:309)
    L_proj = -(1/K) sum_k mean_{b,t} cos(proj_k(h)[b,t], z_k[b,t])               (loss.py:80-88)
    loss   = L_den + proj_coeff * L_proj                                          (train.py:311)
REG (docs/methods.md §REG; Martinser/REG loss.py:52-102, train.py:300-321): the encoder's class token c is diffused
with the same t, c_t = alpha_t c + sigma_t n, and its velocity regressed: loss += cls_coeff * L_cls; the projectors
are aligned over cat(c, patch tokens). iREPA (§iREPA; End2End-Diffusion/iREPA ldm/utils.py:113-127): the patch
targets are spatially z-scored, (z - alpha mean_T z) / (std_T z + 1e-6).
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


TARGET_NORMS = (None, "none", "zscore")  # iREPA's ALL_SPNORM_METHODS (ldm/utils.py:110), None = "none"


def spatial_zscore(z: torch.Tensor, alpha: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial z-score of patch tokens z (B, T, D) over the token axis (ldm/utils.py:113-127):
    (z - alpha mean_T z) / (std_T z + eps), std unbiased; computed in fp32 or z's wider dtype."""
    z = z.to(loss_dtype(z))
    return (z - alpha * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def alignment_targets(targets, cls_targets=None, target_norm=None, target_norm_alpha: float = 0.6) -> list:
    """The tensors the projector outputs are aligned to (docs/methods.md §REG, §iREPA): each encoder's patch tokens,
    z-scored with ``target_norm="zscore"``, and with REG its class token prepended: cat(c_k[:, None], z_k) over the
    1 + T tokens (REG train.py:305-308; the class token is never z-scored)."""
    _check_choice("target_norm", target_norm, TARGET_NORMS)
    out = [spatial_zscore(z, target_norm_alpha) if target_norm == "zscore" else z for z in targets]
    if cls_targets is None:
        return out
    if len(cls_targets) != len(out):
        raise ValueError(f"{len(cls_targets)} class tokens (cls_targets) for {len(out)} target encoders: give one each")
    return [torch.cat([c[:, None].to(z.dtype), z], dim=1) for c, z in zip(cls_targets, out)]


def _model_forward(model, x_t, t, y, need_zs, cls_input, autocast_dtype):
    """(v_hat, zs, cls_hat): the model under autocast; cls_hat is None for a model without REG."""
    amp = torch.autocast(x_t.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        if cls_input is None:
            v_hat, zs = model(x_t, t, y, return_zs=need_zs)
            return v_hat, zs, None
        return model(x_t, t, y, return_zs=need_zs, cls_token=cls_input)


def _class_token(cls_targets, cls_noise, coefs):
    """REG's diffused class token (REG loss.py:71-81): input alpha_t c + sigma_t n and target d_alpha_t c +
    d_sigma_t n, with c = cls_targets[0] (B, z) and n the class-token noise, drawn like c when not given."""
    c = cls_targets[0]
    if c.dim() != 2:
        raise ValueError(f"cls_targets[0] must be (B, z_dim) class tokens, got shape {tuple(c.shape)}")
    if cls_noise is None:
        cls_noise = torch.randn_like(c)
    alpha, sigma, d_alpha, d_sigma = (k.view(-1, 1) for k in coefs)  # (B, 1), x0's dtype
    return alpha * c + sigma * cls_noise, d_alpha * c + d_sigma * cls_noise


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
    cls_targets: Sequence[torch.Tensor] | None = None,
    cls_noise: torch.Tensor | None = None,
    cls_coeff: float = 0.03,
    target_norm: str | None = None,
    target_norm_alpha: float = 0.6,
) -> dict:
    """The REPA training loss on one batch, with REG's class token and iREPA's target normalisation
    (docs/objective.md §Losses, docs/methods.md).

    x0 (B, C, H, W) clean latents (already scaled), y (B,) labels, targets: one (B, T, z_dim) tensor per encoder
    (or None / [] for plain SiT training). ``t`` (B,) and ``noise`` (like x0) are drawn when not given.
    ``autocast_dtype`` wraps only the model forward in autocast (the losses stay fp32). ``impl`` picks the fused
    alignment-loss kernel or its reference ("auto" | "triton" | "ref").
    REG: ``cls_targets`` one (B, z_dim) class token per encoder (the model must have ``reg=True``); the diffused
    token is cls_targets[0] with ``cls_noise`` (drawn like it after t and noise when not given), and encoder k is
    aligned over cat(cls_targets[k], targets[k]). iREPA: ``target_norm="zscore"`` z-scores the patch-token targets
    with ``target_norm_alpha``.
    Returns scalar tensors {"loss", "denoising", "alignment", "cls"} (no host synchronisation), with
    loss = denoising + proj_coeff * alignment (+ cls_coeff * cls with REG; "cls" is 0 without REG).
    """
    _check_choice("prediction", prediction, PREDICTIONS)
    _check_choice("target_norm", target_norm, TARGET_NORMS)
    if t is None:
        t = sample_time(x0.shape[0], weighting, path_type, device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    t = t.to(device=x0.device, dtype=x0.dtype)
    coefs = interpolant(t.view(-1, *([1] * (x0.dim() - 1))), path_type)
    alpha, sigma, d_alpha, d_sigma = coefs
    x_t = alpha * x0 + sigma * noise
    v_target = d_alpha * x0 + d_sigma * noise
    cls_input = cls_target = None
    if cls_targets is not None:
        cls_input, cls_target = _class_token(cls_targets, cls_noise, coefs)

    need_zs = bool(targets)
    v_hat, zs, cls_hat = _model_forward(model, x_t, t, y, need_zs, cls_input, autocast_dtype)

    den = denoising_loss(v_hat, v_target)
    if need_zs:
        aligned = alignment_targets(targets, cls_targets, target_norm, target_norm_alpha)
        check_token_grid(zs, aligned)
        align = alignment_loss(list(zs), aligned, impl=impl)
    else:
        align = torch.zeros((), device=x0.device)
    loss = den + proj_coeff * align
    if cls_hat is None:
        return {"loss": loss, "denoising": den, "alignment": align, "cls": torch.zeros((), device=x0.device)}
    cls = denoising_loss(cls_hat, cls_target)  # batch mean of the per-sample MSE (REG loss.py:90, train.py:319)
    return {"loss": loss + cls_coeff * cls, "denoising": den, "alignment": align, "cls": cls}


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
    cls_targets: Sequence[torch.Tensor] | None = None,
    target_norm: str | None = None,
    target_norm_alpha: float = 0.6,
) -> dict:
    """ERW's warm-up loss: proj_coeff x L_proj of the first ``num_blocks`` blocks on the clean latent at t = 0.

    The model runs truncated (nothing after block ``num_blocks``), its projectors read that block, RoPE is off and
    there is no denoising term (LINs-lab/ERW loss.py:66-69, train.py:278-284). L_proj is averaged over every sample
    of the batch; ERW's released loss (loss.py:56-61) only counts the last one (README §ERW).
    With REG the class token enters clean as well (t = 0: alpha_0 c + sigma_0 n = c) and the projectors are aligned
    over cat(class token, patch tokens); with iREPA the patch targets are z-scored (docs/methods.md §ERW).
    Returns scalar tensors {"loss", "denoising" (0), "alignment", "cls" (0)}.
    """
    t = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    amp = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    kw = {}
    if cls_targets is not None:  # REG at t = 0: alpha_0 c + sigma_0 n = c, no noise drawn
        kw["cls_token"] = cls_targets[0].to(torch.promote_types(cls_targets[0].dtype, x0.dtype))
    with amp:
        zs = model(x0, t, y, num_blocks=num_blocks, align_depth=num_blocks, use_rope=False, **kw)[1]
    aligned = alignment_targets(targets, cls_targets, target_norm, target_norm_alpha)
    check_token_grid(zs, aligned)
    align = alignment_loss(list(zs), aligned, impl=impl)
    zero = torch.zeros((), device=x0.device)
    return {"loss": proj_coeff * align, "denoising": zero, "alignment": align, "cls": zero}


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
