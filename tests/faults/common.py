"""What the fault tests share: byte-for-byte snapshots of a tree and a tiny run to break (tests/engine/helpers.py)."""

import os

from repa_fast.cli import main
from repa_fast.engine import checkpoint as ckpt

from ..engine.helpers import tiny_args
from ..test_hardening import snapshot


def refused(capsys, root, argv, code: int, *words) -> str:
    """Run train.py ``argv`` in-process; assert its exit code, the message's key words, no traceback, and that
    ``root`` (run directory and data) is byte-identical afterwards. Returns stderr."""
    before = snapshot(root)
    capsys.readouterr()
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == code, err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err and "weights_only=False" not in err
    assert snapshot(root) == before
    return err


def trained(tmp_path, *extra, steps=4, ckpt_every=2) -> str:
    """A finished tiny run under ``tmp_path`` (checkpoints at every ``ckpt_every`` steps); returns its run dir."""
    assert main(tiny_args(tmp_path, *extra, steps=steps, ckpt_every=ckpt_every)) == 0
    return os.path.join(str(tmp_path), "run")


def flip_byte(path: str, offset_from_end: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x5A]))


__all__ = ["ckpt", "flip_byte", "refused", "snapshot", "tiny_args", "trained"]
