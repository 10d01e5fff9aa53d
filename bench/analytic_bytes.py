"""Write bench/results/analytic_bytes.md: analytic bytes of each fused op vs its unfused PyTorch sequence.

Runs anywhere (meta tensors, no GPU): ``python bench/analytic_bytes.py`` (``--check`` exits 1 if the file is stale).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from traffic import markdown_report  # noqa: E402  (bench/traffic.py, beside this script)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "analytic_bytes.md")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args()
    text = markdown_report()
    if args.check:
        with open(OUT) as f:
            stale = f.read() != text
        print(f"{OUT} is {'STALE' if stale else 'current'}")
        return int(stale)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
