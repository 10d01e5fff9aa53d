"""generate: run/checkpoint/reference-file inputs, pixel and VAE decoding, sharding, presets, file names."""

import os

import numpy as np
import pytest
import torch

from repa_fast.engine.checkpoint import load_run
from repa_fast.engine.trainer import train
from repa_fast.export import export_ref_layout
from repa_fast.generate import build_model, generate_shard, main, output_name, parse_args
from repa_fast.models.sit import SiT_models
from repa_fast.sample import euler_sampler

from .data.helpers import make_tiny_vae
from .engine.helpers import tiny_cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    return train(tiny_cfg(out, steps=2, ckpt_every=2))["run_dir"]


def _npz(sample_dir):
    files = [f for f in os.listdir(sample_dir) if f.endswith(".npz")]
    assert len(files) == 1 and ".part" not in files[0], files
    return files[0], np.load(os.path.join(sample_dir, files[0]))["arr_0"]


def test_pixel_space_run_dir_to_npz_matches_the_sampler(run_dir, tmp_path):
    argv = [
        "--ckpt",
        run_dir,
        "--sample-dir",
        str(tmp_path),
        "--num-fid-samples",
        "5",
        "--per-proc-batch-size",
        "3",
        "--num-steps",
        "3",
        "--cfg-scale",
        "2.0",
    ]
    assert main(argv) == 0
    name, arr = _npz(tmp_path)
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert "ode3" in name and "cfg2.0" in name and "g0.0-1.0" in name and "balanced" in name

    # The same numbers by hand: the EMA weights, generate.py's seed rule, balanced labels, rounding.
    args = parse_args(argv)
    model = build_model(args.sit, load_run(args.ckpt, args.weights))
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5) % 10
    expected = []
    for i in range(0, 5, 3):
        z = torch.randn(len(labels[i : i + 3]), 3, 16, 16, generator=gen)
        x = euler_sampler(model, z, labels[i : i + 3], num_steps=3, cfg_scale=2.0).float()
        expected.append(torch.round(torch.clamp(255 * (x + 1) / 2, 0, 255)).to(torch.uint8).permute(0, 2, 3, 1))
    assert np.array_equal(arr, torch.cat(expected).numpy())


def test_shards_cover_every_sample_once_with_rank_seeds(run_dir):
    opts = parse_args(["--ckpt", run_dir, "--num-fid-samples", "7", "--per-proc-batch-size", "2", "--num-steps", "2"])
    model, args = build_model(opts.sit, load_run(opts.ckpt, opts.weights)), opts.sampling
    parts = [generate_shard(args, model, None, r, 3, torch.device("cpu"), 1.0) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    again = generate_shard(args, model, None, 1, 3, torch.device("cpu"), 1.0)
    assert np.array_equal(parts[1], again)  # deterministic per (seed, rank)
    assert not np.array_equal(parts[0][:2], parts[1][:2])


def test_reference_pt_with_vae_decode(tmp_path):
    make_tiny_vae(str(tmp_path / "vae"))  # 32 px <-> 4x4x4 latents
    model = SiT_models["SiT-S/2"](input_size=4, z_dims=[16], encoder_depth=1, depth=2, num_classes=10)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    torch.save({"ema": model.state_dict()}, tmp_path / "ref.pt")
    argv = [
        "--ckpt",
        str(tmp_path / "ref.pt"),
        "--model",
        "SiT-S/2",
        "--vae",
        str(tmp_path / "vae"),
        "--sample-dir",
        str(tmp_path / "out"),
        "--num-fid-samples",
        "3",
        "--preset",
        "paper",
        "--num-steps",
        "4",
        "--projector-embed-dims",
        "16",
        "--encoder-depth",
        "1",
    ]
    assert main(argv) == 0
    name, arr = _npz(tmp_path / "out")
    assert arr.shape == (3, 32, 32, 3)
    assert "sde4" in name and "cfg1.8" in name and "g0.0-0.7" in name  # preset, with --num-steps overriding it


def test_errors(tmp_path, run_dir, capsys):
    model = SiT_models["SiT-S/2"](input_size=4, z_dims=[], depth=1)
    torch.save({"ema": model.state_dict()}, tmp_path / "ref.pt")
    assert main(["--ckpt", str(tmp_path / "ref.pt"), "--sample-dir", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    torch.save({"model": model.state_dict()}, tmp_path / "bad.pt")
    assert main(["--ckpt", str(tmp_path / "bad.pt"), "--model", "SiT-S/2"]) == 2
    assert "expected the reference layout" in capsys.readouterr().err
    opts = parse_args(["--ckpt", run_dir, "--preset", "paper", "--cfg-scale", "1.5"])
    args = opts.sampling
    assert (args.mode, args.num_steps, args.cfg_scale, args.guidance_high) == ("sde", 250, 1.5, 0.7)
    assert "sde250" in output_name(opts, "SiT-T/2")


def test_export_then_generate_from_reference_file(run_dir, tmp_path):
    export_ref_layout(run_dir, str(tmp_path / "ema.pt"))
    argv = [
        "--ckpt",
        str(tmp_path / "ema.pt"),
        "--model",
        "SiT-T/4",
        "--latent-scale",
        "1.0",
        "--sample-dir",
        str(tmp_path / "s"),
        "--num-fid-samples",
        "2",
        "--num-steps",
        "2",
    ]
    assert main(argv) == 0
    assert _npz(tmp_path / "s")[1].shape == (2, 16, 16, 3)
