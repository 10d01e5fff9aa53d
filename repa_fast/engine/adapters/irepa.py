"""iREPA's files (End2End-Diffusion/iREPA, its ``ldm/`` code): the reference's container with iREPA's flags.

    iREPA train.py   ``{"model", "ema", "opt", "args": Namespace, "steps"}`` (ldm/train.py:362-372; the model saved
                     from ``_orig_mod`` when compiled), projectors ``projectors.k.projection_layer.*``
                     (ldm/models/sit.py:36-79): a Linear or Conv2d(D, z, k, padding k // 2) for "linear" / "conv",
                     the MLP's ``projection_layer.{0,2,4}`` for "mlp"
Saved flags read (ldm/train.py:436-489): ``projection_layer_type``, ``proj_kwargs_kernel_size`` (default **1** in
its train.py, 3 in its model and README: the file's value is what built its weights, docs/methods.md §iREPA),
``spnorm_method``, ``zscore_alpha``, ``proj_coeff`` (a string in iREPA's parser, read as a number).
Mapping: iREPA's "mlp" keys ``projectors.k.projection_layer.{0,2,4}`` -> REPA's ``projectors.k.{0,2,4}`` (repa_fast's
mlp keeps REPA's names); a leftover ``_orig_mod.`` (torch.compile) prefix is dropped.
"""

import re

from .base import StateDictAdapter, is_train_layout, main_weights, saved_args
from .repa import REPA_ARCH_KEYS

IREPA_FLAGS = ("projection_layer_type", "proj_kwargs_kernel_size", "spnorm_method", "zscore_alpha")
_MLP_KEY = re.compile(r"^(projectors\.\d+\.)projection_layer\.(\d+\.)")
COMPILE_PREFIX = "_orig_mod."


class IREPATrain(StateDictAdapter):
    """An iREPA train.py checkpoint (told apart by its saved flags), or iREPA weights (``projection_layer`` keys)."""

    name = "irepa"
    layout = "End2End-Diffusion/iREPA ldm/train.py:362-372, ldm/models/sit.py:36-79"
    config_keys = REPA_ARCH_KEYS + IREPA_FLAGS

    def detect(self, obj) -> bool:
        if is_train_layout(obj) and set(IREPA_FLAGS) & set(saved_args(obj)):
            return True
        weights = main_weights(obj)
        return weights is not None and any(".projection_layer." in k for k in weights)

    def to_ours(self, sd: dict) -> tuple[dict, list[str]]:
        sd = {_MLP_KEY.sub(r"\1\2", k.removeprefix(COMPILE_PREFIX)): v for k, v in sd.items()}
        return super().to_ours(sd)

    def config(self, args: dict) -> dict:
        out = super().config(args)
        if "proj_coeff" in args:  # a string in iREPA's parser (ldm/train.py:477: comma-separated per encoder)
            try:
                out["proj_coeff"] = float(str(args["proj_coeff"]).split(",")[0])
            except ValueError:
                pass
        return out
