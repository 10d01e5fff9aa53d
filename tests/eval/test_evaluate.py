"""python -m repa_fast.evaluate and generate --fid-reference end to end, with the digits network standing in for
Inception, and evaluation mistakes reported before any sample is drawn."""

import json
import os

import numpy as np
import pytest

import repa_fast.evaluate as ev
from repa_fast.eval.digits import digits_images
from repa_fast.eval.fid import FeatureStats
from repa_fast.eval.inception_score import inception_score, softmax_float32
from repa_fast.eval.precision_recall import precision_recall


def nhwc(images):
    return images.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("npz")
    images, _ = digits_images(16)
    ref, other = os.path.join(d, "ref.npz"), os.path.join(d, "other.npz")
    np.savez(ref, nhwc(images[:150]))
    np.savez(other, nhwc(images[150:300]))
    return ref, other


def run(argv, capsys):
    code = ev.main(argv)
    return code, capsys.readouterr()


def test_evaluate_cli_on_digits_known_answers_json_and_cache(digit_sets, digits_cache, tmp_path, capsys, monkeypatch):
    ref, other = digit_sets
    cache = digits_cache
    same = str(tmp_path / "same.npz")
    np.savez(same, np.load(ref)["arr_0"])
    flags = ["--feature-net", "digits", "--cache-dir", cache, "--eval-batch-size", "32"]
    code, out = run([same, ref, *flags], capsys)
    assert code == 0, out.err
    res = json.load(open(str(tmp_path / "same.eval-digits.json")))
    assert abs(res["FD-digits"]) < 1e-3 and abs(res["sFD-digits"]) < 1e-3  # FD(x, x) = 0
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["num_samples"] == 150
    assert "FD-digits" in out.out

    calls = []
    real = ev.compute_features
    monkeypatch.setattr(ev, "compute_features", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    code, _ = run([other, ref, *flags], capsys)
    assert code == 0 and calls == [other]  # the reference's features came from our cache
    res = json.load(open(other.removesuffix(".npz") + ".eval-digits.json"))
    # The same numbers by hand from the features.
    net = ev.build_feature_net("digits", None, cache, "cpu")
    fs = ev.compute_features(other, net, 64, "cpu")
    fr = ev.compute_features(ref, net, 7, "cpu")  # another batch size: same features
    expected = FeatureStats.from_features(fs["pool"]).frechet_distance(FeatureStats.from_features(fr["pool"]))
    assert res["FD-digits"] == pytest.approx(expected, rel=1e-4) and res["FD-digits"] > 1e-3
    assert (res["precision"], res["recall"]) == precision_recall(fr["pool"], fs["pool"])
    assert res["IS-digits"] == pytest.approx(inception_score(softmax_float32(fs["logits"])), rel=1e-6)
    assert 1.0 < res["IS-digits"] < 10.0


def test_stored_reference_statistics_are_used(digit_sets, digits_cache, tmp_path, capsys):
    ref, other = digit_sets
    rng = np.random.default_rng(0)
    stats = {"mu": rng.standard_normal(64).astype(np.float32), "sigma": np.eye(64) * 0.5}
    stats |= {"mu_s": np.zeros(256, np.float32), "sigma_s": np.eye(256)}
    stored = str(tmp_path / "stored.npz")
    np.savez(stored, arr_0=np.load(ref)["arr_0"], **stats)
    code, out = run([other, stored, "--feature-net", "digits", "--cache-dir", digits_cache], capsys)
    assert code == 0, out.err
    res = json.load(open(other.removesuffix(".npz") + ".eval-digits.json"))
    net = ev.build_feature_net("digits", None, digits_cache, "cpu")
    fs = ev.compute_features(other, net, 64, "cpu")
    expected = FeatureStats.from_features(fs["pool"]).frechet_distance(FeatureStats(stats["mu"], stats["sigma"]))
    assert res["FD-digits"] == pytest.approx(expected, rel=1e-5)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, arr_0=np.load(ref)["arr_0"], mu=np.zeros(2048), sigma=np.eye(3))
    code, out = run([other, bad, "--feature-net", "digits", "--cache-dir", digits_cache], capsys)
    assert code == 2 and "do not fit --feature-net digits" in out.err


def test_input_mistakes_are_errors_naming_the_file(digit_sets, tmp_path, capsys):
    ref, _ = digit_sets
    with_mu = str(tmp_path / "s.npz")
    np.savez(with_mu, arr_0=np.load(ref)["arr_0"], mu=np.zeros(3))
    floats = str(tmp_path / "f.npz")
    np.savez(floats, np.zeros((4, 8, 8, 3), np.float32))
    for argv, msg in [
        ([with_mu, ref], "holds 'mu'/'sigma'"),
        ([floats, ref], "must be uint8 (N, H, W, 3)"),
        ([str(tmp_path / "none.npz"), ref], "none.npz: no such file"),
    ]:
        code, out = run([*argv, "--feature-net", "digits"], capsys)
        assert code == 2 and msg in out.err and "Traceback" not in out.err


