"""repa_fast: fast, faithful REPA / ERW training of SiT diffusion transformers.

Public names (resolved lazily, so ``import repa_fast`` does not import torch):

    from repa_fast import training_loss          # the REPA loss on one batch (repa_fast.objective)
    from repa_fast import load_weights           # any supported checkpoint, strictly into a built SiT
    from repa_fast.models import SiT_models, load_encoders
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "training_loss": "objective",
    "interpolant": "objective",
    "sample_time": "objective",
    "SiT_models": "models",
    "load_encoders": "models",
    "load_weights": "engine.adapters.load",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'repa_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
