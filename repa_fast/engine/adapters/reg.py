"""REG's files (Martinser/REG): the reference's container with REG's class-token weights and its ``--cls`` flag.

    REG train.py     ``{"model", "ema", "opt", "args": Namespace, "steps"}`` (REG train.py:341-349), the model a REG
                     SiT: REPA's keys plus ``cls_projectors2``, ``wg_norm``, ``final_layer.linear_cls`` and a
                     (1, 1 + T, D) ``pos_embed`` (REG models/sit.py:208-223); the saved flags add ``--cls`` (the
                     class-token loss weight, train.py:436) and ``--ops-head`` (parsed, unused)
    REG weights      a bare REG state dict or ``{"ema": ...}`` (REG generate.py:84 reads ``['ema']``)
The keys are ours already (repa_fast's ``reg=True`` SiT has REG's names and shapes, docs/methods.md §REG): the
format is told apart by its keys, and it states ``reg`` (its class-token weights) besides REPA's options.
"""

from .base import StateDictAdapter, main_weights
from .repa import REPA_ARCH_KEYS

REG_KEYS = ("cls_projectors2.weight", "wg_norm.weight", "final_layer.linear_cls.weight")  # REG models/sit.py:146-223


def is_reg_state(sd: dict) -> bool:
    return any(k.removeprefix("module.") in REG_KEYS for k in sd)


class REGTrain(StateDictAdapter):
    """A REG train.py checkpoint (or REG weights alone), recognised by the class-token weights."""

    name = "reg"
    layout = "Martinser/REG train.py:341-349, models/sit.py:208-223"
    config_keys = REPA_ARCH_KEYS + ("cls",)

    def detect(self, obj) -> bool:
        weights = main_weights(obj)
        return weights is not None and is_reg_state(weights)

    def config(self, args: dict) -> dict:
        return {"reg": True, **super().config(args)}  # REG's train.py always trains REG
