"""What every state-dict adapter shares: the safe reader, the parts of a foreign file, the base class.

A foreign file (anything that is not a repa_fast checkpoint directory) is read with ``torch.load(weights_only=True)``
and one admitted class, the ``argparse.Namespace`` in which the reference train.py saves its flags (REPA
train.py:334); it is rebuilt as ``SavedArgs`` (attributes only, no code), so reading never imports or runs anything
named in the file. Anything else pickled in the file is refused before any of it runs.
"""

import pickle
import re
from dataclasses import dataclass, field

import torch

from repa_fast.errors import CheckpointError

# Non-persistent in our SiT, persistent in ERW's RoPE module (LightningDiT models/pos_embed.py): rebuilt, never read.
ROPE_TABLE = re.compile(r"(^|\.)(freqs_cos|freqs_sin|rope_cos|rope_sin)$")
DDP_PREFIX = "module."  # a DistributedDataParallel wrapper's state dict (users' re-saves of the reference's model)


class SavedArgs:
    """Stands in for the ``argparse.Namespace`` a reference train.py checkpoint pickles: its attributes, nothing
    else (the unpickler builds it from the file's ``argparse.Namespace`` entry without importing argparse)."""


SAFE_GLOBALS = [(SavedArgs, "argparse.Namespace")]


def load_pickle_safely(path: str):
    """``torch.load`` of a .pt file admitting no class but the saved args; a refusal is a CheckpointError.

    The message says which of three things the file is: not a torch.save file at all (a run's config.json, text), a
    damaged one, or one that pickles other classes. It never repeats torch's advice to retry with
    ``weights_only=False``, which would run whatever the file names."""
    refuse_non_torch_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        found = _UNSAFE_GLOBAL.search(str(e))
        if found is None:
            raise CheckpointError(
                f"{path}: refused to load: the file is damaged or truncated ({torch_reason(e)}); copy it again "
                "or pass another checkpoint"
            ) from e
        raise CheckpointError(
            f"{path}: refused to load: it pickles objects other than tensors, containers and argparse.Namespace "
            f"({found.group(0)}). Nothing in it was run. If you trust the file, re-save its state dicts with plain "
            "torch.save({'model': ..., 'ema': ...}) and pass that file."
        ) from e


# torch's words for a class the weights-only unpickler refuses ("Unsupported global: GLOBAL mod.Name ...").
_UNSAFE_GLOBAL = re.compile(r"Unsupported (global|class): \S+ [\w.]+")
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # a zip archive (torch.save since 1.6), a pickle (the legacy format)


def torch_reason(e: BaseException) -> str:
    """The first line of torch's error without its advice (re-running with weights_only=False; 'if you trust')."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:  # the unpickler's own words follow torch's advice
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    first = text.splitlines()[0] if text else type(e).__name__
    for cut in (" Re-running", " In PyTorch 2.6", " This is an internal", " If you are seeing", " This can happen"):
        first = first.split(cut)[0]
    return first.strip()[:200] or type(e).__name__


def refuse_non_torch_file(path: str) -> None:
    """A CheckpointError when ``path`` is not a torch.save file; a run's config.json points to its run directory."""
    import json
    import os

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
    if head.startswith(_TORCH_MAGIC):
        return
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError):
        obj = None
    run_dir = os.path.dirname(os.path.abspath(path))
    if isinstance(obj, dict) and "trainer" in obj:
        raise CheckpointError(
            f"{path} is a run's configuration (JSON), not a checkpoint: pass the run directory itself, --ckpt "
            f"{run_dir} (its newest checkpoint and this config are read from there), or one of {run_dir}/checkpoints/*"
        )
    kind = "a JSON file" if obj is not None else f"not a torch.save file (it starts with {head!r})"
    if path.endswith(".safetensors"):
        kind = "a safetensors file, read only as a checkpoint's ema.safetensors / model.safetensors"
    raise CheckpointError(
        f"{path}: refused to load: {kind}, not a checkpoint; pass a run directory, a checkpoint directory or a .pt "
        "file written by torch.save"
    )


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def is_train_layout(obj) -> bool:
    """The reference train.py's container: ``{"model", "ema", "opt", "args", "steps"}`` (some may be missing)."""
    return isinstance(obj, dict) and not is_state_dict(obj) and ("ema" in obj or "model" in obj)


