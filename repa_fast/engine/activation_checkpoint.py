"""Activation checkpointing of the SiT blocks, applied to the built model from outside (models/ never does it).

Modes (``AC_MODES``; ``parse_ac_mode`` reads the option string):

- ``"none"``: nothing is recomputed (and any checkpointing applied before is removed).
- ``"full"``: every block (torchtitan's FullAC, torchtitan/distributed/activation_checkpoint.py ``FullAC``). A block
  keeps only its inputs, the residual stream x (N, T, D) and the conditioning c (N, D), and runs its forward again
  in the backward pass.
- ``"mlp"``: the MLP sub-block of every block (fc1 - GELU - fc2): it keeps its input h (N, T, D) and recomputes its
  two (N, T, 4D) hidden activations; the attention sub-block and the adaLN ops keep theirs.
- ``"every:K"``: whole blocks K, 2K, 3K, ... (1-indexed), the others untouched: torchtitan's former layer-selective AC
  (``selective_ac_option=K``, torchtitan/distributed/activation_checkpoint.py:37-41 before pytorch/torchtitan#2357).
  ``every:1`` is ``full``.

How: the module's ``forward`` is replaced, on the instance, by one that runs its class's forward under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. There is no wrapper module, so the module tree,
``named_parameters()`` and the state-dict keys are those of the plain model: torch's ``checkpoint_wrapper``
(torch/distributed/algorithms/_checkpoint/checkpoint_wrapper.py) inserts ``_checkpoint_wrapped_module.`` into the
parameter names (its state-dict hooks strip it from the state dict only), which the optimizer's parameter names, the
EMA's name pairing and the phase freezing by name would see. ``copy.deepcopy`` (the EMA) copies the override bound
to the copy; under ``torch.no_grad`` a checkpointed forward runs once and saves nothing.

SiT blocks draw no random numbers (no dropout; label dropout happens before the blocks), so the recomputation is
the same computation on the same inputs: gradients are bitwise those of the plain model (tests/engine/
test_activation_checkpoint.py). The RNG state is still stashed (``preserve_rng_state=True``, torch's default) so that
a block with randomness would stay exact too.

Order, as in torchtitan (float8 conversion when the model is built; then torchtitan/models/llama3/parallelize.py:47-68:
activation checkpointing, compile, FSDP): ``engine.fp8.apply_fp8``, then ``apply_activation_checkpointing``,
then ``parallelize.apply_compile`` (``Module.compile`` of a block then compiles the checkpointed forward; dynamo
traces a non-reentrant checkpoint as one higher-order op), then ``backend.wrap``. Applying the same mode again is a
no-op, so the function can run at every recipe phase.
"""

import re
import types

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from repa_fast.errors import ConfigError

AC_MODES = ("none", "full", "mlp", "every:K")
_FLAG = "_repa_fast_checkpointed"  # set on a module whose forward this file replaced


def parse_ac_mode(mode: str) -> tuple[str, int]:
    """``"none"`` -> ("none", 0), ``"full"`` -> ("every", 1), ``"every:K"`` -> ("every", K), ``"mlp"`` -> ("mlp", 1);
    ConfigError naming the choices for anything else."""
    if mode == "none":
        return "none", 0
    if mode == "full":
        return "every", 1
    if mode == "mlp":
        return "mlp", 1
    m = re.fullmatch(r"every:([0-9]+)", mode) if isinstance(mode, str) else None
    if m and int(m.group(1)) >= 1:
        return "every", int(m.group(1))
    raise ConfigError(
        f"activation checkpointing mode {mode!r} is not one of none, full, mlp, every:K with K >= 1 an integer "
        "(--activation-checkpointing; every:K checkpoints blocks K, 2K, ...)"
    )


def checkpointed_modules(model: nn.Module, mode: str) -> list[str]:
    """Names of the modules ``mode`` checkpoints in ``model`` (a SiT: ``blocks.i`` or ``blocks.i.mlp``)."""
    kind, k = parse_ac_mode(mode)
    if kind == "none":
        return []
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"activation checkpointing needs a model with .blocks (a SiT); got {type(model).__name__}")
    if kind == "mlp":
        return [f"blocks.{i}.mlp" for i in range(len(blocks))]
    return [f"blocks.{i}" for i in range(len(blocks)) if (i + 1) % k == 0]


def apply_activation_checkpointing(model: nn.Module, mode: str = "none") -> list[str]:
    """Checkpoint the modules ``mode`` names (see the module docstring), in place; returns their names.

    Modules checkpointed before and not named by ``mode`` go back to their plain forward, so the result depends only
    on ``mode``; modules already checkpointed keep their (same) forward, so a compiled block is not invalidated.
    """
    wanted = set(checkpointed_modules(model, mode))
    for name, module in model.named_modules():
        if name in wanted and not getattr(module, _FLAG, False):
            module.forward = types.MethodType(_checkpointed_forward, module)
            setattr(module, _FLAG, True)
        elif name not in wanted and getattr(module, _FLAG, False):
            del module.forward  # the class's forward again
            delattr(module, _FLAG)
    return sorted(wanted, key=_natural_key)


def is_checkpointed(module: nn.Module) -> bool:
    return bool(getattr(module, _FLAG, False))


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # The class's forward, not ``self.forward``: that is this function. Hooks on ``self`` ran once in __call__.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
