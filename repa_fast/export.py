"""Export trained weights for other tools.

    python -m repa_fast.export --ref-layout RUN_OR_CHECKPOINT_DIR OUT.pt [--step N]

writes the EMA weights as the reference's ``{'ema': state_dict}`` file, so REPA's ``generate.py --ckpt OUT.pt``
samples from them (same key names; pass it the matching --model, --encoder-depth and --projector-embed-dims).
``--weights model`` exports the raw weights instead (under the same 'ema' key, as generate.py reads only that).
"""

import argparse
import os
import sys

import torch

from repa_fast import errors
from repa_fast.engine.checkpoint import CheckpointError, list_checkpoints, load_tensors, step_dir
from repa_fast.io import atomic_path


def find_checkpoint_dir(path: str, step: int = 0) -> str:
    """A checkpoint directory from itself, or from a run directory (latest, or ``step``)."""
    if os.path.isfile(os.path.join(path, "ema.safetensors")):
        return path
    steps = list_checkpoints(path)
    if not steps:
        raise CheckpointError(
            f"{path}: neither a checkpoint directory (no ema.safetensors) nor a run directory "
            "with checkpoints/<step>/; pass <output-dir>/<exp-name>"
        )
    if step and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint for step {step}; available: {steps}")
    return step_dir(path, step or steps[-1])


def export_ref_layout(src: str, out: str, *, step: int = 0, weights: str = "ema") -> str:
    ckpt = find_checkpoint_dir(src, step)
    sd = load_tensors(os.path.join(ckpt, f"{weights}.safetensors"))
    size = sum(t.numel() * t.element_size() for t in sd.values())
    with atomic_path(out, size_hint=size, intact=f"{ckpt} is untouched.") as tmp:
        torch.save({"ema": sd}, tmp)
    return out


@errors.entry_point("export")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m repa_fast.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", help="run directory (<output-dir>/<exp-name>) or one checkpoint directory")
    p.add_argument("out", help="output .pt file")
    p.add_argument(
        "--ref-layout",
        action="store_true",
        required=True,
        help="write the reference {'ema': state_dict} layout (the only layout so far)",
    )
    p.add_argument("--step", type=int, default=0, help="checkpoint step (default: latest)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to export")
    errors.add_debug_flag(p)
    args = p.parse_args(argv)
    path = export_ref_layout(args.src, args.out, step=args.step, weights=args.weights)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
