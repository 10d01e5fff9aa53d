"""DALI loader (CPU pipeline): the DataLoader's batches in the sampler's order, on 1 and 2 ranks, across epochs and
after a resume; corrupt files named; the GPU/GDS gates and the --loader choice."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from repa_fast.config import ConfigError
from repa_fast.data import DataError, ResumableDistributedSampler, open_dataset
from repa_fast.data import dali_loader as dl
from repa_fast.tools.pack import pack

from ..engine.helpers import tiny_cfg
from .helpers import feature_path, image_path, make_ref_dataset

pytest.importorskip("nvidia.dali")

N, GLOBAL = 22, 8  # 2 full global batches per epoch, 6 samples dropped at each epoch's end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali") / "data"
    make_ref_dataset(str(root), range(N), resolution=24, latent_shape=(8, 3, 3), num_classes=5, seed=3)
    return root


def _run(loader, sampler, steps: int, accum: int) -> list:
    """The training loop's use of a loader: ``accum`` micro-batches per step, advance(), re-iterate at epoch end."""
    out, it = [], iter(loader)
    for _ in range(steps):
        for _ in range(accum):
            batch = next(it, None)
            if batch is None:
                it = iter(loader)
                batch = next(it)
            out.append(batch)
        sampler.advance()
    return out


def _loaders(ds, rank, world, micro, seed=5):
    samplers = [ResumableDistributedSampler(len(ds), GLOBAL, rank=rank, world_size=world, seed=seed) for _ in "ab"]
    torch_loader = DataLoader(ds, batch_size=micro, sampler=samplers[0], drop_last=True)
    dali = dl.DALILoader(ds, samplers[1], micro, device="cpu", num_threads=2)
    return samplers, torch_loader, dali


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):  # images, moments, labels
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 2), (2, 1)])
def test_same_batches_and_order_as_the_dataloader_across_epochs_and_resume(data, world, accum):
    ds = open_dataset(str(data), num_classes=5)
    micro = GLOBAL // world // accum
    for rank in range(world):
        (s_t, s_d), torch_loader, dali = _loaders(ds, rank, world, micro)
        want = _run(torch_loader, s_t, 5, accum)  # 2.5 epochs: two epoch boundaries
        got = _run(dali, s_d, 3, accum)
        # Resume mid-epoch (epoch 1, one global batch in) with a fresh sampler and loader, as from a checkpoint.
        state = json.loads(json.dumps(s_d.state_dict()))
        assert (state["epoch"], state["consumed"]) == (1, GLOBAL)
        (_, s_r), _, resumed = _loaders(ds, rank, world, micro)
        s_r.load_state_dict(state)
        got += _run(resumed, s_r, 2, accum)
        _assert_same(got, want)
        # Order: the sampler's permutation for this rank, and the images are not all alike.
        labels = torch.cat([b[2] for b in got[: 2 * accum]])
        perm = ResumableDistributedSampler(N, GLOBAL, rank=rank, world_size=world, seed=5).local_indices()
        assert labels.tolist() == [int(ds.labels[i]) for i in perm]
        assert got[0][0].float().std() > 10 and got[0][0].dtype == torch.uint8 and got[0][1].dtype == torch.float32


def test_float16_moments_are_widened_like_the_dataloader(tmp_path):
    make_ref_dataset(str(tmp_path), range(8), resolution=16, latent_shape=(8, 2, 2), moments_dtype=np.float16)
    ds = open_dataset(str(tmp_path), num_classes=5)
    s_t = ResumableDistributedSampler(8, 4, seed=1)
    s_d = ResumableDistributedSampler(8, 4, seed=1)
    want = list(DataLoader(ds, batch_size=4, sampler=s_t, drop_last=True))
    _assert_same(list(dl.DALILoader(ds, s_d, 4, device="cpu", num_threads=1)), want)


