"""A training recipe as data: for any step, which modules train, how the forward runs, which loss terms apply and
with which weights. The trainer only asks (``recipe.phase(step)``, ``phase.align_weight(step)``); it holds no
recipe-specific branches.

Recipes built from the configuration (``build_recipe``):
    REPA   one phase: full model, L = L_den + lambda L_proj with lambda = --proj-coeff     (REPA train.py:311)
    ERW    warm-up phase (steps < W): blocks 1..l2r_depth, the embedders and the projectors train on the clean
           latent at t = 0 with RoPE off, L = --proj-coeff x L_proj (no denoising term, nothing after block
           l2r_depth computed); full phase: every module, the projectors read block --encoder-depth,
           L = L_den + lambda(step) L_proj with lambda(step) = c0 * 2^(-(step - W) / 50000), c0 = 6 (XL), 3 (L),
           1 (others)                                                (LINs-lab/ERW train.py:162-176, 286-295)
    HASTE  alignment off from step S on (--align-stop-step): the target encoders are no longer run.
The weight of the alignment term can also follow a constant, exp-decay or cosine law (--proj-coeff-schedule).
See docs/objective.md §Alignment loss and README §ERW.
"""

import math
from dataclasses import dataclass, field

# Parameters of SiT that ERW's warm-up trains besides blocks 1..l2r_depth (LINs-lab/ERW models/sit.py:280-310:
# the warm-up model holds exactly these and the first blocks; pos_embed is a frozen buffer-like parameter). With REG
# the class token's embedding (cls_projectors2, wg_norm) runs in the warm-up too (docs/methods.md §ERW).
WARMUP_MODULES = ("x_embedder.", "t_embedder.", "y_embedder.", "projectors.", "cls_projectors2.", "wg_norm.")

SCHEDULES = ("constant", "exp", "cosine")

# The training settings REG's and iREPA's train.py share (both REPA's train.py defaults, as their commands run them):
# AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0, eps 1e-8, clipping 1.0, global batch 256, EMA 0.9999, fp16, TF32.
_REPA_TRAINING = {
    "learning_rate": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "batch_size": 256,
    "ema_decay": 0.9999,
    "mixed_precision": "fp16",
    "allow_tf32": True,
}
# The REPA family's published recipes as presets (docs/methods.md §Preset; registered in repa_fast.config.PRESETS).
# REG (Martinser/REG train.sh and train.py:386-436): SiT-XL/2 + DINOv2-B, encoder depth 8, proj coeff 0.5, --cls
# 0.03, AdamW lr 1e-4 betas (0.9, 0.999) wd 0 eps 1e-8, clip 1.0, batch 256, fp16 with TF32, EMA 0.9999, 1M steps
# and a checkpoint every 10K (its train.py defaults; train.sh sets neither).
REG_PRESET = {
    "model": "SiT-XL/2",
    "enc_type": "dinov2-vit-b",
    "encoder_depth": 8,
    "proj_coeff": 0.5,
    "reg": True,
    "cls": 0.03,
    **_REPA_TRAINING,
    "max_train_steps": 1000000,
    "checkpointing_steps": 10000,
    "sampling_steps": 10000,
}
# iREPA (End2End-Diffusion/iREPA ldm/configs/irepa.yaml: conv projector, proj_coeff 1.0, spnorm zscore; the rest
# ldm/train.py:422-489: alpha 0.6, AdamW lr 1e-4 betas (0.9, 0.999) wd 0 eps 1e-8, clip 1.0, batch 256, fp16 with
# TF32, EMA 0.9999, 400K steps, a checkpoint every 50K). Kernel size 3, as its model and README (its train.py: 1).
IREPA_PRESET = {
    "model": "SiT-XL/2",
    "enc_type": "dinov2-vit-b",
    "encoder_depth": 8,
    "projection_layer_type": "conv",
    "proj_kwargs_kernel_size": 3,
    "proj_coeff": 1.0,
    "spnorm_method": "zscore",
    "zscore_alpha": 0.6,
    **_REPA_TRAINING,
    "max_train_steps": 400000,
    "checkpointing_steps": 50000,
    "sampling_steps": 50000,
}
FAMILY_SWITCHES = {  # what each method turns on, applied to the embedded digits demo for the *-demo presets
    "reg": {"reg": True, "cls": 0.03},
    "irepa": {"projection_layer_type": "conv", "proj_kwargs_kernel_size": 3, "proj_coeff": 1.0,
              "spnorm_method": "zscore", "zscore_alpha": 0.6},
}  # fmt: skip


