"""Analytic FLOPs of one REPA training step (matmul and attention FLOPs, 2 per multiply-add).

Counted: every Linear/Conv (forward 2*in*out per token), attention scores and values (4*T*D per token), in the SiT,
its projectors and the frozen encoders. Backward = 2x forward for the trainable SiT (activation and weight gradients);
the encoders run forward only. Elementwise work (norms, GELU, softmax, optimizer) is not counted, as in MFU conventions.
The tests check these formulas against torch.utils.flop_counter on real modules.
"""

from dataclasses import dataclass


@dataclass
class StepFlops:
    sit_forward: float
    projector_forward: float
    encoder_forward: float

    @property
    def train_step(self) -> float:
        """Per image: 3x (forward + backward) of SiT and projectors, plus the encoders' forward."""
        return 3 * (self.sit_forward + self.projector_forward) + self.encoder_forward

    @property
    def train_step_cached_targets(self) -> float:
        """Per image with ``--targets cached``: the encoders ran once, before training (data.cache_targets)."""
        return 3 * (self.sit_forward + self.projector_forward)

    @property
    def encoder_share(self) -> float:
        """Fraction of a step's FLOPs that ``--targets cached`` saves."""
        return self.encoder_forward / self.train_step


def vit_block_flops(tokens: int, dim: int, mlp_hidden: int) -> float:
    """One pre-norm transformer block on ``tokens`` tokens: qkv, proj, fc1, fc2 and attention."""
    linear = 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * mlp_hidden)
    attention = 4 * tokens * tokens * dim
    return linear + attention


def sit_forward_flops(
    depth: int, dim: int, tokens: int, patch: int, in_channels: int = 4, mlp_ratio: float = 4.0, freq_dim: int = 256
) -> float:
    """SiT forward per image, projectors excluded."""
    blocks = depth * vit_block_flops(tokens, dim, int(dim * mlp_ratio))
    patch_in = 2 * tokens * (in_channels * patch * patch) * dim
    final = 2 * tokens * dim * (patch * patch * in_channels)
    conditioning = 2 * (freq_dim * dim + dim * dim) + depth * 2 * dim * 6 * dim + 2 * dim * 2 * dim  # per image
    return blocks + patch_in + final + conditioning


def projector_flops(tokens: int, dim: int, projector_dim: int, z_dims) -> float:
    return sum(2 * tokens * (dim * projector_dim + projector_dim * projector_dim + projector_dim * z) for z in z_dims)


def dinov2_forward_flops(depth: int, dim: int, grid: int, registers: int = 0, swiglu_hidden: int = 0) -> float:
    """DINOv2 ViT/14 forward per image on a grid x grid patch grid (+ CLS and registers)."""
    tokens = grid * grid + 1 + registers
    mlp = 4 * dim
    blocks = depth * vit_block_flops(tokens, dim, mlp)
    if swiglu_hidden:  # w12: dim -> 2h, w3: h -> dim, instead of fc1/fc2
        blocks += depth * 2 * tokens * (dim * 2 * swiglu_hidden + swiglu_hidden * dim - 2 * dim * mlp)
    return blocks + 2 * grid * grid * (3 * 14 * 14) * dim


DINOV2_ARCH = {"s": (12, 384, 0), "b": (12, 768, 0), "l": (24, 1024, 0), "g": (40, 1536, 4096), "t": (4, 192, 0)}


def vit_encoder_forward_flops(depth: int, dim: int, patch: int, class_token: bool, grid: int = 16) -> float:
    """A plain ViT target encoder (MoCo v3, MAE, I-JEPA, CLIP, DINO v1) per image: patch conv and the blocks on
    grid*grid patches (+ CLS). MAE/CLIP skip the final norm, which is not counted anyway."""
    tokens = grid * grid + int(class_token)
    return depth * vit_block_flops(tokens, dim, 4 * dim) + 2 * grid * grid * (3 * patch * patch) * dim


def encoder_forward_flops(encoder: str, grid: int = 16, registers: int = 0) -> float:
    """Forward FLOPs per image of one target encoder: a DINOv2 size letter ("b") or an ``--enc-type`` name."""
    if encoder in DINOV2_ARCH:
        depth, dim, swiglu = DINOV2_ARCH[encoder]
        return dinov2_forward_flops(depth, dim, grid, registers, swiglu)
    from repa_fast.models.vit_encoders import SPECS  # lazy: this module stays import-light

    if encoder not in SPECS:
        raise ValueError(f"unknown encoder {encoder!r}: a DINOv2 size {sorted(DINOV2_ARCH)} or one of {sorted(SPECS)}")
    s = SPECS[encoder]
    return vit_encoder_forward_flops(s.depth, s.embed_dim, s.patch_size, s.class_token, grid)


def repa_step_flops(
    depth: int,
    dim: int,
    tokens: int,
    patch: int,
    z_dims=(768,),
    projector_dim: int = 2048,
    encoders=("b",),
    encoder_grid: int = 16,
    in_channels: int = 4,
    registers: int = 0,
) -> StepFlops:
    enc = sum(encoder_forward_flops(e, encoder_grid, registers) for e in encoders)
    return StepFlops(
        sit_forward_flops(depth, dim, tokens, patch, in_channels),
        projector_flops(tokens, dim, projector_dim, z_dims),
        enc,
    )
