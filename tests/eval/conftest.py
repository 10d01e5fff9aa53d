"""A quickly trained digits feature network, cached once per session (the demo's stand-in for Inception)."""

import os

import pytest
from safetensors.torch import save_file

from repa_fast.eval.digits import FILE, train_digits_classifier


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A --cache-dir holding a digits classifier trained for 2 epochs (enough to give structured features)."""
    d = tmp_path_factory.mktemp("eval_cache")
    net, _ = train_digits_classifier(epochs=2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(d, FILE))
    return str(d)
