"""Two ranks under torchrun (gloo, CPU): the DDP backend's sliced EMA against a full EMA replica kept beside it.

Every rank perturbs the (replicated) parameters with the same generator, updates both EMAs with the same skip flags,
then: the gathered sliced EMA equals the full one bit for bit; a fresh sliced EMA loaded from that state (a resume)
and the uninterrupted one stay bit-identical to each other and to the full one for more steps; the preview module is
the full EMA on rank 0 and None elsewhere. Rank 0 writes the findings to OUT.json.

    torchrun --standalone --nproc-per-node 2 tests/engine/sharded_ema_entry.py OUT.json
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from repa_fast.engine.ema import EMA, ShardedEMA  # noqa: E402
from repa_fast.engine.parallel import make_backend  # noqa: E402
from repa_fast.models.sit import build_sit  # noqa: E402


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def main(out_path: str) -> None:
    backend = make_backend("ddp", "cpu")
    torch.manual_seed(0)
    model = build_sit(
        "SiT-T/4", input_size=16, in_channels=3, num_classes=10, z_dims=[32], encoder_depth=2, projector_dim=64
    )
    backend.wrap(model, torch.optim.AdamW(model.parameters(), fused=True))
    ema, full = backend.make_ema(model), EMA(model)
    gen = torch.Generator().manual_seed(1)  # the same draws on every rank: the parameters stay replicated

    def steps(emas, skips):
        for skip in skips:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=gen))
            for e in emas:
                backend.update_ema(e, model, 0.9, torch.tensor(skip))

    steps([ema, full], [False, True, False, False])
    saved = backend.full_ema_state_dict(ema)  # collective: the checkpoint's EMA
    saved_equal = _same(saved, full.state_dict())
    resumed = backend.make_ema(model)
    backend.load_ema_state_dict(resumed, saved)
    steps([ema, resumed, full], [False, True, False])
    after, after_resumed = backend.full_ema_state_dict(ema), backend.full_ema_state_dict(resumed)
    module = backend.ema_module(ema)  # collective
    report = {
        "sliced": isinstance(ema, ShardedEMA),
        "local": sum(s.numel() for s in ema.shadow) if isinstance(ema, ShardedEMA) else -1,
        "total": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tensors": sum(1 for p in model.parameters() if p.requires_grad),
        "saved_equal": saved_equal,
        "resumed_equal": _same(after_resumed, after) and _same(after, full.state_dict()),
        "moved": not _same(after, saved),
        "module_equal": module is not None and _same(module.state_dict(), full.state_dict()),
        "module_none": module is None,
    }
    reports = backend.gather_objects(report)
    if backend.is_main:
        with open(out_path, "w") as f:
            json.dump(reports, f)
    backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
