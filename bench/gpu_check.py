"""``python bench/gpu_check.py --out DIR [--smoke]``: runs the bench/gpu_check/ package (its __init__ documents it;
bench/README_gpu_check.md gives the device command)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: the package beside this file

from gpu_check import main  # noqa: E402  (the package bench/gpu_check/, which Python prefers to this file)

if __name__ == "__main__":
    sys.exit(main())
