"""What the parts of the GPU check share: the run's options and device, the deadlines, the results file (one JSON line
per finished measurement, flushed and fsynced, so a call cut off keeps what it measured), timing helpers and
subprocesses whose timeouts stay below the call limit."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from repa_fast.io import write_text  # noqa: E402

RESULTS = "results.jsonl"
MARGIN_S = 5.0  # kept free at the end of the whole budget: the report is written after the last part


class Check:
    """Options, device and clocks of one run. ``budget_s`` counts from ``start``; each part gets a deadline from
    what is left (``begin_part``), and ``left()`` / ``expired()`` read it."""

    def __init__(self, out: str, smoke: bool, budget_s: float, start: float | None = None):
        self.out, self.smoke, self.budget_s = out, smoke, budget_s
        self.start = time.monotonic() if start is None else start
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.compile_backend = "inductor" if self.cuda else "eager"
        self.part = ""
        self.part_deadline = self.end
        self.matmul_tflops: float | None = None
        self.keep: dict = {}  # objects a later part reuses (the compiled headline step for the profile)
        self.sections: list[str] = []
        self.summary: list[dict] = []
        self.hits: set[str] = set()  # parts their deadline stopped
        os.makedirs(out, exist_ok=True)
        self._results = open(self.path(RESULTS), "a", buffering=1)

    @property
    def end(self) -> float:
        return self.start + self.budget_s - MARGIN_S

    def begin_part(self, part: str, share: float) -> float:
        """Start ``part`` with ``share`` (0..1) of the time left; returns its budget in seconds."""
        now = time.monotonic()
        self.part = part
        self.part_deadline = now + max(0.0, self.end - now) * share
        return self.part_deadline - now

    def left(self) -> float:
        return self.part_deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def record(self, kind: str, **row) -> dict:
        """Append one finished measurement to results.jsonl, flushed to disk before the next one starts."""
        line = {"part": self.part, "kind": kind, **row, "t_s": round(self.elapsed(), 1)}
        self._results.write(json.dumps(line, default=str) + "\n")
        self._results.flush()
        os.fsync(self._results.fileno())
        return line

    def deadline_hit(self, what: str, skipped: list) -> None:
        """Record that the part's deadline stopped it before ``skipped``."""
        self.hits.add(self.part)
        self.record("deadline", what=what, skipped=[str(s) for s in skipped], part_left_s=round(self.left(), 1))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def close(self) -> None:
        self._results.close()


class DeadlineReached(Exception):
    """A part stopped at its deadline; what it finished is in results.jsonl."""


def read_results(out: str) -> list[dict]:
    """The lines of ``out``/results.jsonl (a line cut by a kill is skipped)."""
    rows = []
    path = os.path.join(out, RESULTS)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    write_text(path, text)


def bench_ms(check: Check, fn, grad_to_none=None, reps: int = 2) -> tuple[float, float, float]:
    """(median, p20, p80) ms: ``triton.testing.do_bench`` on CUDA (events, L2 flushed, ``grad_to_none``'s grads
    reset between runs so accumulation is not timed), else the wall clock."""
    if check.cuda:
        import triton.testing

        q = triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return tuple(q)
    fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def subprocess_env() -> dict:
    """The children's environment: this repo first on PYTHONPATH; on the device never the Triton interpreter
    (triton 3.6's fails with numpy >= 2.4, and the kernels must run compiled)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    return env


def run(check: Check, cmd: list, timeout_s: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, at most ``timeout_s`` (never past the part's deadline); on timeout the
    whole group is killed (pytest's and the DataLoader's children too). Returns (exit code or None, output)."""
    timeout_s = min(timeout_s, check.left())
    if timeout_s <= 0:
        return None, "[not started: the part's deadline had passed]\n"
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, (out or "") + f"\n[killed after {timeout_s:.0f} s: the part's deadline]\n"


def git_sha() -> str:
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
