"""Alignment projectors: REPA's per-token MLP and iREPA's linear / conv projection layers (docs/methods.md §iREPA).

``projection_layer_type`` picks one, with the reference's state-dict keys:

- ``"mlp"``: REPA's Linear(D, 2048) - SiLU - Linear(2048, 2048) - SiLU - Linear(2048, z), per token; keys
  ``projectors.k.{0,2,4}.{weight,bias}`` (sihyun-yu/REPA models/sit.py:16-23).
- ``"linear"``: one Linear(D, z) per token; keys ``projectors.k.projection_layer.{weight,bias}``
  (End2End-Diffusion/iREPA ldm/models/sit.py:44-47).
- ``"conv"``: Conv2d(D, z, k, stride 1, padding k // 2) over the (g, g) token grid; same keys as "linear"
  (iREPA ldm/models/sit.py:48-53, forward :67-79).

Init is the model's: ``SiT.initialize_weights`` applies xavier-uniform / zero bias to every ``nn.Linear`` (the
linear projector included) and leaves the conv at PyTorch's default Conv2d init, as iREPA's ``_basic_init`` does
(ldm/models/sit.py:280-287 touches Linear modules only).

Layout of the conv: the tokens (B, T, D) are viewed as (B, g, g, D) and permuted to an NCHW tensor with
channels-last strides (no copy; iREPA copies to NCHW with ``.contiguous()``): the same convolution, and its
channels-last output permutes back to (B, T, z) rows that the fused alignment loss reads without a copy.
"""

import torch
import torch.nn as nn

from repa_fast.errors import ConfigError

PROJECTION_LAYER_TYPES = ("mlp", "linear", "conv")  # iREPA's ALL_PROJECTION_LAYER_TYPES (ldm/models/sit.py:32)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear - SiLU - Linear - SiLU - Linear, applied per token (keys 0, 2, 4)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class ProjectionLayer(nn.Module):
    """iREPA's "linear" or "conv" projector; the layer sits at ``.projection_layer`` (iREPA's key)."""

    def __init__(self, kind: str, hidden_size: int, z_dim: int, kernel_size: int = 3):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.projection_layer = nn.Linear(hidden_size, z_dim)
        else:
            self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        B, T, D = x.shape
        if self.kind == "linear":
            return self.projection_layer(x.reshape(B * T, D)).reshape(B, T, -1)
        if T != grid * grid:
            raise ValueError(f"conv projector: {T} tokens are not the {grid}x{grid} token grid")
        h = x.reshape(B, grid, grid, D).permute(0, 3, 1, 2)  # (B, D, g, g), channels-last strides
        return self.projection_layer(h).permute(0, 2, 3, 1).reshape(B, T, -1)  # (B, T, z)


def check_projector_options(kind: str, kernel_size: int, reg: bool) -> None:
    """ConfigError for an unknown type, an even/non-positive kernel, or a conv projector with REG's class token."""
    if kind not in PROJECTION_LAYER_TYPES:
        raise ConfigError(
            f"projection_layer_type={kind!r} is not one of {PROJECTION_LAYER_TYPES} (--projection-layer-type)"
        )
    odd = isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size >= 1 and kernel_size % 2
    if kind == "conv" and not odd:
        raise ConfigError(
            f"proj_kernel_size={kernel_size!r}: the conv projector needs an odd kernel size >= 1 so that padding "
            "k // 2 keeps the token grid (iREPA accepts 1, 3, 5, 7)"
        )
    if kind == "conv" and reg:
        raise ConfigError(
            "projection_layer_type='conv' with reg=True is not defined: REG's class token is not on the token grid a "
            "3x3 convolution runs over, and neither REG nor iREPA says how to project it. Use the 'mlp' or 'linear' "
            "projector with REG, or drop REG (--cls 0) to use the conv projector."
        )


def build_projector(kind: str, hidden_size: int, projector_dim: int, z_dim: int, kernel_size: int = 3) -> nn.Module:
    if kind == "mlp":
        return build_mlp(hidden_size, projector_dim, z_dim)
    return ProjectionLayer(kind, hidden_size, z_dim, kernel_size)


def project(projector: nn.Module, x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, T, D) hidden states -> (N, T, z): per token for "mlp" / "linear", over the (grid, grid) map for "conv"."""
    if isinstance(projector, ProjectionLayer):
        return projector(x, grid)
    N, T, D = x.shape
    return projector(x.reshape(-1, D)).reshape(N, T, -1)  # REPA's models/sit.py:280-283
