"""The frozen target encoder's forward (no autograd) as kernels: preprocessing, patch embedding, ViT blocks.

``encoder="ours"`` prices models/dinov2.py (``preprocess``: /255, normalise, bicubic resize; ``prepare_tokens``;
blocks with LayerScale; attention through kernels/attention.py). ``encoder="hub"`` prices the torch.hub DINOv2 the
reference loads (sihyun-yu/REPA utils.py ``load_encoders``, train.py ``preprocess_raw_image``): torchvision's
Normalize (a clone, then in-place sub and div), the position table interpolated from its 37 x 37 grid at every
forward (dinov2/models/vision_transformer.py ``interpolate_pos_encoding``) and, without xformers, the explicit
attention of dinov2/layers/attention.py ``Attention.forward`` (``math_attention_forward``). Every op belongs to the
``encoder`` part of the step; ``--targets cached`` replaces all of it with one cast of the stored rows.
"""

from dataclasses import replace

from repa_fast.cost.attention import attention_flops, padding_factor
from repa_fast.cost.ops import F32, Linear, Op, cast, ew, times
from repa_fast.cost.sit import Policy, math_attention_forward
from repa_fast.cost.structure import StepStructure
from repa_fast.flops import encoder_tokens
from repa_fast.models.encoder_archs import EncoderArch

HUB_POS_GRID = 37  # the released DINOv2 position tables are for 518 px / 14 = 37 patches a side


def _preprocess(st: StepStructure, B: int, resolution: int, side: int) -> list[Op]:
    P, Q = B * 3 * resolution * resolution, B * 3 * side * side
    ops = [ew("enc.div255", P, 4 * P)]
    if st.encoder == "hub":  # torchvision Normalize(inplace=False): clone, sub_, div_ (+ mean/std copied to the GPU)
        ops += [ew("enc.normalize.clone", 4 * P, 4 * P), ew("enc.mean.h2d", 0, 12), ew("enc.std.h2d", 0, 12)]
        ops += [ew("enc.sub_", 4 * P + 12, 4 * P), ew("enc.div_", 4 * P + 12, 4 * P)]
    else:
        ops += [ew("enc.sub", 4 * P + 12, 4 * P), ew("enc.div", 4 * P + 12, 4 * P)]
    return ops + [ew("enc.bicubic", 4 * P, 4 * Q)]


def _attention(st: StepStructure, arch: EncoderArch, B: int, tokens: int, a: int, policy: Policy) -> list[Op]:
    D, MD = arch.embed_dim, B * tokens * arch.embed_dim
    if st.encoder_attn == "math" or st.encoder == "hub":
        return math_attention_forward("enc.attn", B, arch.num_heads, tokens, D, a, policy)
    useful = attention_flops(tokens, D, B, forward_only=True)
    pad = padding_factor(st.encoder_attn, D // arch.num_heads, tokens)
    lse = 4 * B * arch.num_heads * tokens
    return [Op("attention", "enc.attn", 3 * a * MD, a * MD + lse, flops=useful * pad, rate=f"attn:{st.encoder_attn}")]


def _block(st: StepStructure, arch: EncoderArch, B: int, tokens: int, policy: Policy) -> list[Op]:
    a, D, M = st.amp_bytes, arch.embed_dim, B * tokens
    MD, h = M * D, arch.ffn_hidden
    weights = "bf16_copy" if st.encoder_weights == "amp" else "fp32"

    def lin(name, k, n, x_bytes):
        return Linear(name, M, k, n, a, x_bytes, need_dx=False, save_x=False, weights=weights).forward()

    ln = [ew("enc.ln", 4 * MD + 8 * D, 4 * MD + 8 * M)]
    ls = [ew("enc.layerscale", a * MD + 4 * D, 4 * MD), ew("enc.residual", 8 * MD, 4 * MD)]
    if arch.ffn == "swiglu":
        ffn = lin("enc.w12", D, 2 * h, F32) + [
            ew("enc.silu", a * M * h * 2, a * M * h),
            ew("enc.glu", 2 * a * M * h, a * M * h),
        ]
        ffn += lin("enc.w3", h, D, a)
    else:
        ffn = lin("enc.fc1", D, h, F32) + [ew("enc.gelu", a * M * h, a * M * h)] + lin("enc.fc2", h, D, a)
    attn = lin("enc.qkv", D, 3 * D, F32) + _attention(st, arch, B, tokens, a, policy) + lin("enc.proj", D, D, a)
    return ln + attn + ls + ln + ffn + ls


def encoder_ops(st: StepStructure, arch: EncoderArch, B: int, resolution: int, grid: int, policy: Policy) -> list:
    """The forward of one target encoder at ``B`` images of ``resolution`` px on a ``grid`` x ``grid`` patch grid."""
    a, D = st.amp_bytes, arch.embed_dim
    tokens, side = encoder_tokens(arch, grid), arch.patch_size * grid
    weights = "bf16_copy" if st.encoder_weights == "amp" else "fp32"
    patches = B * grid * grid
    conv = Linear("enc.patch_embed", patches, 3 * arch.patch_size**2, D, a, F32, need_dx=False, weights=weights)
    ops = _preprocess(st, B, resolution, side) + conv.forward()
    ops += cast("enc.tokens.to_fp32", patches * D, a, F32)
    ops.append(ew("enc.cat_cls", 4 * D + 4 * patches * D, 4 * B * tokens * D))
    if st.encoder == "hub":
        table = 4 * HUB_POS_GRID**2 * D
        ops += [
            ew("enc.pos.bicubic", table, 4 * grid * grid * D),
            ew("enc.pos.cat", 4 * D + 4 * grid * grid * D, 4 * tokens * D),
        ]
    ops.append(ew("enc.pos.add", 4 * B * tokens * D + 4 * tokens * D, 4 * B * tokens * D))
    ops += times(_block(st, arch, B, tokens, policy), arch.depth)
    ops.append(ew("enc.norm", 4 * B * tokens * D + 8 * D, 4 * B * tokens * D + 8 * B * tokens))
    return [replace(o, part="encoder", saved=0.0) for o in ops]


def cached_target_ops(st: StepStructure, B: int, tokens: int, z_dims, stored_bytes: int = 2) -> list[Op]:
    """``--targets cached``: the loader's rows (fp16 by default) cast to fp32 on the GPU (trainer.micro_step)."""
    return [op for z in z_dims for op in cast("targets.to_fp32", B * tokens * z, stored_bytes, F32, "encoder")]
