"""The driver: the order of the parts, their deadlines, the files, the summary.

Order (issue 18 item 4): the whole-step headline first, then the kernel micro-benchmarks, then the rest (ceilings,
``pytest -m gpu``, the profile, the trainer's resume check). The whole run fits ``--deadline-s`` (540 s by default:
a 600 s device call less a margin for the start and the transfers). Each part starts with its weight's share of the
time left (``WEIGHTS``; what a part does not use goes to the next ones) and stops at its deadline, keeping what it
measured; subprocesses get the part's remaining time as their timeout. A part that fails is reported and the others
still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

PARTS = ("headline", "kernels", "ceilings", "pytest", "profile", "trainer")
WEIGHTS = {"headline": 50, "kernels": 14, "ceilings": 3, "pytest": 12, "profile": 6, "trainer": 15}
FILES = ("results.jsonl", "report.md", "pytest_gpu.log", "profile.md", "train_check.log")
PART_FILES = {"pytest": "pytest_gpu.log", "profile": "profile.md", "trainer": "train_check.log"}
EXIT_OK, EXIT_FAILED, EXIT_DEADLINE = 0, 1, 3


def parse_args(argv=None):
    from . import __doc__ as doc

    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder for results.jsonl, report.md and the logs")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter), a few minutes")
    p.add_argument("--deadline-s", type=float, default=540.0, help="the whole run's budget in seconds (default 540)")
    p.add_argument("--headline-batch", type=int, default=None, help="per-GPU batch of the headline (default 32)")
    p.add_argument("--headline-steps", type=int, default=None, help="timed steps per provider (default 20; smoke 2)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    if args.deadline_s <= 0:
        p.error(f"--deadline-s must be > 0, got {args.deadline_s}")
    args.headline_batch = args.headline_batch or (2 if args.smoke else 32)
    args.headline_steps = args.headline_steps or (2 if args.smoke else 20)
    return args, [s for s in PARTS if s in parts]  # always in the order


def _prepare_triton(smoke: bool) -> None:
    """TRITON_INTERPRET is read when the kernels are decorated: decide it before they are imported. On the device
    the kernels run compiled (triton 3.6's interpreter fails with numpy >= 2.4); --smoke on CPU needs it."""
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.pop("TRITON_INTERPRET", None) is not None:
        print("gpu_check: TRITON_INTERPRET was set; unset for the device run (compiled kernels)", flush=True)


def _part_fn(name: str, args):
    from . import env, headline, kernels, profile, trainer

    return {
        "headline": lambda c: headline.part_headline(c, args.headline_batch, args.headline_steps),
        "kernels": kernels.part_kernels,
        "ceilings": env.part_ceilings,
        "pytest": env.part_pytest,
        "profile": profile.part_profile,
        "trainer": trainer.part_trainer,
    }[name]


def main(argv=None) -> int:
    start = time.monotonic()
    args, parts = parse_args(argv)
    _prepare_triton(args.smoke)
    import torch

    from .core import Check, DeadlineReached, md_table, write_atomic
    from .env import record_env

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    check = Check(args.out, args.smoke, args.deadline_s, start=start)
    check.part = "env"
    record_env(check)
    for i, name in enumerate(parts):
        weights = [WEIGHTS[p] for p in parts[i:]]
        budget = check.begin_part(name, WEIGHTS[name] / sum(weights))
        t0 = time.monotonic()
        print(f"== {name} ({budget:.0f} s) ==", flush=True)
        if budget <= 0:
            check.deadline_hit("the whole run's budget", [name])
            headline, status = "not started: the run's budget was spent", "deadline"
        else:
            try:
                headline = _part_fn(name, args)(check)
                status = "deadline" if name in check.hits else "ok"
            except DeadlineReached as e:
                headline, status = str(e), "deadline"
            except Exception as e:
                headline, status = f"{type(e).__name__}: {str(e)[:200]}", "FAIL"
                check.record("error", error=headline)
                check.sections.append(f"## {name}: FAILED\n\n```\n{traceback.format_exc()[-3000:]}```\n")
                traceback.print_exc()
        check.summary.append(
            {"part": name, "status": status, "seconds": round(time.monotonic() - t0), "result": headline}
        )
        print(f"   {name}: {status} in {time.monotonic() - t0:.0f} s: {headline}", flush=True)
        _write_report(check, args, md_table, write_atomic)  # after every part: a call cut off keeps a report
    for name, file in PART_FILES.items():  # every file exists, saying why when its part did not run
        if not os.path.exists(check.path(file)):
            write_atomic(check.path(file), f"part {name} was not run (--parts {args.parts})\n")
    check.close()
    print("\n" + md_table(check.summary), flush=True)
    statuses = {s["status"] for s in check.summary}
    return EXIT_FAILED if "FAIL" in statuses else EXIT_DEADLINE if "deadline" in statuses else EXIT_OK


def _write_report(check, args, md_table, write_atomic) -> None:
    head = f"# gpu_check ({'smoke, CPU' if args.smoke else 'device'}; budget {args.deadline_s:g} s)\n\n"
    body = md_table(check.summary) + "\n" + "\n".join(check.sections)
    write_atomic(check.path("report.md"), head + body)
