"""Device-independent step measurements: dispatched ops, host synchronisations, bytes saved for backward.

These count what a GPU would have to do without needing one:
- ``count_ops``: every ATen (or custom) op dispatched while ``fn`` runs. On a GPU each is at least one kernel launch,
  so fewer ops means fewer launches and fewer intermediate tensors. Custom ops (``repa_fast::*``) count once.
- host synchronisations: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``) and
  ``aten.is_nonzero`` are the ops that copy a device value to the host and block the CPU until the GPU catches up.
- ``saved_bytes``: the bytes autograd keeps alive between forward and backward (activation memory).
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")


class _OpCounter(TorchDispatchMode):
    def __init__(self, host_ptrs: set):
        super().__init__()
        self.counts = Counter()
        self.host_ptrs = host_ptrs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS and args and args[0].data_ptr() in self.host_ptrs:
            name = "host_read"  # a value that lives on the host even on a GPU run: no device sync
        self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args, host_tensors=(), **kwargs) -> Counter:
    """Counter of op name -> dispatches while ``fn(*args, **kwargs)`` runs.

    ``host_tensors``: tensors that stay on the CPU in a GPU run (e.g. a non-fused optimizer's step counters); reading
    them is counted as "host_read", not as a device synchronisation.
    """
    with _OpCounter({t.data_ptr() for t in host_tensors}) as counter:
        fn(*args, **kwargs)
    return counter.counts


def host_syncs(counts: Counter) -> int:
    """Device-to-host synchronisations among the counted ops."""
    return sum(n for name, n in counts.items() if name in SYNC_OPS)


def saved_bytes(fn, *args, exclude=(), **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs its forward.

    Storages of the tensors in ``exclude`` (pass the model's parameters: weights are not activations) are skipped;
    views of one storage count once.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())
