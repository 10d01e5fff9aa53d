"""The cost model's prediction (repa_fast/cost, bench/step_model.py) for each headline provider, so that the report
sets the measured img/s beside the predicted one, in separate columns (STYLE.md: predicted and measured are never
mixed in one column). Structures: the reference row as the headline runs it (one process, the headline's precision,
its three ``.item()`` syncs, our encoder with explicit-softmax attention), and the code as built with the attention
backend "auto" picks on this card, ``--kernels ref``, cuDNN attention or fp8. "reference compiled" has no structure
in the model (what Inductor fuses in the reference step is not modelled): no prediction.
"""

from __future__ import annotations

from dataclasses import replace

CARDS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))  # device-name substring -> repa_fast.cost.GPUS
COST_ATTN = {"flash3": "flash3", "flash2": "flash2", "cudnn_attention": "cudnn", "sdpa": "sdpa-flash"}


def card_key(device_name: str) -> str | None:
    return next((key for sub, key in CARDS if sub in device_name), None)


def structures(amp: str, attn: str) -> dict:
    """provider -> StepStructure, ``attn`` the cost model's name of the attention that "auto" runs."""
    from repa_fast.cost import AS_BUILT, REFERENCE

    ours = replace(AS_BUILT, amp=amp, attn_backend=attn, encoder_attn=attn)
    return {
        "reference eager": replace(
            REFERENCE,
            name="reference (one process)",
            amp=amp,
            parallel="none",
            encoder="ours",
            grad_scaler=amp == "fp16",
            host_syncs=3 + (amp == "fp16"),
        ),
        "ours impl=ref": replace(ours, name="as built, impl=ref", impl="ref"),
        "ours triton": replace(ours, name="as built"),
        "ours + cuDNN attention": replace(ours, name="as built, cuDNN attention", attn_backend="cudnn"),
        "ours + fp8": replace(ours, name="as built, fp8 tensorwise", fp8="tensorwise"),
    }


def predictions(device_name: str, model: str, enc_type: str, resolution: int, batch: int, amp: str, attn: str):
    """provider -> {predicted_img_s, predicted_ms_per_step, structure, card}; {} for a card the model lacks."""
    from repa_fast.cost import GPUS, Config, Efficiency, predict

    key = card_key(device_name)
    if key is None or amp == "no":
        return {}
    cfg = Config(model, tuple(e.strip() for e in enc_type.split(",")), resolution, batch, 1)
    out = {}
    for provider, st in structures(amp, COST_ATTN.get(attn, "sdpa-flash")).items():
        row = predict(cfg, st, GPUS[key], Efficiency())
        out[provider] = {
            "predicted_img_s": round(row["predicted_img_s"], 1),
            "predicted_ms_per_step": round(1e3 * batch / row["predicted_img_s"], 2),
            "structure": st.name,
            "card": GPUS[key].name,
        }
    return out
