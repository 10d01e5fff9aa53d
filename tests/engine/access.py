"""Which dispatched op reads and writes which storage: the per-step fixed cost (EMA, clip, optimizer) counted on CPU.

``AccessCounter`` records, for every ATen or ``repa_fast::`` op, the tensors it reads (every tensor argument but
``out=`` ones) and the tensors it writes (its outputs and the arguments its schema marks mutable, ``Tensor(a!)``).
On a GPU each such op is at least one kernel that streams those bytes, so the records give the passes over a set of
tensors (the gradients, the EMA) and the bytes each pass moves. A schema's mutable mark says "may write": the fused
AdamW op marks its gradients mutable although it writes them back only when given a grad_scale.
"""

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Access:
    name: str
    reads: list
    writes: list
    kwargs: dict = field(default_factory=dict)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class AccessCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[Access] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        reads, writes = [], []
        bound = dict(zip([a.name for a in func._schema.arguments], args)) | kwargs
        for arg in func._schema.arguments:
            tensors = [t for t in tree_leaves(bound.get(arg.name)) if isinstance(t, torch.Tensor)]
            if not arg.is_out:
                reads += tensors
            if arg.is_out or (arg.alias_info is not None and arg.alias_info.is_write):
                writes += tensors
        writes += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.ops.append(Access(str(func.overloadpacket), reads, writes, kwargs))
        return out

    def touching(self, tensors) -> list[Access]:
        """The ops that read or write any of ``tensors``' storages."""
        ptrs = {_storage(t) for t in tensors}
        return [op for op in self.ops if any(_storage(t) in ptrs for t in op.reads + op.writes)]


def nbytes(tensors) -> int:
    """Bytes of the distinct tensors (by identity) in ``tensors``."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
