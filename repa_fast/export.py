"""Export trained weights for other tools.

    python -m repa_fast.export --ref-layout RUN_OR_CHECKPOINT_DIR OUT.pt [--step N]

writes the EMA weights as the reference's ``{'ema': state_dict}`` file, so REPA's ``generate.py --ckpt OUT.pt``
samples from them (same key names; pass it the matching --model, --encoder-depth and --projector-embed-dims).
``--weights model`` exports the raw weights instead (under the same 'ema' key, as generate.py reads only that).
The source is read by ``repa_fast.engine.checkpoint.load_run`` (a run, a checkpoint directory, or a file).
"""

import sys

import torch

from repa_fast import errors
from repa_fast.engine.checkpoint import find_checkpoint_dir, load_run  # noqa: F401 (find_checkpoint_dir: old home)
from repa_fast.io import atomic_path, check_output_path


def export_ref_layout(src: str, out: str, *, step: int = 0, weights: str = "ema") -> str:
    """Write ``src``'s ``weights`` (its latest checkpoint, or ``step``) to ``out`` as ``{'ema': state_dict}``.
    An ``out`` that cannot be a file (an existing directory, a file in the way, a read-only file system) is refused
    before the checkpoint is read."""
    check_output_path(out, "OUT", directory=False)
    run = load_run(src, which=weights, step=step)
    size = sum(t.numel() * t.element_size() for t in run.weights.values())
    with atomic_path(out, size_hint=size, intact=f"{run.path} is untouched.") as tmp:
        torch.save({"ema": run.weights}, tmp)
    return out


@errors.entry_point("export")
def main(argv=None) -> int:
    from repa_fast import cli_flags

    p = cli_flags.parser("python -m repa_fast.export", __doc__, allow_abbrev=True)
    p.add_argument("src", help="run directory (<output-dir>/<exp-name>) or one checkpoint directory")
    p.add_argument("out", help="output .pt file")
    p.add_argument(
        "--ref-layout",
        action="store_true",
        required=True,
        help="write the reference {'ema': state_dict} layout (the only layout so far)",
    )
    p.add_argument("--step", type=int, default=0, help="checkpoint step (default: latest)")
    cli_flags.add_weights_flag(p, help="which weights to export")
    args = p.parse_args(argv)
    path = export_ref_layout(args.src, args.out, step=args.step, weights=args.weights)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
