"""repa_fast.utils.torchscript_reader: tensors of torch.jit.save archives, read without executing anything."""

import io
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn as nn

from repa_fast.utils.torchscript_reader import UnsafeArchiveError, read_torchscript_tensors

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.register_buffer("running", torch.randn(7))
        self.scratch = torch.randn(3)  # a plain tensor attribute: not in state_dict, must not be returned

    def forward(self, x):
        return self.lin(x) + self.running + self.scratch.sum()


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Leaf()
        self.blocks = nn.ModuleList([Leaf(), Leaf()])
        self.head = nn.Sequential(nn.LayerNorm(7), nn.Linear(7, 2, bias=False))
        self.scale = nn.Parameter(torch.randn(2))
        self.register_buffer("steps", torch.randint(0, 100, (4,)))  # int64 buffer

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk.lin.weight.sum() + blk.running.sum()
        return self.head(x) * self.scale + self.steps.sum()


def _scripted(tmp_path, dtype=torch.float16):
    model = Tree()
    model.stem.to(dtype)
    model.blocks.to(dtype)
    model.scale.data = model.scale.data.to(dtype)
    path = tmp_path / "tree.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return model, path


def test_reads_nested_fp16_params_and_buffers(tmp_path):
    model, path = _scripted(tmp_path)
    got = read_torchscript_tensors(path)
    expected = model.state_dict()
    assert list(got) == list(expected)  # names and order of state_dict; the plain `scratch` attributes excluded
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype, name
        assert torch.equal(got[name], ref), name
        assert got[name].device.type == "cpu" and not got[name].requires_grad
    assert got["stem.lin.weight"].dtype == torch.float16 and got["steps"].dtype == torch.int64
    # Same as what torch.jit.load (which executes the archive) reports.
    assert {k: v.dtype for k, v in torch.jit.load(str(path)).state_dict().items()} == {
        k: v.dtype for k, v in got.items()
    }


def test_shared_storage_views(tmp_path):
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.randn(6, 4)
            self.register_buffer("a", base[1:4])
            self.register_buffer("b", base.t())

        def forward(self, x):
            return x + self.a.sum() + self.b.sum()

    m = Views()
    path = tmp_path / "views.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    got = read_torchscript_tensors(path)
    assert torch.equal(got["a"], m.a) and torch.equal(got["b"], m.b) and got["b"].stride() == m.b.stride()


class _Payload:
    """Pickles to `os.system("touch <marker>")` (what a malicious archive's data.pkl would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poisoned_copy(src, dst, payload_bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = payload_bytes
            zout.writestr(item, data)


def test_reduce_payload_is_refused_and_never_runs(tmp_path):
    _, path = _scripted(tmp_path)
    marker = tmp_path / "pwned"
    # An attribute dict whose second entry is the payload (it hides after legitimate data).
    payload = pickle.dumps({"weight": [0.5, 1.5], "evil": _Payload(marker)}, protocol=2)
    bad = tmp_path / "bad.pt"
    _poisoned_copy(path, bad, payload)
    with pytest.raises(UnsafeArchiveError, match="system"):
        read_torchscript_tensors(bad)
    assert not marker.exists()
    # The control: the same bytes, unpickled without restriction, do run the payload (so the test can fail).
    pickle.loads(payload)
    assert marker.exists()


def test_other_globals_refused(tmp_path):
    _, path = _scripted(tmp_path)
    bad = tmp_path / "bad.pt"
    _poisoned_copy(path, bad, pickle.dumps(io.BytesIO, protocol=2))
    with pytest.raises(UnsafeArchiveError, match="_io.BytesIO|io.BytesIO"):
        read_torchscript_tensors(bad)


def test_not_an_archive(tmp_path):
    f = tmp_path / "x.pt"
    f.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        read_torchscript_tensors(f)


def test_multihead_attention_typed_lists(tmp_path):
    """nn.MultiheadAttention (OpenAI CLIP's blocks) pickles torch.jit._pickle typed-list tags: read as data."""

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.ln_1 = nn.LayerNorm(8)

        def forward(self, x):
            return self.attn(self.ln_1(x), x, x, need_weights=False)[0]

    m = Blk().half()
    path = tmp_path / "mha.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    got = read_torchscript_tensors(path)
    assert list(got) == list(m.state_dict())
    assert all(torch.equal(got[k], v) and got[k].dtype == torch.float16 for k, v in m.state_dict().items())
