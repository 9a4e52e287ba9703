"""Options of the pipeline optimizer: which parts make up the pipeline, and their settings.

The defaults are GaLore's; each preset (`lowmem.optim.presets`) subclasses this with its paper's defaults,
and YAML may override any part: `optimizer: {name: galore, projector: random, core: adafactor,
state_dtype: int4}`.

Every option belongs to a part of the pipeline (`Part`, in its field's metadata) or to every pipeline
(`EVERY_PIPELINE`): a key the YAML sets that no chosen part reads (`optimizer: {name: galore, window: 10}`:
window is MicroAdam's, galore's core is adam) is refused at config time, naming the part it applies to.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Collection, Optional

import torch

from lowmem.errors import ConfigError, closest
from lowmem.kernels.dispatch import BACKENDS, resolve_backend
from lowmem.optim.options import OptimizerOptions
from lowmem.config.schema import check_choice
from lowmem.optim.parts.cores import ADAM_CONVENTIONS, CORES, MOMENT_POLICIES
from lowmem.optim.parts.directions import DIRECTIONS
from lowmem.optim.parts.microadam import INDEX_LIMIT
from lowmem.optim.parts.projectors import BLOCK_ORDERS, PROJECTORS
from lowmem.optim.parts.residuals import FIRA_VARIANTS, RESIDUALS
from lowmem.optim.parts.transforms import COMPOSITES, expand, validate_transforms
from lowmem.optim.state.storage import STATE_DTYPES

NO_PROJECTOR = "none"  # every weight takes the dense path (AdamW-8bit, Adafactor, MicroAdam)
IMPLEMENTATIONS = ("auto", "per_weight", "batched")


@dataclass(frozen=True)
class Part:
    """The part of the pipeline an option configures: the key that chooses the part (`selector`: projector,
    core, residual, state_dtype or transforms) and the choices that read the option (`choices`; empty: any
    choice but none, or any transform)."""

    selector: str
    choices: tuple[str, ...] = ()

    def chosen(self, options: "PipelineOptions") -> list[str]:
        """What `options` chose for this part (for transforms: each one, the combinations expanded)."""
        value = getattr(options, self.selector)
        return expand(list(value)) if self.selector == "transforms" else [value]

    def reads(self, options: "PipelineOptions") -> bool:
        """Whether a part `options` chose reads the option."""
        chosen = [c for c in self.chosen(options) if c != NO_PROJECTOR]
        return any(c in self.choices for c in chosen) if self.choices else bool(chosen)

    def describe(self) -> str:
        """'core microadam', 'residuals sign_sgd or sgd', 'any projector but none', ..."""
        kind = "transform" if self.selector == "transforms" else self.selector
        if not self.choices:
            return f"any {kind}" + ("" if kind == "transform" else " but none")
        if len(self.choices) == 1:
            names = f"{kind} {self.choices[0]}"
        else:
            names = f"{kind}s {', '.join(self.choices[:-1])} or {self.choices[-1]}"
        within = sorted(name for name, members in COMPOSITES.items() if set(members) & set(self.choices))
        return names + (f" (also in {', '.join(within)})" if within else "")

    def describe_choice(self, options: "PipelineOptions") -> str:
        if self.selector != "transforms":
            return f"this optimizer's {self.selector} is {getattr(options, self.selector)}"
        chosen = self.chosen(options)
        return f"this optimizer's transforms are {', '.join(chosen)}" if chosen else "this optimizer has no transforms"


def part(selector: str, *choices: str) -> dict:
    """Field metadata: the option belongs to `Part(selector, choices)`."""
    return {"part": Part(selector, choices)}


EVERY_PIPELINE = {"part": None}  # read by every pipeline optimizer, whatever its parts
PROJECTOR = part("projector")
RANKED = part("projector", *sorted(name for name in PROJECTORS if name != "blocks"))  # blocks: density only
BLOCKS = part("projector", "blocks")
FIRA = part("residual", "fira")
SIGN_SGD_SGD = part("residual", "sign_sgd", "sgd")
ADAM_LIKE = part("core", "adam", "microadam")  # Adafactor decays before its step and keeps no Adam eps
ADAFACTOR = part("core", "adafactor")
MICROADAM = part("core", "microadam")
INT4 = part("state_dtype", "int4")
ADAGN = part("transforms", "adagn", "grad_norm_stabilizer")
ADACLIP = part("transforms", "adaclip")
SPAM_CLIP = part("transforms", "spam_clip")
MOMENT_RESET = part("transforms", "moment_reset")
ANY_TRANSFORM = part("transforms")  # the annealing of beta1 (and AdaGN's gamma1) runs with any transform


@dataclass
class PipelineOptions(OptimizerOptions):
    name: str = "galore"
    lr: Optional[float] = 0.01  # None only for Adafactor's relative_step (its own step size)
    eps: float = 1e-6
    # none | svd | randomized_svd | random | online_pca | dct | coordinates | blocks
    projector: str = field(default="svd", metadata=EVERY_PIPELINE)
    # Rows of the core; None: round(density * smaller side). Ignored by the blocks projector.
    rank: Optional[int] = field(default=None, metadata=RANKED)
    # Fraction of the smaller side (when rank is None), or of the projected weights for blocks. The
    # default, a quarter, is the papers' rank at 60M/350M/1B/7B (128/256/512/1024) and saves memory on
    # every shape; a rank equal to the smaller side would hold more state than AdamW.
    density: Optional[float] = field(default=0.25, metadata=PROJECTOR)
    update_gap: int = field(default=200, metadata=PROJECTOR)  # optimizer updates between projector refreshes
    # offset each weight's refresh so no single update pays every SVD
    stagger: bool = field(default=False, metadata=PROJECTOR)
    scale: float = field(default=0.25, metadata=PROJECTOR)  # multiplies the back-projected update (GaLore alpha)
    moments_on_refresh: str = field(default="keep", metadata=PROJECTOR)  # keep | reset | rotate
    # galore: eps not bias-scaled, decay after the step; torch: AdamW's (also where every core decays)
    adam_convention: str = field(default="galore", metadata=ADAM_LIKE)
    residual: str = field(default="drop", metadata=PROJECTOR)  # drop | fira | sign_sgd | sgd
    fira_gamma: float = field(default=1.01, metadata=FIRA)  # Fira's norm-growth limit per update
    # paper | code (Fira's released code, how its published tables were produced); see residuals.FiraResidual
    fira_variant: str = field(default="paper", metadata=FIRA)
    # FRUGAL: lr multiplier of the state-free residual step
    inactive_lr_scale: float = field(default=1.0, metadata=SIGN_SGD_SGD)
    # blocks projector: random | ascending | descending | mirror
    block_order: str = field(default="random", metadata=BLOCKS)
    core: str = field(default="adam", metadata=EVERY_PIPELINE)  # adam | adafactor | microadam
    # auto (the parameters' dtype) | fp32 | bf16 | int8 | int4: how the core's moments are stored
    state_dtype: str = field(default="auto", metadata=EVERY_PIPELINE)
    # int4 second moment normalized by min(row max, column max) instead of blocks (off: blocks measured better,
    # README "int4_rank1")
    int4_rank1: bool = field(default=False, metadata=INT4)
    # Adafactor core (lowmem.optim.parts.adafactor); its first moment is betas[0] (0: none)
    adafactor_eps: tuple[float, float] = field(default=(1e-30, 1e-3), metadata=ADAFACTOR)
    clip_threshold: float = field(default=1.0, metadata=ADAFACTOR)
    decay_rate: float = field(default=-0.8, metadata=ADAFACTOR)
    relative_step: bool = field(default=False, metadata=ADAFACTOR)
    scale_parameter: bool = field(default=False, metadata=ADAFACTOR)
    warmup_init: bool = field(default=False, metadata=ADAFACTOR)
    # fold the lr into U before the first moment (transformers, GaLoreAdafactor)
    lr_in_first_moment: bool = field(default=False, metadata=ADAFACTOR)
    # MicroAdam core (lowmem.optim.parts.microadam)
    window: int = field(default=10, metadata=MICROADAM)  # gradients kept
    k_init: float = field(default=0.01, metadata=MICROADAM)  # fraction of each block kept per update
    # elements per top-k block (int16 indices: at most 32768)
    topk_block: int = field(default=16384, metadata=MICROADAM)
    ef_block: int = field(default=64, metadata=MICROADAM)  # elements per min/max bucket of the 4-bit error feedback
    # MicroAdam's alpha: fraction of the error feedback added to each update (pretraining)
    ef_alpha: float = field(default=0.0, metadata=MICROADAM)
    # Gradient transforms (lowmem.optim.parts.transforms): spam_clip | adaclip | adagn | moment_reset |
    # grad_norm_stabilizer, or the combinations spam | stable_spam
    transforms: list[str] = field(default_factory=list, metadata=EVERY_PIPELINE)
    # Direction transforms (lowmem.optim.parts.directions), on the core's direction before back-projection:
    # cautious
    directions: list[str] = field(default_factory=list, metadata=EVERY_PIPELINE)
    # AdaGN's norm EMA (Stable-SPAM 4-bit: 0.7; GradientStabilizer 0.6)
    gamma1: float = field(default=0.7, metadata=ADAGN)
    gamma2: float = field(default=0.9, metadata=ADAGN)  # AdaGN's squared-norm EMA
    gamma3: float = field(default=0.999, metadata=ADACLIP)  # AdaClip's max EMA
    spam_theta: float = field(default=5000.0, metadata=SPAM_CLIP)  # SPAM: entries with g^2 > theta * V are clipped
    # SPAM: no clipping in the first updates of each reset window
    spam_clip_delay: int = field(default=20, metadata=SPAM_CLIP)
    reset_interval: int = field(default=500, metadata=MOMENT_RESET)  # moment_reset: updates between resets (Delta T)
    # SPAM's cosine lr warm-up after a reset (its preset: 150)
    reset_warmup: int = field(default=0, metadata=MOMENT_RESET)
    # restart Adam's bias correction at a reset (SPAM's code: false)
    reset_bias_correction: bool = field(default=True, metadata=MOMENT_RESET)
    # Stable-SPAM's code quirk (lowmem.optim.parts.transforms)
    reset_with_old_moments: bool = field(default=False, metadata=MOMENT_RESET)
    # Stable-SPAM's code quirk (lowmem.optim.parts.transforms)
    transform_steps_follow_reset: bool = field(default=False, metadata=MOMENT_RESET)
    # Stable-SPAM's total_T: cosine annealing of beta1 and gamma1
    anneal_steps: Optional[int] = field(default=None, metadata=ANY_TRANSFORM)
    # the annealing factor's end value (Stable-SPAM's eta_min)
    anneal_min: float = field(default=0.5, metadata=ANY_TRANSFORM)
    seed: int = field(default=0, metadata=EVERY_PIPELINE)  # seeds random projectors and block choices
    # auto (Triton kernels on CUDA, the pure-torch path elsewhere but a C++ kernel for quantized Adam
    # moments on CPU) | triton | torch (lowmem.kernels.dispatch)
    kernels: str = field(default="auto", metadata=EVERY_PIPELINE)
    # per_weight: the rule one weight at a time (the oracle) | batched: many weights per pass (lowmem.optim.batched,
    # Adam with fp32 moments) | auto: batched where the configuration allows it
    implementation: str = field(default="auto", metadata=EVERY_PIPELINE)

    @property
    def projects(self) -> bool:
        return self.projector != NO_PROJECTOR

    @property
    def group_lr(self) -> float:
        """The lr the parameter groups start at (Adafactor's relative step: 1, times the schedule)."""
        return 1.0 if self.lr is None else self.lr

    def validate(self) -> None:
        super().validate()
        self._validate_choices()
        # Options built in code: what differs from the preset's defaults must be read (the YAML: validate_given)
        self.validate_given([f.name for f in fields(self) if getattr(self, f.name) != _default(f)])
        if self.lr is None and not self.relative_step:
            raise ConfigError("optimizer.lr: required (only Adafactor's relative_step sets its own step size, as "
                              "configs/optimizers/adafactor.yaml sets it)")
        if self.lr is not None and self.relative_step:
            raise ConfigError("optimizer.lr: Adafactor's relative_step computes the step size itself "
                              "(min(1e-2, 1/sqrt(t)), times the weight's RMS with scale_parameter); set "
                              "optimizer.lr=null (configs/optimizers/adafactor.yaml: the paper's settings), or "
                              "optimizer.relative_step=false to use an external lr")
        if self.kernels == "triton":  # before any data is read: no CUDA device at all (the interpreter aside)
            try:
                resolve_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
            except RuntimeError as error:
                raise ConfigError(str(error)) from None
        self._validate_projection()
        self._validate_cores()
        validate_transforms(self)
        if self.implementation == "batched" and self.unbatchable():
            raise ConfigError(f"optimizer.implementation: batched steps the Adam core with no transforms; "
                              f"{self.unbatchable()}; use implementation auto or per_weight")

    def reads(self, key: str) -> bool:
        owner = PARTS.get(key)
        return super().reads(key) and (owner is None or owner.reads(self))

    def validate_given(self, given: Collection[str]) -> None:
        """Refuse a key the YAML set that no part this optimizer chose reads (`PARTS`, the fields' metadata).
        After validate(): the parts are known choices."""
        for key in given:
            if not self.reads(key):
                owner = PARTS[key]
                raise ConfigError(f"optimizer.{key}: applies to {owner.describe()}; {owner.describe_choice(self)}")

    def _validate_choices(self) -> None:
        for key, value, choices in (
            ("projector", self.projector, [NO_PROJECTOR, *PROJECTORS]),
            ("residual", self.residual, RESIDUALS),
            ("moments_on_refresh", self.moments_on_refresh, MOMENT_POLICIES),
            ("adam_convention", self.adam_convention, ADAM_CONVENTIONS),
            ("fira_variant", self.fira_variant, FIRA_VARIANTS),
            ("state_dtype", self.state_dtype, STATE_DTYPES),
            ("core", self.core, CORES),
            ("block_order", self.block_order, BLOCK_ORDERS),
            ("kernels", self.kernels, BACKENDS),
            ("implementation", self.implementation, IMPLEMENTATIONS),
        ):
            if value not in choices:
                raise ConfigError(f"optimizer.{key}: unknown value '{value}'{closest(str(value), choices)}; "
                                  f"choose from {sorted(choices)}")
        for i, name in enumerate(self.directions):
            check_choice(name, DIRECTIONS, f"optimizer.directions[{i}]")

    def _validate_projection(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"optimizer.rank: must be at least 1, got {self.rank}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"optimizer.density: must be in (0, 1], got {self.density}")
        if self.density is None and (self.rank is None or self.projector == "blocks"):
            raise ConfigError(f"optimizer.density: required with projector '{self.projector}' "
                              f"when rank is {self.rank}")
        if self.update_gap < 1:
            raise ConfigError(f"optimizer.update_gap: must be at least 1, got {self.update_gap}")
        if self.scale <= 0:
            raise ConfigError(f"optimizer.scale: must be positive, got {self.scale}")
        if self.fira_gamma < 1.0:
            raise ConfigError(f"optimizer.fira_gamma: must be >= 1, got {self.fira_gamma}")
        if self.inactive_lr_scale < 0:
            raise ConfigError(f"optimizer.inactive_lr_scale: must be >= 0, got {self.inactive_lr_scale}")
        if self.stagger and self.projector == "blocks":
            raise ConfigError("optimizer.stagger: not available with projector 'blocks', whose active weights "
                              "are drawn together at one refresh")
        if not self.projects and self.residual != "drop":
            raise ConfigError(f"optimizer.residual: '{self.residual}' acts on what a projector leaves out, and "
                              f"optimizer.projector is 'none'; choose a projector or residual 'drop'")

    def _validate_cores(self) -> None:
        if self.moments_on_refresh == "rotate" and not CORES[self.core].supports_rotation:
            raise ConfigError(f"optimizer.moments_on_refresh: 'rotate' needs moments expressed in the basis "
                              f"(core 'adam'); the '{self.core}' core cannot rotate its state")
        if self.core == "microadam" and self.state_dtype in ("int8", "int4"):
            raise ConfigError(f"optimizer.state_dtype: '{self.state_dtype}' cannot apply to the microadam core, "
                              f"whose window holds bf16 values and whose error feedback is already 4-bit; use "
                              f"auto (bf16 window) or fp32")
        if self.warmup_init and not self.relative_step:
            raise ConfigError("optimizer.warmup_init: applies to Adafactor's relative step; set "
                              "optimizer.relative_step=true (and optimizer.lr=null) or warmup_init=false")
        if self.clip_threshold <= 0:
            raise ConfigError(f"optimizer.clip_threshold: must be positive, got {self.clip_threshold}")
        if self.decay_rate >= 0:
            raise ConfigError(f"optimizer.decay_rate: must be negative (beta2_t = 1 - t^decay_rate), "
                              f"got {self.decay_rate}")
        for i, eps in enumerate(self.adafactor_eps):
            if eps < 0:
                raise ConfigError(f"optimizer.adafactor_eps[{i}]: must be >= 0, got {eps}")
        if self.window < 1:
            raise ConfigError(f"optimizer.window: MicroAdam keeps at least 1 gradient, got {self.window}")
        if not 0.0 < self.k_init <= 1.0:
            raise ConfigError(f"optimizer.k_init: the kept fraction must be in (0, 1], got {self.k_init}")
        if not 1 <= self.topk_block <= INDEX_LIMIT:
            raise ConfigError(f"optimizer.topk_block: must be in [1, {INDEX_LIMIT}] (int16 block-local indices), "
                              f"got {self.topk_block}")
        if not 0.0 <= self.ef_alpha < 1.0:
            raise ConfigError(f"optimizer.ef_alpha: MicroAdam's densification fraction must be in [0, 1), "
                              f"got {self.ef_alpha}")
        if self.ef_block < 1:
            raise ConfigError(f"optimizer.ef_block: must be at least 1, got {self.ef_block}")

    def validate_for_model(self, projected_shapes: dict[str, tuple[int, ...]]) -> None:
        if self.rank is None or self.projector in ("blocks", NO_PROJECTOR):
            return
        for name, shape in projected_shapes.items():
            if self.rank > min(shape):
                raise ConfigError(f"optimizer.rank: {self.rank} exceeds the smaller side of {name} "
                                  f"(shape {'x'.join(map(str, shape))}); use at most {min(shape)}")

    def unbatchable(self) -> str:
        """Why the batched implementation cannot step this configuration ('' when it can)."""
        if self.core != "adam":
            return f"this optimizer's core is {self.core}"
        if self.transforms or self.directions:
            return "this optimizer has " + ("transforms" if self.transforms else "direction stages")
        return ""  # quantized moments batch on the kernels only: PipelineOptimizer checks that for its weights

    def projected_sync_refusals(self) -> list[str]:
        """Why all-reducing R = P^T G instead of G would not be exact for this configuration, from what its
        parts declare (`sync_refusal`); empty: projected gradient sync applies."""
        if not self.projects:
            return [f"'{self.name}' projects no weight"]
        reasons = []
        if RESIDUALS[self.residual].sync_refusal:
            reasons.append(f"its residual '{self.residual}' {RESIDUALS[self.residual].sync_refusal}")
        if PROJECTORS[self.projector].sync_refusal:
            reasons.append(f"projector '{self.projector}' {PROJECTORS[self.projector].sync_refusal}")
        if CORES[self.core].sync_refusal:
            reasons.append(f"its core '{self.core}' {CORES[self.core].sync_refusal}")
        if self.transforms:
            reasons.append("its transforms read the whole gradient's max and norm")
        reasons += [f"direction '{name}' {DIRECTIONS[name].sync_refusal}" for name in self.directions
                    if DIRECTIONS[name].sync_refusal]
        return reasons

    def rank_for(self, shape: tuple[int, ...]) -> int:
        """Core rows for a weight of this shape: `rank`, or round(density * smaller side), at least 1."""
        if self.rank is not None:
            return self.rank
        return max(1, round(self.density * min(shape)))


def _default(f: Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


# Option -> the part that reads it (None: every pipeline). Taken from PipelineOptions itself: a preset that
# changes a default redeclares the field without its metadata.
PARTS: dict[str, Optional[Part]] = {f.name: f.metadata["part"] for f in fields(PipelineOptions) if "part" in f.metadata}