def saved_args(obj) -> dict:
    """The flags a train-layout file saved, as a dict (empty for a bare state dict)."""
    args = obj.get("args") if is_train_layout(obj) else None
    if args is None:
        return {}
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def main_weights(obj) -> dict | None:
    """The weights that define the file's architecture: the raw model's, else the EMA's (a bare state dict: itself)."""
    if is_state_dict(obj):
        return obj
    if is_train_layout(obj):
        return obj.get("model") if obj.get("model") is not None else obj.get("ema")
    return None


@dataclass
class ForeignCheckpoint:
    """The parts of a foreign file (missing parts are None) and the adapter that read it."""

    kind: str  # the adapter's name: "reference", "erw", "erw-warmup", "state-dict"
    model: dict | None
    ema: dict | None
    opt: dict | None
    args: dict = field(default_factory=dict)
    step: int | None = None
    adapter: "StateDictAdapter | None" = None

    def as_dict(self) -> dict:
        """The mapping view ``compat.read_foreign`` has always returned (plus the adapter)."""
        return {k: getattr(self, k) for k in ("kind", "model", "ema", "opt", "args", "step", "adapter")}


class StateDictAdapter:
    """One foreign checkpoint format: how to recognise it, where its parts are, how its keys and saved flags map to
    ours (torchtitan's state-dict adapters, torchtitan/protocols/state_dict_adapter.py: one class per format).

    Subclasses set ``name`` (the format's kind), ``layout`` (the reference file:line that writes it) and
    ``config_keys`` (its saved flags that are repa_fast options of the same name and meaning), and implement
    ``detect``. The defaults read the reference train.py's container or a bare state dict, and map keys by
    dropping a DDP ``module.`` prefix and the RoPE tables our SiT rebuilds.
    """

    name = ""
    layout = ""
    config_keys: tuple[str, ...] = ()

    def detect(self, obj) -> bool:
        """Whether the loaded object ``obj`` is in this format."""
        raise NotImplementedError

    def read(self, obj) -> ForeignCheckpoint:
        if is_state_dict(obj):
            return ForeignCheckpoint(self.name, None, obj, None, {}, None, self)
        return ForeignCheckpoint(
            self.name,
            obj.get("model"),
            obj.get("ema"),
            obj.get("opt"),
            saved_args(obj),
            int(obj["steps"]) if "steps" in obj else None,
            self,
        )

    def to_ours(self, sd: dict) -> tuple[dict, list[str]]:
        """Their keys -> ours; returns (state dict, dropped keys)."""
        out, dropped = {}, []
        for k, v in sd.items():
            k = k.removeprefix(DDP_PREFIX)
            if ROPE_TABLE.search(k):
                dropped.append(k)
                continue
            out[k] = v
        return out, dropped

    def config(self, args: dict) -> dict:
        """Their saved flags -> our flat options (the ones of the same name and meaning)."""
        return {k: args[k] for k in self.config_keys if k in args}


def arch_from_keys(sd: dict) -> dict:
    """What a SiT state dict's keys and shapes tell: projector widths and type (REPA's MLP, iREPA's linear / conv and
    the conv's kernel size), REG's class token, depth, qk-norm, channels, classes, tokens (patch tokens only)."""
    z_dims, kind, kernel = [], "mlp", 3
    while f"projectors.{len(z_dims)}.4.weight" in sd:
        z_dims.append(sd[f"projectors.{len(z_dims)}.4.weight"].shape[0])
    while f"projectors.{len(z_dims)}.projection_layer.weight" in sd:  # iREPA's ProjectionLayer (ldm/models/sit.py)
        w = sd[f"projectors.{len(z_dims)}.projection_layer.weight"]
        kind, kernel = ("conv", w.shape[-1]) if w.dim() == 4 else ("linear", 3)
        z_dims.append(w.shape[0])
    reg = "cls_projectors2.weight" in sd  # REG models/sit.py:222
    return {
        "z_dims": z_dims,
        "projection_layer_type": kind,
        "proj_kernel_size": kernel,
        "reg": reg,
        "projector_dim": sd["projectors.0.0.weight"].shape[0] if z_dims and kind == "mlp" else 2048,
        "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
        "in_channels": sd["x_embedder.proj.weight"].shape[1],
        "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "num_patches": sd["pos_embed"].shape[1] - int(reg),  # REG's pos_embed has the class token's row first
        "hidden_size": sd["pos_embed"].shape[2],
    }