def family_presets(demo: dict) -> dict[str, dict]:
    """``reg``, ``irepa`` (the published recipes) and ``reg-demo``, ``irepa-demo``: the digits ``demo`` preset with
    the method switched on (digits-ssl's class token is its pooled global feature, docs/methods.md §REG)."""
    return {
        "reg": dict(REG_PRESET),
        "irepa": dict(IREPA_PRESET),
        **{f"{k}-demo": {**demo, **v, "exp_name": f"{k}-demo"} for k, v in FAMILY_SWITCHES.items()},
    }


def method_summary(cfg) -> dict:
    """The family method a configuration trains and its settings (``train.py --dry-run`` prints it)."""
    m, loss = cfg.model, cfg.loss
    names = [n for n, on in (("ERW", loss.warmup_steps > 0), ("REG", m.reg)) if on]
    irepa = m.projection_layer_type != "mlp" or loss.spnorm_method != "none"
    if irepa:
        names.append("iREPA")
    aligns = bool(cfg.target.enc_type) and loss.proj_coeff != 0
    if loss.align_stop_step:
        names.append("HASTE-style stop")
    out = {"method": " + ".join(names) or ("REPA" if aligns else "SiT"), "proj_coeff": loss.proj_coeff}
    if m.reg:
        out["reg"] = {"cls_coeff": loss.cls, "class_token": f"{cfg.target.enc_type.split(',')[0]} class token"}
    if irepa:
        out["irepa"] = {
            "projection_layer_type": m.projection_layer_type,
            "proj_kernel_size": m.proj_kwargs_kernel_size if m.projection_layer_type == "conv" else None,
            "spnorm_method": loss.spnorm_method,
            "zscore_alpha": loss.zscore_alpha if loss.spnorm_method == "zscore" else None,
        }
    return out


def erw_c0(model_name: str) -> float:
    """ERW's initial full-phase weight from the model name: 6 if it contains "xl", else 3 if "l", else 1.

    The order of the tests is ERW's (train.py:164-170): "SiT-XL/2" -> 6, "SiT-L/2" -> 3, "SiT-B/2" -> 1.
    """
    name = model_name.lower()
    if "xl" in name:
        return 6.0
    if "l" in name:
        return 3.0
    return 1.0


@dataclass(frozen=True)
class Weight:
    """The alignment weight over a step range [start, end): c0 * law((step - start) / ...), clamped to the range.

    constant: c0;  exp: c0 * 2^(-s / half_life);  cosine: c0 * (1 + cos(pi s / (end - start))) / 2, with
    s = clamp(step - start, 0, end - start) (ERW clamps the same way, train.py:172-174).
    """

    c0: float
    schedule: str = "constant"
    start: int = 0
    end: int = 0
    half_life: float = 50000.0

    def __call__(self, step: int) -> float:
        s = min(max(step - self.start, 0), max(self.end - self.start, 0))
        if self.schedule == "constant":
            return self.c0
        if self.schedule == "exp":
            return self.c0 * 2.0 ** (-s / self.half_life)
        if self.schedule == "cosine":
            span = max(self.end - self.start, 1)
            return self.c0 * 0.5 * (1.0 + math.cos(math.pi * s / span))
        raise ValueError(f"alignment weight schedule {self.schedule!r} is unknown; choose one of {SCHEDULES}")