def test_streamed_shards_equal_the_whole_array(digit_sets):
    ref, _ = digit_sets
    with ev.open_arr0(ref) as (shape, batches):
        whole = np.concatenate(list(batches(0, shape[0], 64)))
        parts = [np.concatenate(list(batches(shape[0] * r // 3, shape[0] * (r + 1) // 3, 16))) for r in range(3)]
    np.testing.assert_array_equal(whole, np.load(ref)["arr_0"])
    np.testing.assert_array_equal(np.concatenate(parts), whole)


# ---------------------------------------------------------------------------------------------------------------
# generate --fid-reference


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from repa_fast.engine.trainer import train

    from ..engine.helpers import tiny_cfg

    return train(tiny_cfg(tmp_path_factory.mktemp("gen"), steps=2, ckpt_every=2))["run_dir"]


def test_generate_fid_reference_evaluates_after_sampling(run_dir, digit_sets, digits_cache, tmp_path, capsys):
    from repa_fast.generate import main as generate

    ref, _ = digit_sets
    argv = ["--ckpt", run_dir, "--sample-dir", str(tmp_path), "--num-fid-samples", "6", "--num-steps", "2"]
    argv += ["--fid-reference", ref, "--calculate-fid", "--feature-net", "digits", "--cache-dir", digits_cache]
    assert generate(argv) == 0
    out = capsys.readouterr().out
    (result,) = [f for f in os.listdir(tmp_path) if f.endswith(".eval-digits.json")]
    res = json.load(open(tmp_path / result))
    assert res["num_samples"] == 6 and res["FD-digits"] > 0 and "FD-digits" in out
    assert os.path.isfile(res["samples"]) and res["samples"].endswith(".npz")


def test_generate_evaluation_mistakes_fail_before_sampling(run_dir, digit_sets, tmp_path, capsys, monkeypatch):
    from repa_fast.generate import main as generate

    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    base = ["--ckpt", run_dir, "--sample-dir", str(tmp_path), "--num-fid-samples", "4", "--num-steps", "2"]
    cases = [
        (["--calculate-fid"], "pass --fid-reference REF.npz"),
        (["--fid-reference", str(tmp_path / "missing.npz")], "missing.npz: no such file"),
        (["--fid-reference", digit_sets[0]], "weights-inception-2015-12-05-6726825d.pth"),  # no weights anywhere
    ]
    for extra, msg in cases:
        assert generate(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]  # nothing was sampled


# ---------------------------------------------------------------------------------------------------------------
# --eval-every during training


def test_training_logs_fid_n_and_is_every_k_steps(digit_sets, digits_cache, tmp_path):
    from repa_fast.engine.trainer import train

    from ..engine.helpers import tiny_cfg

    extra = ["--eval-every", "2", "--eval-samples", "6", "--fid-reference", digit_sets[0], "--eval-num-steps", "2"]
    extra += ["--eval-feature-net", "digits", "--eval-cache-dir", digits_cache, "--eval-cfg-scale", "1.5"]
    cfg = tiny_cfg(tmp_path, *extra, steps=4, ckpt_every=4)
    out = train(cfg)["run_dir"]
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    evals = [r for r in records if "FD-digits-6" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["FD-digits-6"] > 0 and r["IS-digits-6"] >= 1.0 for r in evals)
    assert evals[0]["eval_sampler"] == "ode2-cfg1.5"
    assert evals[0]["FD-digits-6"] != evals[1]["FD-digits-6"]  # the EMA moved between evaluations


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--eval-every", "2"], "pass --fid-reference REF.npz"),
        (["--eval-every", "2", "--fid-reference", "nowhere.npz"], "nowhere.npz: no such file"),
        (["--eval-every", "2", "--eval-samples", "1", "--fid-reference", "x.npz"], "--eval-samples 1 is too small"),
    ],
)
def test_training_evaluation_mistakes_stop_before_the_first_step(tmp_path, extra, msg):
    from repa_fast.config import ConfigError
    from repa_fast.engine.trainer import train

    from ..engine.helpers import tiny_cfg

    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        train(tiny_cfg(tmp_path, *extra, steps=2, ckpt_every=2))
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))


@pytest.mark.multiproc
def test_evaluate_across_two_processes_equals_one(digit_sets, digits_cache, tmp_path):
    import subprocess
    import sys

    from ..engine.helpers import REPO

    ref, other = digit_sets
    samples = str(tmp_path / "s.npz")
    np.savez(samples, np.load(other)["arr_0"])
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    os.symlink(
        os.path.join(digits_cache, "digits_classifier.safetensors"),
        os.path.join(cache, "digits_classifier.safetensors"),
    )
    flags = [samples, ref, "--feature-net", "digits", "--cache-dir", cache, "--eval-batch-size", "16"]
    assert ev.main(flags) == 0
    one = json.load(open(samples.removesuffix(".npz") + ".eval-digits.json"))
    for f in os.listdir(cache):
        if f.endswith(".npz"):
            os.remove(os.path.join(cache, f))  # the two processes recompute the reference features too
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "repa_fast.evaluate",
        *flags,
    ]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.load(open(samples.removesuffix(".npz") + ".eval-digits.json"))
    for k in ("FD-digits", "sFD-digits", "IS-digits", "precision", "recall"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f]  # per-rank feature files are cleaned up
