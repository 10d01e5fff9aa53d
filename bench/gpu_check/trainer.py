"""The trainer for real: ``train.py`` on a synthetic REPA-layout dataset, SiT-B/2 + random DINOv2-B, bf16,
``--compile``, 30 steps with a checkpoint at 15, then ``--resume`` from 15 to 30 in a second process; losses finite,
final weights (and EMA) of the resumed run vs the straight run (bitwise, else the largest difference). Each process
is a subprocess with a timeout inside the part's deadline (its whole process group killed at the deadline).
Writes train_check.log and one JSON line per process and one for the comparison."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from .core import ROOT, Check, DeadlineReached, md_table, run, write_atomic

TRAIN_LR = 1e-4  # the reference's --learning-rate default, passed explicitly: the resume tolerance depends on it


def make_ref_layout_dataset(root: str, n: int, resolution: int, num_classes: int = 10, seed: int = 0) -> None:
    """n random images and SD-VAE moments in REPA's preprocessing layout (images/, vae-sd/, dataset.json)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    lat = resolution // 8
    labels = {"images": [], "vae-sd": []}
    for i in range(n):
        s = f"{i:08d}"
        names = {"images": f"{s[:5]}/img{s}.png", "vae-sd": f"{s[:5]}/img-mean-std-{s}.npy"}
        for sub, name in names.items():
            os.makedirs(os.path.join(root, sub, os.path.dirname(name)), exist_ok=True)
        image = rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        PIL.Image.fromarray(image).save(os.path.join(root, "images", names["images"]), compress_level=1)
        moments = np.concatenate([rng.standard_normal((4, lat, lat)), 0.1 * rng.random((4, lat, lat))])
        np.save(os.path.join(root, "vae-sd", names["vae-sd"]), moments.astype(np.float32))
        label = int(rng.integers(0, num_classes))
        for sub in labels:
            labels[sub].append([names[sub], label])
    for sub, rows in labels.items():
        with open(os.path.join(root, sub, "dataset.json"), "w") as f:
            json.dump({"labels": rows}, f)


def _train(check: Check, argv: list, log: list, what: str) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    t0 = time.perf_counter()
    code, out = run(check, cmd, check.left())
    seconds = time.perf_counter() - t0
    log.append(f"$ {' '.join(cmd)}\n[exit {code}, {seconds:.0f} s]\n{out[-8000:]}\n")
    check.record("train_process", what=what, exit_code=code, seconds=round(seconds, 1), timed_out=code is None)
    if code is None:
        check.deadline_hit(f"train.py ({what}, killed)", ["the comparison"])
        raise DeadlineReached(f"train.py ({what}) killed at the part's deadline")
    if code != 0:
        raise RuntimeError(f"train.py ({what}) exited {code}: {out.strip().splitlines()[-1:]}")


def _argv(check: Check, tmp: str, data: str, steps: int, every: int, res: int) -> list:
    argv = ["--data-dir", data, "--resolution", str(res), "--output-dir", os.path.join(tmp, "runs")]
    argv += ["--exp-name", "run", "--max-train-steps", str(steps), "--checkpointing-steps", str(every)]
    argv += ["--no-encoder-pretrained", "--report-to", "none", "--sampling-steps", "0", "--log-every", "1"]
    argv += ["--num-classes", "10", "--num-workers", "2" if not check.smoke else "0", "--compile"]
    argv += ["--learning-rate", str(TRAIN_LR)]
    if check.smoke:
        argv += ["--model", "SiT-T/2", "--enc-type", "dinov2-vit-t", "--encoder-depth", "2"]
        argv += ["--batch-size", "4", "--mixed-precision", "no", "--compile-backend", "eager", "--device", "cpu"]
    else:
        argv += ["--model", "SiT-B/2", "--enc-type", "dinov2-vit-b", "--encoder-depth", "4"]
        argv += ["--batch-size", "32", "--mixed-precision", "bf16", "--device", "cuda"]
    return argv


def part_trainer(check: Check) -> str:
    from safetensors.torch import load_file

    from repa_fast.engine import checkpoint as ckpt

    steps, every = (30, 15) if not check.smoke else (4, 2)
    log: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
            data, run_dir = os.path.join(tmp, "data"), os.path.join(tmp, "runs", "run")
            res = 256 if not check.smoke else 32
            make_ref_layout_dataset(data, 64 if not check.smoke else 16, res)
            argv = _argv(check, tmp, data, steps, every, res)
            _train(check, argv, log, "straight")
            final = ckpt.step_dir(run_dir, steps)
            straight = {f: load_file(os.path.join(final, f)) for f in ("model.safetensors", "ema.safetensors")}
            shutil.rmtree(final)  # the second process resumes from the latest remaining checkpoint: `every`
            _train(check, [*argv, "--resume"], log, f"resumed from {every}")
            resumed = {f: load_file(os.path.join(final, f)) for f in straight}
            with open(os.path.join(run_dir, "log.jsonl")) as f:
                losses = [json.loads(ln)["loss"] for ln in f if '"loss"' in ln]
            result = compare(straight, resumed, losses, log, resumed_from=every, steps=steps)
    finally:
        write_atomic(check.path("train_check.log"), "".join(log) or "(the trainer part did not start)\n")
    check.record("train_resume", **result)
    check.sections.append("## 6. Trainer: straight vs resumed (train_check.log)\n\n" + md_table([result]))
    if not result["losses_finite"] or not result["resume_matches"]:
        raise RuntimeError(f"trainer check failed: {result}")
    return f"resumed == straight ({result['max_abs_diff']}), {result['log_rows']} finite losses"


def compare(straight: dict, resumed: dict, losses: list, log: list, resumed_from: int, steps: int) -> dict:
    diff, bitwise = 0.0, True
    for f, tensors in straight.items():
        for k, a in tensors.items():
            b = resumed[f][k]
            bitwise &= torch.equal(a, b)
            diff = max(diff, (a.double() - b.double()).abs().max().item())
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    # CUDA kernels may be nondeterministic (atomics in cuBLAS / attention backward). An Adam step moves each weight by
    # at most about lr, so two runs that differ only by rounding stay within 2 * lr per resumed step.
    matches = bitwise or diff <= 2 * TRAIN_LR * (steps - resumed_from)
    log.append(f"losses: {losses}\nbitwise equal: {bitwise}; largest |straight - resumed|: {diff:.3e}\n")
    return {
        "steps": steps,
        "resumed_from": resumed_from,
        "log_rows": len(losses),
        "losses_finite": finite,
        "bitwise": bitwise,
        "max_abs_diff": f"{diff:.3e}",
        "resume_matches": matches,
    }
