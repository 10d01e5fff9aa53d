"""Analytic FLOPs of one REPA training step (matmul and attention FLOPs, 2 per multiply-add).

Counted: every Linear/Conv (forward 2*in*out per token), attention scores and values (4*T*D per token), in the SiT,
its projectors and the frozen encoders. Backward = 2x forward for the trainable SiT (activation and weight gradients);
the encoders run forward only. Elementwise work (norms, GELU, softmax, optimizer) is not counted, as in MFU conventions.
The tests check these formulas against torch.utils.flop_counter on real modules.
"""

from dataclasses import dataclass

from repa_fast.models.encoder_archs import EncoderArch, encoder_arch


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
        """Per image with ``--targets cached``: the encoders ran once, before training (tools/cache_targets.py)."""
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


def encoder_forward_flops(arch: EncoderArch, grid: int) -> float:
    """A ViT target encoder's forward per image on a grid x grid patch grid (+ the class token and registers).
    MAE and CLIP skip the final norm and I-JEPA has no class token; norms are not counted anyway."""
    tokens = grid * grid + int(arch.class_token) + arch.num_register_tokens
    dim, hidden = arch.embed_dim, arch.ffn_hidden
    blocks = arch.depth * vit_block_flops(tokens, dim, hidden)
    if arch.ffn == "swiglu":  # w12: dim -> 2h, w3: h -> dim, instead of fc1 dim -> h and fc2 h -> dim
        blocks += arch.depth * 2 * tokens * dim * hidden
    return blocks + 2 * grid * grid * (3 * arch.patch_size**2) * dim


def repa_step_flops(
    depth: int,
    dim: int,
    tokens: int,
    patch: int,
    z_dims=(768,),
    projector_dim: int = 2048,
    encoders=("dinov2-vit-b",),
    encoder_grid: int = 16,
    in_channels: int = 4,
) -> StepFlops:
    """Per-image FLOPs of one step; ``encoders`` are ``--enc-type`` names (rows of ``ENCODER_ARCHS``)."""
    enc = sum(encoder_forward_flops(encoder_arch(e), encoder_grid) for e in encoders)
    return StepFlops(
        sit_forward_flops(depth, dim, tokens, patch, in_channels),
        projector_flops(tokens, dim, projector_dim, z_dims),
        enc,
    )
