"""fp8 training of the SiT blocks' Linear layers with torchao's float8 training (torchao/float8/), from outside the
model, in the manner of torchtitan's Float8LinearConverter (torchtitan/components/quantization/float8.py).

What is converted: the token GEMMs of every block, ``blocks.i.attn.qkv``, ``blocks.i.attn.proj``, ``blocks.i.mlp.fc1``
and ``blocks.i.mlp.fc2`` (24 T D^2 of the block's 24 T D^2 + 12 D^2 FLOPs per image), each ``nn.Linear`` becoming a
``torchao.float8.float8_linear.Float8Linear`` with the same ``weight`` and ``bias`` parameters (state-dict keys and
checkpoints unchanged). What stays an ordinary ``nn.Linear`` (bf16 under the trainer's autocast): everything outside
the blocks (x/t/y embedders, final layer incl. REG's ``linear_cls``, REPA's and iREPA's projectors, REG's
``cls_projectors2``; iREPA's conv projector and the patch embedding are convolutions, which torchao never touches),
any Linear whose in or out features are not multiples of 16 (``torch._scaled_mm`` needs them), and by default the
blocks' ``adaLN_modulation`` Linear: it multiplies (B, D) by (D, 6D), 12 D^2 FLOPs per image (0.2% of a block at
T = 256), so it is bound by reading its weight, which fp8 reads more often (the amax and cast passes), and its
grad-weight GEMM has the batch B as inner dimension. ``adaln=True`` converts it too.

Recipes (``FP8_RECIPES``; torchao's ``Float8LinearConfig.from_recipe_name``): ``"tensorwise"``, one dynamic scale per
tensor, input and weight in e4m3 and gradients in e5m2 (cuBLAS's tensorwise kernel); ``"rowwise"``, one scale per
row of each GEMM operand, all e4m3, scales rounded down to powers of two (CUTLASS's rowwise kernel). Scales are
dynamic (amax of the current tensor), so no state is added to the model or its checkpoints.

Inner dimensions: the grad-weight GEMM of a token Linear contracts over the B x T rows, which ``torch._scaled_mm``
needs to be a multiple of 16; with REG's class token T = 1 + 256 (and with ``adaln=True``, B rows), so then torchao's
``pad_inner_dim`` is turned on (zero padding; a no-op copy when the rows happen to be aligned).

Order and compile: torchao's fp8 is only fast under torch.compile (the amax, scale and cast fuse into a few kernels
around ``_scaled_mm``). Convert first, then apply activation checkpointing, then compile each block, then wrap for the
backend: torchtitan's order (its float8 converter rewrites the model when it is built, before parallelize;
torchtitan/models/llama3/parallelize.py:47-68 then applies AC, compiles each block "after AC wrapping and before
FSDP", and shards). ``emulate=True`` (tests, CPU) computes the GEMMs in fp32 from the fp8-rounded operands, same
rounding and scales as the hardware path; torchtitan notes it is not meant for torch.compile.

Capability: ``fp8_supported(device)`` (a function, never an import-time constant) and ``check_fp8(device)`` (the
project's errors). fp8 tensor cores are NVIDIA compute capability 8.9+ (Ada, Hopper, Blackwell).
"""

import dataclasses
import logging

import torch
import torch.nn as nn

from repa_fast.errors import ConfigError, require
from repa_fast.kernels.attention import cuda_capability

logger = logging.getLogger("repa_fast")

FP8_RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)
_TOKEN_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_ADALN_LINEAR = "adaLN_modulation.1"


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)


def _torchao_float8():
    return require("torchao.float8", "fp8", "--fp8", package="torchao")


def fp8_supported(device=None) -> bool:
    """True when ``device`` (default: the current CUDA device) is an NVIDIA GPU of compute capability 8.9+ and torchao's
    float8 training imports."""
    device = _device(device)
    if not torch.cuda.is_available() or cuda_capability(device) is None:
        return False
    if cuda_capability(device) < MIN_CAPABILITY:
        return False
    try:
        _torchao_float8()
    except ImportError:
        return False
    return True


