"""Read the tensors of a TorchScript archive (``torch.jit.save``) without running any of its code.

Files such as OpenAI CLIP's ``ViT-L-14.pt`` (fp16) or the FID Inception ``pt_inception-2015-12-05`` network are
TorchScript zips, which ``torch.load(weights_only=True)`` refuses and ``torch.jit.load`` would execute (a
TorchScript archive carries code, and its pickles may name any Python callable). This reader interprets the zip
as data only:

- ``<archive>/data.pkl`` is the module tree: objects of ``__torch__.*`` classes, built with NEWOBJ and filled with
  BUILD from a dict of attributes (tensors, submodules, plain values). It is unpickled by ``_RestrictedUnpickler``,
  whose ``find_class`` admits only ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``,
  ``collections.OrderedDict``, ``torch.jit._pickle``'s typed-list tags (``build_intlist`` ...), the typed storage
  names ``torch.<Dtype>Storage`` and ``__torch__.*`` class names. Each of these is mapped to a local stand-in (the
  real torch callables are never called); anything else, e.g. the ``os.system`` of a ``__reduce__`` payload,
  raises ``UnsafeArchiveError`` before it can run.
- Tensor bytes come from the zip's ``<archive>/data/<key>`` entries, named by the pickle's persistent ids
  ``("storage", <Dtype>Storage, key, location, numel)``; ``location`` (e.g. "cuda:0") is ignored: tensors are CPU.
- Which tensor attributes are parameters or buffers (the module's ``state_dict``) is declared in the archive's
  ``code/`` files as ``__parameters__ = [...]`` / ``__buffers__ = [...]`` class attributes; they are read as
  text with ``ast.literal_eval``, never imported or executed. A class without such a declaration contributes all
  its tensor attributes.

Public API: ``read_torchscript_tensors(path) -> dict[str, torch.Tensor]``, names as in the scripted module's
``state_dict()`` (dotted attribute paths), tensors in their stored dtype on the CPU.
"""

from __future__ import annotations

import ast
import collections
import io
import os
import pickle
import re
import zipfile

import torch

__all__ = ["UnsafeArchiveError", "read_torchscript_tensors"]

# torch.<Name>Storage as written by torch.save / torch.jit.save -> dtype of its elements.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}
# torch.jit._pickle helpers that tag plain lists with their TorchScript element type (e.g. nn.MultiheadAttention's
# attributes); they return their first argument unchanged, and so does the stand-in.
JIT_TYPED_CONTAINERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")
_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\s*$")
_DECL_RE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*\])\s*$")


class UnsafeArchiveError(pickle.UnpicklingError):
    """The archive's pickle names something other than tensors, storages and plain containers."""


class _StorageType:
    """Stand-in for ``torch.<Dtype>Storage`` in a persistent id: only its dtype is used."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _ScriptObject:
    """Stand-in for a ``__torch__.*`` module object: NEWOBJ makes an empty one, BUILD stores its attributes."""

    qualname = "__torch__"

    def __init__(self):  # REDUCE on a stand-in class with arguments fails: no attribute can be injected that way
        self.attrs: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafeArchiveError(f"{self.qualname}: unexpected object state of type {type(state).__name__}")
        self.attrs = state


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` on a flat 1-D tensor standing for the storage."""
    if not isinstance(storage, torch.Tensor):
        raise UnsafeArchiveError(f"tensor rebuilt from a {type(storage).__name__}, not a storage of the archive")
    if backward_hooks:
        raise UnsafeArchiveError("tensor with backward hooks in the archive")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(storage_offset))


def _typed_container(value, *type_tag):
    if not isinstance(value, (list, tuple, dict)):
        raise UnsafeArchiveError(f"typed container holding a {type(value).__name__}")
    return value


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra):
    if backward_hooks:
        raise UnsafeArchiveError("parameter with backward hooks in the archive")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of ``data.pkl`` whose globals are local stand-ins; storages are read from the zip."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in JIT_TYPED_CONTAINERS:
            return _typed_container
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        raise UnsafeArchiveError(
            f"{self.path}: refusing to load '{module}.{name}': only tensors, storages and plain containers are read "
            "from TorchScript archives (the file may be corrupt or malicious)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeArchiveError(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeArchiveError(f"{self.path}: malformed storage reference {pid!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
            if len(raw) != numel * itemsize:
                raise ValueError(
                    f"{self.path}: storage {key} holds {len(raw)} bytes, expected {numel} x {itemsize} (truncated?)"
                )
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if numel else None
            self.storages[key] = flat if flat is not None else torch.empty(0, dtype=storage_type.dtype)
        return self.storages[key]


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The one top-level folder holding ``data.pkl`` (``ViT-L-14/`` in OpenAI's file), with a trailing slash."""
    roots = sorted({n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1})
    if len(roots) != 1:
        raise ValueError(f"{path} is not a TorchScript/torch.save archive: expected one '<name>/data.pkl', got {roots}")
    return roots[0]


def _state_declarations(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """``__torch__`` class name -> its declared parameter and buffer names, read as text from ``code/``."""
    decls: dict[str, set[str]] = {}
    code_root = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code_root) and name.endswith(".py")):
            continue
        module = name[len(code_root) : -len(".py")].replace("/", ".")  # code/__torch__/a/b.py -> __torch__.a.b
        current = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            if m := _CLASS_RE.match(line):
                current = f"{module}.{m.group(1)}"
                decls.setdefault(current, set())
            elif current is not None and (m := _DECL_RE.match(line)):
                decls[current].update(str(n) for n in ast.literal_eval(m.group(2)))
    return decls


def _collect(obj, prefix: str, decls: dict[str, set[str]], out: dict[str, torch.Tensor]) -> None:
    """Depth-first walk of the module tree in attribute order (the order of ``state_dict``)."""
    if isinstance(obj, _ScriptObject):
        declared = decls.get(obj.qualname)
        for attr, value in getattr(obj, "attrs", {}).items():  # no BUILD: an object without attributes
            if isinstance(value, torch.Tensor):
                if declared is None or attr in declared:
                    out[prefix + attr] = value
            elif isinstance(value, _ScriptObject):
                _collect(value, f"{prefix}{attr}.", decls, out)
    elif isinstance(obj, dict):  # a plain torch.save'd (nested) state dict
        for k, value in obj.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}{k}"] = value
            elif isinstance(value, (dict, _ScriptObject)):
                _collect(value, f"{prefix}{k}.", decls, out)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a ``torch.jit.save`` archive, by ``state_dict`` name, without executing code.

    Tensors keep their stored dtype (fp16 for OpenAI CLIP) and are returned on the CPU, detached. Raises
    ``UnsafeArchiveError`` when the archive's pickle names anything but tensors, storages and plain containers,
    and ``ValueError`` when the file is not such an archive.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
            raise ValueError(f"{path}: big-endian archives are not supported")
        root = _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix, path).load()
        decls = _state_declarations(archive, prefix)
    out: dict[str, torch.Tensor] = {}
    _collect(root, "", decls, out)
    return {k: v.detach() for k, v in out.items()}
