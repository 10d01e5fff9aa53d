"""Models, imported as users import the reference's (``from models.sit import SiT_models``):

    from repa_fast.models import SiT_models, load_encoders

Names resolve lazily (PEP 562), so ``import repa_fast.models`` stays cheap and the torch-free tables
(``ENCODER_ARCHS``) import without torch.
"""

import importlib

_EXPORTS = {
    "SiT": "sit",
    "SiT_models": "sit",
    "SIT_SIZES": "sit",
    "build_sit": "sit",
    "parse_model_name": "sit",
    "load_encoders": "encoders",
    "build_encoder": "encoders",
    "EncoderArch": "encoder_archs",
    "ENCODER_ARCHS": "encoder_archs",
    "encoder_arch": "encoder_archs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'repa_fast.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
