"""REPA's files: the reference train.py's checkpoints and the released / exported state dicts.

    reference train.py   ``{"model", "ema", "opt", "args": Namespace of flags, "steps"}`` (REPA train.py:330-338)
    REPA release         a bare SiT state dict (``pretrained_models/last.pt``), or ``{"ema": state_dict}`` as
                         generate.py reads it and ``python -m repa_fast.export`` writes it    (REPA generate.py:78-81)
    old REPA runs        ``decoder_blocks.i.*`` keys: ``legacy_remap``, on request (generate ``--legacy``)
Key names are ours already (repa_fast keeps the reference SiT's names); a DDP ``module.`` prefix is dropped.
"""

from repa_fast.errors import CheckpointError

from .base import StateDictAdapter, is_state_dict, is_train_layout

# The reference train.py flags that are repa_fast options of the same name and meaning (REPA train.py:398-438)
# and describe the weights: what a reader of the file may take from them.
REPA_ARCH_KEYS = ("model", "enc_type", "encoder_depth", "qk_norm", "num_classes", "resolution")


class REPATrain(StateDictAdapter):
    """A reference train.py checkpoint: the raw model, its EMA, the AdamW state (indexed over
    ``model.parameters()``), the flags and the step."""

    name = "reference"
    layout = "sihyun-yu/REPA train.py:330-338"
    config_keys = REPA_ARCH_KEYS

    def detect(self, obj) -> bool:
        return is_train_layout(obj) and obj.get("model") is not None


class REPARelease(StateDictAdapter):
    """A bare state dict (REPA's released ``last.pt``) or ``{"ema": state_dict}`` (REPA generate.py's ``--ckpt``
    layout, our export): weights only, read as the EMA weights."""

    name = "state-dict"
    layout = "sihyun-yu/REPA generate.py:78-81"
    config_keys = REPA_ARCH_KEYS

    def detect(self, obj) -> bool:
        return is_state_dict(obj) or (is_train_layout(obj) and obj.get("model") is None)


def legacy_remap(sd: dict, encoder_depth: int) -> dict:
    """The reference's ``--legacy``: ``decoder_blocks.i.*`` -> ``blocks.(i + encoder_depth).*``.

    As REPA's ``load_legacy_checkpoints`` (utils.py:203-215), used by its generate.py.
    """
    if not any(k.startswith("decoder_blocks.") for k in sd):
        raise CheckpointError(
            "--legacy remaps decoder_blocks.* keys, but this checkpoint has none: it is in the current layout; "
            "drop --legacy"
        )
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder_blocks."):
            _, idx, rest = k.split(".", 2)
            k = f"blocks.{int(idx) + encoder_depth}.{rest}"
        out[k] = v
    return out
