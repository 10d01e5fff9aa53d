"""State-dict adapters: one per foreign checkpoint format, each with its detection beside its key mapping
(the habit of torchtitan's state-dict adapters, torchtitan/protocols/state_dict_adapter.py).

    ERWWarmup    "erw-warmup"   ERW warm-up files (no final layer)                       erw.py
    ERWTrain     "erw"          ERW train.py checkpoints (the reference's container + ERW's flags)   erw.py
    REGTrain     "reg"          REG train.py checkpoints and weights (class-token keys)  reg.py
    IREPATrain   "irepa"        iREPA train.py checkpoints (its flags), weights (projection_layer keys)  irepa.py
    REPATrain    "reference"    the reference train.py's checkpoints                     repa.py
    REPARelease  "state-dict"   REPA's released last.pt, ``{"ema": ...}`` files (generate.py, our export)   repa.py

``load_weights(path, model, which)`` (``load.py``, public as ``repa_fast.load_weights``) reads any of them, or a
repa_fast checkpoint, strictly into a built model. ``read_foreign(path)`` loads a file safely
(``base.load_pickle_safely``) and hands it to the first adapter in ``ADAPTERS`` whose ``detect`` accepts it; the
order puts the specific formats before the generic layouts they share.
``repa_fast.engine.checkpoint.load_run`` (generate, export, layer features) and ``repa_fast.engine.compat``
(training's ``--resume-step`` / ``--init-from``) read foreign files only through here.

Adding a format (REG, iREPA, ...): a module in this package with a ``StateDictAdapter`` subclass (``name``,
``layout`` citing the reference file:line that writes the format, ``config_keys``, ``detect``, and ``read`` /
``to_ours`` where its container or keys differ from the reference's, e.g. REG's class-token weights), an entry in
``ADAPTERS`` above any adapter that would also accept its files, and a test in tests/engine/test_adapters.py that
writes small random weights in the real file layout (prefixes and extra keys included) and checks the detection and
the mapping.
"""

from repa_fast.errors import CheckpointError

from .base import ForeignCheckpoint, StateDictAdapter, arch_from_keys, is_state_dict, load_pickle_safely
from .erw import ERWTrain, ERWWarmup, complete_warmup, is_warmup_state
from .irepa import IREPATrain
from .load import check_fits, load_weights
from .reg import REGTrain
from .repa import REPARelease, REPATrain, legacy_remap

# REG before iREPA: a REG file is told by its keys whatever its projector; both before REPA's generic layouts.
ADAPTERS: tuple[StateDictAdapter, ...] = (
    ERWWarmup(),
    ERWTrain(),
    REGTrain(),
    IREPATrain(),
    REPATrain(),
    REPARelease(),
)

__all__ = [
    "ADAPTERS",
    "ForeignCheckpoint",
    "StateDictAdapter",
    "arch_from_keys",
    "check_fits",
    "complete_warmup",
    "detect",
    "is_state_dict",
    "is_warmup_state",
    "legacy_remap",
    "load_pickle_safely",
    "load_weights",
    "read_foreign",
]


def detect(obj, path: str) -> StateDictAdapter:
    """The adapter of a loaded file's object, or a CheckpointError naming ``path`` and the layouts read."""
    for adapter in ADAPTERS:
        if adapter.detect(obj):
            return adapter
    kinds = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"{path}: not a SiT checkpoint (expected a state dict or the keys 'model'/'ema'/'opt'/'args', got {kinds})"
    )


def read_foreign(path: str) -> ForeignCheckpoint:
    """A foreign .pt file's parts, read without unpickling anything but the saved args (``base``)."""
    obj = load_pickle_safely(path)
    return detect(obj, path).read(obj)
