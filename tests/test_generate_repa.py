"""generate with REPA generate.py's flags and conventions (issue 20 item 7): --qk-norm/--no-qk-norm and
--projector-embed-dims checked against the checkpoint, --labels random in generate.py's draw order, --png-dir."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repa_fast import errors
from repa_fast.engine.checkpoint import load_run
from repa_fast.engine.trainer import train
from repa_fast.generate import build_model, generate_shard, main, parse_args, shard_indices
from repa_fast.models.sit import SiT_models
from repa_fast.sample import SAMPLERS, decode_to_uint8

from .engine.helpers import tiny_cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train(tiny_cfg(tmp_path_factory.mktemp("genrepa"), steps=2, ckpt_every=2))["run_dir"]


def repa_loop(model, s, world: int) -> np.ndarray:
    """A transcription of REPA generate.py's sampling loop (sihyun-yu/REPA generate.py:99-160 at 67f7145) for every
    rank in turn, with its global RNG: ``torch.manual_seed(global_seed * world + rank)`` (generate.py:56-57), per
    batch ``z = torch.randn(n, ...)`` then ``y = torch.randint(0, num_classes, (n,))`` (121-122), the sampler (CFG
    inside it, SDE noise from the global RNG by randn_like as REPA's samplers.py:140), each sample saved as number
    ``i * world + rank + total`` (158), and only the first --num-fid-samples read back
    (create_npz_from_sample_folder)."""
    n, size, c = s.per_proc_batch_size, model.x_embedder.grid_size * model.patch_size, model.in_channels
    total_samples = int(math.ceil(s.num_fid_samples / (n * world)) * n * world)
    iterations = total_samples // world // n
    images = {}
    for rank in range(world):
        torch.manual_seed(s.global_seed * world + rank)
        total = 0
        for _ in range(iterations):
            z = torch.randn(n, c, size, size)
            y = torch.randint(0, model.num_classes, (n,))
            kw = dict(num_steps=s.num_steps, cfg_scale=s.cfg_scale, guidance_low=s.guidance_low)
            kw |= dict(guidance_high=s.guidance_high, path_type=s.path_type)
            samples = SAMPLERS[s.mode](model, z, y, **kw).float()
            for i, sample in enumerate(decode_to_uint8(samples, rounding=s.rounding).numpy()):
                images[i * world + rank + total] = sample
            total += n * world
    return np.stack([images[k] for k in range(s.num_fid_samples)])


def ours(model, s, world: int) -> np.ndarray:
    """generate_shard on every rank, merged by shard_indices (what merge_parts does)."""
    out = np.zeros((s.num_fid_samples, *generate_shard(s, model, None, 0, 1, torch.device("cpu"), 1.0).shape[1:]))
    for rank in range(world):
        out[shard_indices(s, rank, world)] = generate_shard(s, model, None, rank, world, torch.device("cpu"), 1.0)
    return out.astype(np.uint8)


@pytest.mark.parametrize(
    "mode, cfg, world, n, batch",
    [("ode", "1.0", 1, 7, 3), ("ode", "2.0", 2, 7, 2), ("sde", "2.0", 1, 5, 2), ("sde", "1.0", 3, 8, 2)],
)
def test_random_labels_reproduce_repa_generate_draw_order(run_dir, mode, cfg, world, n, batch):
    argv = ["--ckpt", run_dir, "--labels", "random", "--mode", mode, "--cfg-scale", cfg, "--num-steps", "3"]
    opts = parse_args([*argv, "--num-fid-samples", str(n), "--per-proc-batch-size", str(batch), "--global-seed", "5"])
    model = build_model(opts.sit, load_run(opts.ckpt, opts.weights))
    expected = repa_loop(model, opts.sampling, world)
    got = ours(model, opts.sampling, world)
    assert expected.std() > 0 and np.array_equal(got, expected)
    # the indices of the ranks cover every sample once
    all_idx = np.concatenate([shard_indices(opts.sampling, r, world) for r in range(world)])
    assert sorted(all_idx.tolist()) == list(range(n))


def test_random_labels_through_the_command_match_the_reference_loop_and_png_dir(run_dir, tmp_path):
    argv = ["--ckpt", run_dir, "--labels", "random", "--num-steps", "2", "--num-fid-samples", "5"]
    argv += ["--per-proc-batch-size", "2", "--global-seed", "3", "--rounding", "truncate", "--cfg-scale", "1.5"]
    argv += ["--sample-dir", str(tmp_path / "s"), "--png-dir", str(tmp_path / "png")]
    assert main(argv) == 0
    (npz,) = os.listdir(tmp_path / "s")
    arr = np.load(tmp_path / "s" / npz)["arr_0"]
    opts = parse_args(argv)
    assert np.array_equal(arr, repa_loop(build_model(opts.sit, load_run(run_dir, "ema")), opts.sampling, 1))
    assert sorted(os.listdir(tmp_path / "png")) == [f"{k:06d}.png" for k in range(5)]  # generate.py's names
    pngs = np.stack([np.asarray(Image.open(tmp_path / "png" / f"{k:06d}.png")) for k in range(5)])
    assert np.array_equal(pngs, arr)  # the folder holds the .npz's images, in its order


@pytest.fixture
def ref_file(tmp_path):
    model = SiT_models["SiT-S/2"](input_size=4, z_dims=[16, 8], encoder_depth=1, depth=2, num_classes=10, qk_norm=True)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    torch.save({"ema": model.state_dict()}, tmp_path / "ref.pt")
    return str(tmp_path / "ref.pt")


def test_qk_norm_and_projector_flags_are_checked_against_the_checkpoint(ref_file, tmp_path, capsys):
    base = ["--ckpt", ref_file, "--model", "SiT-S/2", "--encoder-depth", "1", "--latent-scale", "1.0"]
    base += ["--vae", "none", "--in-channels", "4", "--num-fid-samples", "2", "--num-steps", "1"]
    out = ["--sample-dir", str(tmp_path / "s")]
    cases = [
        (["--no-qk-norm"], ["--no-qk-norm contradicts", "has q/k-norm weights", "pass --qk-norm"]),
        (
            ["--projector-embed-dims", "768,1024"],
            ["--projector-embed-dims 768,1024 contradicts", "projectors are 16,8"],
        ),
        (["--projector-embed-dims", "16"], ["projectors are 16,8", "--projector-embed-dims 16,8"]),
        (["--projector-embed-dims", "16;8"], ["expected widths separated by commas"]),
    ]
    for extra, words in cases:
        assert main([*base, *extra, *out]) == errors.EXIT_USER
        err = capsys.readouterr().err
        assert all(w in err for w in words), (extra, err)
        assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")
    opts = parse_args([*base, "--qk-norm", "--projector-embed-dims", "16,8", *out])
    assert opts.sit.qk_norm is True and opts.sit.projector_embed_dims == "16,8"
    model = build_model(opts.sit, load_run(ref_file))  # agreeing flags build the checkpoint's model
    assert model.blocks[0].attn.q_norm is not None and [p[-1].out_features for p in model.projectors] == [16, 8]
