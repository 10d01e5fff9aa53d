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