def check_fp8(device=None) -> None:
    """ConfigError naming the GPU that fp8 needs and the one found; MissingDependency (``pip install
    'repa_fast[fp8]'``) when the GPU is fine but torchao is missing."""
    device = _device(device)
    need = "--fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada L4/L40/RTX 40xx, Hopper H100/H200, "
    need += "Blackwell) for fp8 tensor cores"
    if not torch.cuda.is_available() or cuda_capability(device) is None:
        why = "no CUDA" if not torch.cuda.is_available() else "not a CUDA device"
        raise ConfigError(f"{need}; this run's device is {device} ({why}). Train without --fp8 (bf16).")
    cap = cuda_capability(device)
    if cap < MIN_CAPABILITY:
        try:
            name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError, AttributeError):
            name = "a CUDA GPU"
        raise ConfigError(f"{need}; found {name} (sm_{cap[0]}{cap[1]}). Train without --fp8 (bf16).")
    _torchao_float8()  # MissingDependency: pip install 'repa_fast[fp8]'


def fp8_module_filter(module: nn.Module, fqn: str, adaln: bool = False) -> bool:
    """Whether ``apply_fp8`` converts the module named ``fqn``: an ``nn.Linear`` (not already fp8) inside
    ``blocks.<i>.`` among the token Linears (and the adaLN one with ``adaln``), in and out features multiples of 16."""
    if type(module) is not nn.Linear:  # Float8Linear subclasses nn.Linear: never converted twice
        return False
    parts = fqn.split(".", 2)
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return False
    if parts[2] not in _TOKEN_LINEARS + ((_ADALN_LINEAR,) if adaln else ()):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_config(recipe: str, *, pad_inner_dim: bool = False, emulate: bool = False):
    """torchao's ``Float8LinearConfig`` of ``recipe`` ("tensorwise" | "rowwise")."""
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8 recipe {recipe!r} is not one of {FP8_RECIPES} (--fp8)")
    config = _torchao_float8().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, pad_inner_dim=pad_inner_dim, emulate=emulate)


def apply_fp8(
    model: nn.Module,
    recipe: str = "tensorwise",
    *,
    adaln: bool = False,
    auto_filter: bool = False,
    emulate: bool = False,
    device=None,
) -> list[str]:
    """Convert the SiT blocks' Linear layers to torchao ``Float8Linear`` in place; returns the names of the model's
    fp8 Linear layers (idempotent: a second call converts nothing more and returns the same list).

    ``auto_filter`` also applies torchao's H100 size heuristics (``torchao.float8._auto_filter_for_recipe``: skips
    shapes measured not to gain). ``emulate`` is torchao's CPU emulation (tests); without it the device (``device``,
    default the model's) must pass ``check_fp8``.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8 recipe {recipe!r} is not one of {FP8_RECIPES} (--fp8)")
    if not emulate:
        check_fp8(device if device is not None else next(model.parameters()).device)
    ao = _torchao_float8()
    tokens = model.pos_embed.shape[1]  # T, or 1 + T with REG's class token
    config = fp8_config(recipe, pad_inner_dim=adaln or tokens % 16 != 0, emulate=emulate)
    auto = ao._auto_filter_for_recipe(recipe, filter_fqns=[]) if auto_filter else None

    def keep(module, fqn):
        return fp8_module_filter(module, fqn, adaln) and (auto is None or auto(module, fqn))

    if recipe == "rowwise" and not emulate:
        # torchtitan's workaround (pytorch/torchtitan#1108, pytorch/pytorch#150859): inductor's fused bf16 casts made
        # rowwise scales differ between the forward and an activation-checkpointing recompute. Process-wide.
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
    ao.convert_to_float8_training(model, module_filter_fn=keep, config=config)
    names = fp8_linear_names(model)
    logger.info("fp8 %s: %d Linear layers in fp8, the rest in high precision", recipe, len(names))
    return names


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the model's torchao Float8Linear modules (none when torchao is not installed: nothing converted)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]


def remove_fp8(model: nn.Module) -> list[str]:
    """Turn every Float8Linear back into an ``nn.Linear`` holding the same parameters, in place (for a copy that
    samples or exports in high precision, e.g. the EMA); returns the names changed."""
    names = fp8_linear_names(model)
    for name in names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight, new.bias = old.weight, old.bias
        new.train(old.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return names