@pytest.mark.parametrize("broken", ["image", "moments"])
def test_corrupt_file_is_named_as_by_the_dataloader(data, tmp_path, broken):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    ds = open_dataset(str(root), num_classes=5)
    sampler = ResumableDistributedSampler(N, GLOBAL, seed=5)
    victim = int(sampler.local_indices()[5])  # in the second micro-batch of 4
    path = image_path(root, victim) if broken == "image" else feature_path(root, victim)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError) as from_torch:
        list(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True))
    with pytest.raises(DataError) as from_dali:
        list(dl.DALILoader(ds, sampler, 4, device="cpu", num_threads=2))
    assert str(path) in str(from_dali.value) and str(from_dali.value) == str(from_torch.value)


def test_gpu_decoding_and_gds_gates(monkeypatch):
    cuda = torch.device("cuda", 1)
    assert dl.pipeline_devices(torch.device("cpu")) == {
        "device_id": None,
        "decoder": "cpu",
        "numpy": "cpu",
        "output": "cpu",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dl.ctypes.util, "find_library", lambda name: None)
    assert dl.pipeline_devices(cuda) == {"device_id": 1, "decoder": "mixed", "numpy": "cpu", "output": "gpu"}
    monkeypatch.setattr(dl.ctypes.util, "find_library", lambda name: "libcufile.so.0" if name == "cufile" else None)
    assert dl.pipeline_devices(cuda)["numpy"] == "gpu" and dl.gds_available(cuda)
    assert not dl.gds_available(torch.device("cpu"))  # GDS needs the GPU path, whatever the library says
    monkeypatch.setattr(dl, "dali_available", lambda: False)
    assert not dl.dali_gpu_available(cuda) and dl.pipeline_devices(cuda)["decoder"] == "cpu"


def test_choose_loader_auto_logs_why_and_dali_refuses_what_it_cannot_read(data, tmp_path, monkeypatch, caplog):
    ds = open_dataset(str(data), num_classes=5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    with caplog.at_level(logging.INFO, logger="repa_fast.data.dali_loader"):
        assert dl.choose_loader("auto", ds, cpu) == "dataloader"
    assert "not CUDA" in caplog.text
    assert dl.choose_loader("dali", ds, cpu) == "dali"  # CPU pipeline on request
    assert dl.choose_loader("dataloader", ds, cuda) == "dataloader"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dl.choose_loader("auto", ds, cuda) == "dali"
    packed = tmp_path / "packed"
    pack(str(data), str(packed), num_classes=5, progress=False, workers=0)
    packed_ds = open_dataset(str(packed), num_classes=5)
    assert dl.choose_loader("auto", packed_ds, cuda) == "dataloader"
    with pytest.raises(ConfigError, match="--loader dali: PackedDataset"):
        dl.choose_loader("dali", packed_ds, cuda)
    monkeypatch.setattr(dl, "dali_available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repa_fast.data.dali_loader"):
        assert dl.choose_loader("auto", ds, cuda) == "dataloader"
    assert "repa_fast[dali]" in caplog.text
    with pytest.raises(ConfigError, match=r"pip install 'repa_fast\[dali\]'"):
        dl.choose_loader("dali", ds, cuda)


def test_training_with_dali_logs_the_same_losses(tmp_path):
    from repa_fast.engine.trainer import train

    make_ref_dataset(str(tmp_path / "d"), range(10), resolution=32, latent_shape=(8, 4, 4), num_classes=5)
    args = ["--data-dir", tmp_path / "d", "--resolution", "32", "--num-classes", "5", "--model", "SiT-T/2"]
    args += ["--dataset", "auto", "--encoder-grid", "2", "--mixed-precision", "no", "--batch-size", "4"]
    logs = {}
    for loader in ("dataloader", "dali"):
        cfg = tiny_cfg(tmp_path / loader, *args, "--loader", loader, steps=5, ckpt_every=5)  # 2 steps per epoch
        with open(os.path.join(train(cfg)["run_dir"], "log.jsonl")) as f:
            logs[loader] = [json.loads(line)["loss"] for line in f]
    assert logs["dali"] == logs["dataloader"] and len(set(logs["dali"])) == 5