@dataclass(frozen=True)
class Phase:
    """One stretch of training with fixed trainable set, forward and loss terms."""

    name: str
    start: int  # first step (0-indexed optimizer step) of the phase
    end: int  # first step after it
    weight: Weight  # alignment weight, called with the step
    num_blocks: int | None = None  # truncated forward through the first blocks only (None: the whole model)
    align_depth: int | None = None  # block the projectors read (None: the model's encoder_depth)
    denoising: bool = True  # the denoising term applies
    align: bool = True  # the alignment term applies (encoders run)
    clean_input: bool = False  # x0 at t = 0 instead of an interpolant sample
    use_rope: bool | None = None  # False forces RoPE off in this phase (None: the model's setting)
    trainable_prefixes: tuple[str, ...] | None = None  # parameter-name prefixes that train (None: all)
    frozen_prefixes: tuple[str, ...] = ()  # parameter-name prefixes that do not train (unused modules)

    def trains(self, name: str) -> bool:
        listed = self.trainable_prefixes is None or name.startswith(self.trainable_prefixes)
        return listed and not (self.frozen_prefixes and name.startswith(self.frozen_prefixes))

    def align_weight(self, step: int) -> float:
        return self.weight(step) if self.align else 0.0

    def describe(self) -> dict:
        return {
            "phase": self.name,
            "steps": [self.start, self.end],
            "trains": "all" if self.trainable_prefixes is None else list(self.trainable_prefixes),
            "forward": f"first {self.num_blocks} blocks" if self.num_blocks else "full model",
            "input": "clean latent, t = 0" if self.clean_input else "interpolant x_t, t ~ weighting",
            "rope": "off" if self.use_rope is False else "model setting",
            "loss": self._loss_text(),
            "align_block": self.align_depth,
        }

    def _loss_text(self) -> str:
        terms = ["L_den"] if self.denoising else []
        if self.align:
            w = self.weight
            law = {
                "constant": f"{w.c0:g}",
                "exp": f"{w.c0:g} * 2^(-(step - {w.start}) / {w.half_life:g})",
                "cosine": f"{w.c0:g} * (1 + cos(pi (step - {w.start}) / {w.end - w.start})) / 2",
            }[w.schedule]
            terms.append(f"{law} x L_proj")
        return " + ".join(terms) or "none"


@dataclass(frozen=True)
class Recipe:
    phases: tuple[Phase, ...] = field(default_factory=tuple)

    def phase(self, step: int) -> Phase:
        """The phase that step ``step`` (0-indexed: the update that brings the count to step + 1) belongs to."""
        for p in self.phases:
            if step < p.end:
                return p
        return self.phases[-1]

    def boundaries(self) -> list[int]:
        """Steps at which a phase ends and another begins (each is saved as a checkpoint)."""
        return [p.end for p in self.phases[:-1]]

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.phases]


def build_recipe(cfg) -> Recipe:
    """The recipe the configuration asks for (``cfg`` is a repa_fast.config.TrainConfig)."""
    m, loss, total = cfg.model, cfg.loss, cfg.run.max_train_steps
    warm = loss.warmup_steps
    stop = loss.align_stop_step or total
    phases = []
    if warm > 0:
        blocks = tuple(f"blocks.{i}." for i in range(m.l2r_depth))
        phases.append(
            Phase(
                "warmup",
                0,
                warm,
                Weight(loss.proj_coeff),
                num_blocks=m.l2r_depth,
                align_depth=m.l2r_depth,
                denoising=False,
                clean_input=True,
                use_rope=False,
                trainable_prefixes=WARMUP_MODULES + blocks,
            )
        )
    schedule = loss.proj_coeff_schedule
    if schedule == "auto":  # ERW's command line (--warmup-steps) gives ERW's decay, REPA's gives a constant
        schedule = "exp" if warm > 0 else "constant"
    c0 = loss.proj_coeff_start
    if c0 is None:
        c0 = erw_c0(m.model) if warm > 0 and schedule == "exp" else loss.proj_coeff
    weight = Weight(c0, schedule, warm, total, float(loss.proj_half_life))
    name = "full" if warm > 0 else "repa"
    phases.append(Phase(name, warm, min(stop, total), weight, align_depth=m.encoder_depth))
    if stop < total:  # HASTE: the alignment term (and the target encoders) stop at step S
        phases.append(Phase("no-align", stop, total, weight, align=False, frozen_prefixes=("projectors.",)))
    return Recipe(tuple(phases))
