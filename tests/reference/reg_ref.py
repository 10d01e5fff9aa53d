"""Test-side reimplementation of REG (Martinser/REG @ 021ea2e50c38), the oracle of tests/test_reg.py. Written from
reading the reference, not copied; each piece names the lines it reproduces:

- ``RegSiT``: models/sit.py:139-163 (FinalLayer with ``linear_cls``), :166-315 (SiT: ``pos_embed`` (1, T+1, D) with a
  zero first row, ``cls_projectors2``, ``wg_norm``, init :227-265, forward :282-315);
- ``reg_loss``: loss.py:52-102 with train.py:313-321 (the total), on the only path of loss.py that runs
  (``noises=None``: with noises given, ``noises_cls`` is undefined at loss.py:78);
- ``reg_euler_maruyama_sampler``: samplers.py:5-39 (score from velocity), :46-169 (joint SDE, ``args.cls_cfg_scale``).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.reference.sit_ref import SiTBase, build_mlp, modulate


class FinalLayer(nn.Module):
    """models/sit.py:139-163."""

    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])


class RegSiT(SiTBase):
    """REG's SiT (models/sit.py:166-315): the class token joins the tokens first; linear_cls gives its velocity."""

    extra_tokens = 1

    def _build_heads(self, hidden_size, projector_dim):
        self.projectors = nn.ModuleList(build_mlp(hidden_size, projector_dim, z) for z in self.z_dims)
        cls_token_dim = self.z_dims[0]  # models/sit.py:217-218 overrides the cls_token_dim argument
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels, cls_token_dim)
        self.cls_projectors2 = nn.Linear(in_features=cls_token_dim, out_features=hidden_size, bias=True)
        self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)

    def _zeroed_output_layers(self):
        return super()._zeroed_output_layers() + [self.final_layer.linear_cls]

    def forward(self, x, t, y, cls_token=None):
        x, c = self.embed(x, t, y)
        if cls_token is None:
            raise SystemExit("REG's SiT exits without cls_token (models/sit.py:298-299)")
        cls = self.wg_norm(self.cls_projectors2(cls_token)).unsqueeze(1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        N, T, D = x.shape
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in self.projectors]
        x, cls_v = self.final_layer(x, c)
        return self.unpatchify(x), zs, cls_v


def mean_flat(x):
    return torch.mean(x, dim=list(range(1, len(x.size()))))


def reg_loss(model, images, y, zs, cls_token, path_type="linear", weighting="uniform", proj_coeff=0.5, cls_coeff=0.03):
    """loss.py:52-102 + train.py:318-321 -> dict(loss, denoising, alignment, cls). zs: per encoder
    cat(cls[:, None], patch tokens) (train.py:305-308); cls_token the diffused class token."""
    if weighting == "uniform":
        time_input = torch.rand((images.shape[0], 1, 1, 1))
    else:
        sigma = torch.randn((images.shape[0], 1, 1, 1)).exp()
        time_input = sigma / (1 + sigma) if path_type == "linear" else 2 / np.pi * torch.atan(sigma)
    time_input = time_input.to(device=images.device, dtype=images.dtype)
    noises = torch.randn_like(images)
    noises_cls = torch.randn_like(cls_token)
    if path_type == "linear":
        alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - time_input, time_input, -1, 1
    else:
        alpha_t, sigma_t = torch.cos(time_input * np.pi / 2), torch.sin(time_input * np.pi / 2)
        d_alpha_t = -np.pi / 2 * torch.sin(time_input * np.pi / 2)
        d_sigma_t = np.pi / 2 * torch.cos(time_input * np.pi / 2)
    model_input = alpha_t * images + sigma_t * noises
    sq = lambda a: a.squeeze(-1).squeeze(-1) if torch.is_tensor(a) else a  # noqa: E731
    cls_input = sq(alpha_t) * cls_token + sq(sigma_t) * noises_cls
    model_target = d_alpha_t * images + d_sigma_t * noises
    cls_target = sq(d_alpha_t) * cls_token + sq(d_sigma_t) * noises_cls
    model_output, zs_tilde, cls_output = model(model_input, time_input.flatten(), y, cls_token=cls_input)
    denoising = mean_flat((model_output - model_target) ** 2)
    denoising_cls = mean_flat((cls_output - cls_target) ** 2)
    proj_loss, bsz = 0.0, zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            proj_loss += mean_flat(-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1))
    proj_loss /= len(zs) * bsz
    den, align, cls = denoising.mean(), proj_loss.mean(), denoising_cls.mean()
    return {"loss": den + align * proj_coeff + cls * cls_coeff, "denoising": den, "alignment": align, "cls": cls}


