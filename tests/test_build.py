"""Every entry point that builds from a config builds the same SiT and target encoders (repa_fast/build.py).

One config (a 32 px REPA-layout set, SiT-T/2, a random-weight DINOv2-T target, ``--kernels ref``: the switch whose
mapping drifted) goes through training (``engine.trainer.train``), the target-cache writer (``tools.cache_targets``),
layer features (``eval.layer_features.collect_layer_features`` on the trained run) and ``bench/throughput.py``. Every
``SiT.__init__`` and every ``load_encoders`` call is recorded with its arguments bound to the signature (defaults
filled in, so ``f(a)`` and ``f(a, b=default)`` compare equal), and the records must be equal. The in-training
evaluation builds neither: it samples the EMA model the loop hands it.

This comparison fails on layer_features as it was before commit 8aa1ace, which called ``load_encoders`` itself
without the ``--kernels`` -> ``attn_backend`` mapping of ``build.encoder_kwargs``
(``git show 8aa1ace~1:repa_fast/eval/layer_features.py``, lines 86-93): ``test_the_old_layer_features_call_is_caught``
replays that call through the same recorder and checks that the comparison tells it apart (attention "auto" where
training used "sdpa").
"""

import functools
import inspect
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from repa_fast.models import encoders as encoders_mod
from repa_fast.models.sit import SiT
from tests.data.helpers import make_ref_dataset

from .engine.helpers import REPO, tiny_cfg

N = 16
RUN = ["--dataset", "auto", "--resolution", "32", "--num-classes", "5", "--model", "SiT-T/2", "--encoder-grid", "2"]
RUN += ["--latent-scale", "0.18215", "--mixed-precision", "no", "--batch-size", "4", "--kernels", "ref"]
RUN += ["--enc-type", "dinov2-vit-t", "--no-encoder-pretrained"]
ENTRY_POINTS = ("cache writer", "layer features", "bench")


def _bound(fn, args, kwargs) -> dict:
    """The call's arguments by parameter name, defaults filled in; devices as text."""
    call = inspect.signature(fn).bind(*args, **kwargs)
    call.apply_defaults()
    out = dict(call.arguments)
    out.pop("self", None)
    if out.get("device") is not None:
        out["device"] = str(torch.device(out["device"]))
    return out


class Recorder:
    """Records SiT constructions and load_encoders calls under the label of the entry point that runs."""

    def __init__(self):
        self.label, self.sit, self.encoders = None, {}, {}

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real_init, real_load = SiT.__init__, encoders_mod.load_encoders

        @functools.wraps(real_init)
        def init(model, *args, **kwargs):
            self.sit.setdefault(self.label, []).append(_bound(real_init, (model, *args), kwargs))
            real_init(model, *args, **kwargs)

        @functools.wraps(real_load)
        def load(*args, **kwargs):
            self.encoders.setdefault(self.label, []).append(_bound(real_load, args, kwargs))
            return real_load(*args, **kwargs)

        mp.setattr(SiT, "__init__", init)
        for module in list(sys.modules.values()):  # every module that bound the name (build.py does, at import)
            if getattr(module, "load_encoders", None) is real_load:
                mp.setattr(module, "load_encoders", load)


def _old_layer_features_encoder(cfg, resolution: int, device):
    """The target-encoder call of eval/layer_features.py before commit 8aa1ace, verbatim but for the names."""
    return encoders_mod.load_encoders(
        cfg.target.enc_type.split(",")[0],
        resolution,
        cfg.target.encoder_checkpoint_dir,
        grid=cfg.target.encoder_grid,
        pretrained=cfg.target.encoder_pretrained,
        device=device,
    )


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from repa_fast.engine.trainer import train
    from repa_fast.eval.layer_features import collect_layer_features
    from repa_fast.tools import cache_targets as ct

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import throughput

    root = tmp_path_factory.mktemp("build")
    data = root / "data"
    make_ref_dataset(str(data), range(N), resolution=32, latent_shape=(8, 4, 4), num_classes=5, seed=3)
    cfg = tiny_cfg(root / "out", "--data-dir", data, *RUN, steps=1, ckpt_every=1)
    rec = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        rec.install(mp)
        rec.label = "training"
        run_dir = train(cfg)["run_dir"]
        rec.label = "cache writer"
        ct.cache_targets(str(data), "dinov2-vit-t", out=str(root / "targets"), num_classes=5, encoder_grid=2,
                         encoder_pretrained=False, kernels="ref", batch_size=4, workers=0)  # fmt: skip
        rec.label = "layer features"
        args = SimpleNamespace(ckpt=run_dir, weights="ema", t=0.5, num_images=4, batch_size=4, enc_type=None,
                               encoder_checkpoint_dir=None, seed=0, out=str(root / "eval"))  # fmt: skip
        collect_layer_features(args)
        rec.label = "bench"
        throughput.models_from_config(cfg, torch.device("cpu"))
        rec.label = "old layer features"
        _old_layer_features_encoder(cfg, 32, torch.device("cpu"))
    return rec


def test_training_maps_the_config_to_the_constructors(records):
    (enc,) = records.encoders["training"]
    (sit,) = records.sit["training"]
    assert enc["enc_type"] == "dinov2-vit-t" and enc["attn_backend"] == "sdpa"  # --kernels ref: plain SDPA
    assert enc["grid"] == 2 and enc["pretrained"] is False and enc["resolution"] == 32
    assert sit["impl"] == "ref" and sit["input_size"] == 4 and sit["num_classes"] == 5 and sit["z_dims"] == [192]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_builds_the_encoders_as_training(records, entry):
    assert records.encoders[entry] == records.encoders["training"]


def test_bench_builds_the_sit_as_training(records):
    assert records.sit["bench"] == records.sit["training"]
    assert "cache writer" not in records.sit  # the cache writer builds no SiT


def test_layer_features_builds_the_sit_as_training(records):
    assert records.sit["layer features"] == records.sit["training"]


def test_the_old_layer_features_call_is_caught(records):
    (old,) = records.encoders["old layer features"]
    (new,) = records.encoders["training"]
    assert records.encoders["old layer features"] != records.encoders["training"]
    assert {k: (old[k], new[k]) for k in new if old[k] != new[k]} == {"attn_backend": ("auto", "sdpa")}
