"""The documented import paths work, as users import the reference's (``from models.sit import SiT_models``),
and stay lazy: importing the package does not import torch-heavy modules before a name is used."""

import subprocess
import sys

import pytest


def test_public_names_resolve_to_the_implementations():
    import repa_fast
    from repa_fast import training_loss
    from repa_fast.models import ENCODER_ARCHS, SiT_models, load_encoders
    from repa_fast.models.encoders import load_encoders as encoders_load
    from repa_fast.models.sit import SiT_models as sit_models
    from repa_fast.objective import training_loss as objective_loss

    assert training_loss is objective_loss and load_encoders is encoders_load and SiT_models is sit_models
    assert "SiT-XL/2" in SiT_models and ENCODER_ARCHS["dinov2-vit-b"].embed_dim == 768
    assert {"training_loss", "__version__"} <= set(dir(repa_fast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        repa_fast.nope  # noqa: B018


def test_imports_are_lazy():
    code = (
        "import sys, repa_fast, repa_fast.models; from repa_fast.models import ENCODER_ARCHS; "
        "print(sorted(m for m in ('torch', 'repa_fast.objective', 'repa_fast.models.sit') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