def _score(vt, xt, t, path_type):
    """samplers.py:15-39."""
    t = t.view(t.size(0), *([1] * (xt.dim() - 1)))
    if path_type == "linear":
        alpha_t, d_alpha_t = 1 - t, torch.ones_like(xt) * -1
        sigma_t, d_sigma_t = t, torch.ones_like(xt)
    else:
        alpha_t, sigma_t = torch.cos(t * np.pi / 2), torch.sin(t * np.pi / 2)
        d_alpha_t, d_sigma_t = -np.pi / 2 * torch.sin(t * np.pi / 2), np.pi / 2 * torch.cos(t * np.pi / 2)
    ratio = alpha_t / d_alpha_t
    var = sigma_t**2 - ratio * d_sigma_t * sigma_t
    return (ratio * vt - xt) / var


def _drift(model, x_cur, cls_cur, y, y_null, t_cur, guided, cfg_scale, cls_cfg_scale, dtype, path_type):
    """One drift evaluation of samplers.py:79-118 (or :128-164 for the last step)."""
    model_input = torch.cat([x_cur] * 2) if guided else x_cur
    cls_input = torch.cat([cls_cur] * 2) if guided else cls_cur
    y_cur = torch.cat([y, y_null]) if guided else y
    time_input = torch.ones(model_input.size(0), dtype=torch.float64) * t_cur
    diffusion = 2 * t_cur
    v, _, cls_v = model(model_input.to(dtype), time_input.to(dtype), y=y_cur, cls_token=cls_input.to(dtype))
    v, cls_v = v.to(torch.float64), cls_v.to(torch.float64)
    d = v - 0.5 * diffusion * _score(v, model_input, time_input, path_type)
    cls_d = cls_v - 0.5 * diffusion * _score(cls_v, cls_input, time_input, path_type)
    if guided:
        d_c, d_u = d.chunk(2)
        d = d_u + cfg_scale * (d_c - d_u)
        cls_c, cls_u = cls_d.chunk(2)
        cls_d = cls_u + cls_cfg_scale * (cls_c - cls_u) if cls_cfg_scale > 0 else cls_c
    return d, cls_d


@torch.no_grad()
def reg_euler_maruyama_sampler(model, latents, y, num_steps=20, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                               path_type="linear", cls_latents=None, cls_cfg_scale=1.5):  # fmt: skip
    """samplers.py:46-169 (REG's null label is 1000, :61)."""
    y_null = torch.tensor([1000] * y.size(0), device=y.device)
    dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next, cls_next = latents.to(torch.float64), cls_latents.to(torch.float64)
    args = (y, y_null)
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur, cls_cur = x_next, cls_next
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        eps_i, cls_eps_i = torch.randn_like(x_cur), torch.randn_like(cls_cur)
        deps, cls_deps = eps_i * torch.sqrt(torch.abs(dt)), cls_eps_i * torch.sqrt(torch.abs(dt))
        d, cls_d = _drift(model, x_cur, cls_cur, *args, t_cur, guided, cfg_scale, cls_cfg_scale, dtype, path_type)
        diffusion = 2 * t_cur
        x_next = x_cur + d * dt + torch.sqrt(diffusion) * deps
        cls_next = cls_cur + cls_d * dt + torch.sqrt(diffusion) * cls_deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
    d, _ = _drift(model, x_next, cls_next, *args, t_cur, guided, cfg_scale, cls_cfg_scale, dtype, path_type)
    return x_next + (t_next - t_cur) * d
