"""One prepared GPU check that returns its headline first (issue 18 item 4).

    PYTHONPATH=. python bench/gpu_check.py --out DIR [--parts ...] [--smoke] [--deadline-s 540]

Parts, in this order, each with a deadline so that the whole fits ``--deadline-s`` (driver.py):
  headline  whole training steps of SiT-XL/2 + DINOv2-B at 256 px, batch 32: the reference step structure eager and
            compiled, ours with impl=ref, with Triton, + cuDNN attention, + fp8 where supported; >= 20 timed steps
            each, providers interleaved (headline.py)
  kernels   per-op micro-benchmarks at SiT-XL/2 shapes with a tile sweep: do_bench with grad_to_none, parity of the
            compiled kernels against the references (kernels.py)
  ceilings  bf16 matmul TFLOP/s and device copy GB/s (env.py)
  pytest    ``pytest -m gpu`` in a subprocess (env.py)
  profile   torch.profiler of the headline's compiled step, kernels grouped (profile.py)
  trainer   train.py straight and resumed in two processes, weights compared (trainer.py)

Results go to DIR/results.jsonl as they are measured (one JSON line per finished measurement, flushed and fsynced:
a call cut off keeps them), DIR/report.md after every part, and the logs (pytest_gpu.log, profile.md,
train_check.log). Exit code 0: every part ok; 1: a part failed; 3: a deadline cut a part short.
``--smoke``: tiny shapes on the CPU (Triton interpreter, eager compile backends); tests/test_gpu_check.py runs it,
with a forced short ``--deadline-s`` too. Device commands: bench/README_gpu_check.md.
"""

from .driver import EXIT_DEADLINE, FILES, PARTS, WEIGHTS, main, parse_args
from .profile import kernel_group

__all__ = ["EXIT_DEADLINE", "FILES", "PARTS", "WEIGHTS", "kernel_group", "main", "parse_args"]
