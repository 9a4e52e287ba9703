"""Options of the pipeline optimizer: which parts make up the pipeline, and their settings.

The defaults are GaLore's; each preset (`lowmem.optim.presets`) subclasses this with its paper's defaults,
and YAML may override any part: `optimizer: {name: galore, projector: random, core: adafactor,
state_dtype: int4}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowmem.config import ConfigError, closest
from lowmem.kernels.dispatch import BACKENDS, resolve_backend
from lowmem.optim.cores import ADAM_CONVENTIONS, CORES, MOMENT_POLICIES
from lowmem.optim.microadam import INDEX_LIMIT
from lowmem.optim.projectors import BLOCK_ORDERS, PROJECTORS
from lowmem.optim.registry import OptimizerOptions
from lowmem.optim.residuals import FIRA_VARIANTS, RESIDUALS
from lowmem.optim.storage import STATE_DTYPES
from lowmem.optim.transforms import validate_transforms

NO_PROJECTOR = "none"  # every weight takes the dense path (AdamW-8bit, Adafactor, MicroAdam)


@dataclass
class PipelineOptions(OptimizerOptions):
    name: str = "galore"
    lr: Optional[float] = 0.01  # None only for Adafactor's relative_step (its own step size)
    eps: float = 1e-6
    # none | svd | randomized_svd | random | online_pca | dct | coordinates | blocks
    projector: str = "svd"
    # Rows of the core; None: round(density * smaller side). Ignored by the blocks projector.
    rank: Optional[int] = None
    # Fraction of the smaller side (when rank is None), or of the projected weights for blocks. The
    # default, a quarter, is the papers' rank at 60M/350M/1B/7B (128/256/512/1024) and saves memory on
    # every shape; a rank equal to the smaller side would hold more state than AdamW.
    density: Optional[float] = 0.25
    update_gap: int = 200  # optimizer updates between projector refreshes
    stagger: bool = False  # offset each weight's refresh so no single update pays every SVD
    scale: float = 0.25  # multiplies the back-projected update (GaLore alpha)
    moments_on_refresh: str = "keep"  # keep | reset | rotate
    # galore: eps not bias-scaled, decay after the step; torch: AdamW's (also where every core decays)
    adam_convention: str = "galore"
    residual: str = "drop"  # drop | fira | sign_sgd | sgd
    fira_gamma: float = 1.01  # Fira's norm-growth limit per update
    # paper | code (Fira's released code, how its published tables were produced); see residuals.FiraResidual
    fira_variant: str = "paper"
    inactive_lr_scale: float = 1.0  # FRUGAL: lr multiplier of the state-free residual step
    block_order: str = "random"  # blocks projector: random | ascending | descending | mirror
    core: str = "adam"  # adam | adafactor | microadam
    # auto (the parameters' dtype) | fp32 | bf16 | int8 | int4: how the core's moments are stored
    state_dtype: str = "auto"
    int4_rank1: bool = False  # int4 second moment normalized by min(row max, column max) instead of blocks
    # Adafactor core (lowmem.optim.adafactor); its first moment is betas[0] (0: none)
    adafactor_eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    relative_step: bool = False
    scale_parameter: bool = False
    warmup_init: bool = False
    lr_in_first_moment: bool = False  # fold the lr into U before the first moment (transformers, GaLoreAdafactor)
    # MicroAdam core (lowmem.optim.microadam)
    window: int = 10  # gradients kept
    k_init: float = 0.01  # fraction of each block kept per update
    topk_block: int = 16384  # elements per top-k block (int16 indices: at most 32768)
    ef_block: int = 64  # elements per min/max bucket of the 4-bit error feedback
    ef_alpha: float = 0.0  # MicroAdam's alpha: fraction of the error feedback added to each update (pretraining)
    # Gradient transforms (lowmem.optim.transforms): spam_clip | adaclip | adagn | moment_reset |
    # grad_norm_stabilizer, or the combinations spam | stable_spam
    transforms: list[str] = field(default_factory=list)
    gamma1: float = 0.7  # AdaGN's norm EMA (Stable-SPAM 4-bit: 0.7; GradientStabilizer 0.6)
    gamma2: float = 0.9  # AdaGN's squared-norm EMA
    gamma3: float = 0.999  # AdaClip's max EMA
    spam_theta: float = 5000.0  # SPAM: entries with g^2 > theta * V are clipped
    spam_clip_delay: int = 20  # SPAM: no clipping in the first updates of each reset window
    reset_interval: int = 500  # moment_reset: updates between resets (Delta T)
    reset_warmup: int = 0  # SPAM's cosine lr warm-up after a reset (its preset: 150)
    reset_bias_correction: bool = True  # restart Adam's bias correction at a reset (SPAM's code: false)
    reset_with_old_moments: bool = False  # Stable-SPAM's code quirk (lowmem.optim.transforms)
    transform_steps_follow_reset: bool = False  # Stable-SPAM's code quirk (lowmem.optim.transforms)
    anneal_steps: Optional[int] = None  # Stable-SPAM's total_T: cosine annealing of beta1 and gamma1
    anneal_min: float = 0.5  # the annealing factor's end value (Stable-SPAM's eta_min)
    seed: int = 0  # seeds random projectors and block choices
    # auto (Triton kernels on CUDA, the pure-torch reference elsewhere) | triton | torch (lowmem.kernels.dispatch)
    kernels: str = "auto"

    @property
    def projects(self) -> bool:
        return self.projector != NO_PROJECTOR

    @property
    def group_lr(self) -> float:
        """The lr the parameter groups start at (Adafactor's relative step: 1, times the schedule)."""
        return 1.0 if self.lr is None else self.lr

    def validate(self) -> None:
        if self.lr is None and not self.relative_step:
            raise ConfigError("optimizer.lr: required (only Adafactor's relative_step sets its own step size)")
        if self.lr is not None and self.relative_step:
            raise ConfigError("optimizer.lr: Adafactor's relative_step computes the step size itself "
                              "(min(1e-2, 1/sqrt(t)), times the weight's RMS with scale_parameter); set "
                              "optimizer.lr=null, or optimizer.relative_step=false to use an external lr")
        super().validate()
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
        ):
            if value not in choices:
                raise ConfigError(f"optimizer.{key}: unknown value '{value}'{closest(str(value), choices)}; "
                                  f"choose from {sorted(choices)}")
        if self.kernels == "triton":  # before any data is read: no CUDA device at all (the interpreter aside)
            try:
                resolve_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
            except RuntimeError as error:
                raise ConfigError(str(error)) from None
        self._validate_projection()
        self._validate_cores()
        validate_transforms(self)

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
        if self.int4_rank1 and self.state_dtype != "int4":
            raise ConfigError(f"optimizer.int4_rank1: rank-1 normalization applies to state_dtype int4, "
                              f"got state_dtype '{self.state_dtype}'")
        if self.core == "microadam" and self.state_dtype in ("int8", "int4"):
            raise ConfigError(f"optimizer.state_dtype: '{self.state_dtype}' cannot apply to the microadam core, "
                              f"whose window holds bf16 values and whose error feedback is already 4-bit; use "
                              f"auto (bf16 window) or fp32")
        if self.warmup_init and not self.relative_step:
            raise ConfigError("optimizer.warmup_init: applies to Adafactor's relative step; set "
                              "optimizer.relative_step=true (and optimizer.lr=null) or warmup_init=false")
        if self.lr_in_first_moment and self.core != "adafactor":
            raise ConfigError(f"optimizer.lr_in_first_moment: applies to the adafactor core, got core "
                              f"'{self.core}'")
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
        if self.ef_alpha and self.core != "microadam":
            raise ConfigError(f"optimizer.ef_alpha: applies to the microadam core, got core '{self.core}'")
        if self.ef_block < 1:
            raise ConfigError(f"optimizer.ef_block: must be at least 1, got {self.ef_block}")

    def validate_for_model(self, projected_shapes: dict[str, tuple[int, ...]]) -> None:
        if self.rank is None or self.projector in ("blocks", NO_PROJECTOR):
            return
        for name, shape in projected_shapes.items():
            if self.rank > min(shape):
                raise ConfigError(f"optimizer.rank: {self.rank} exceeds the smaller side of {name} "
                                  f"(shape {'x'.join(map(str, shape))}); use at most {min(shape)}")

    def rank_for(self, shape: tuple[int, ...]) -> int:
        """Core rows for a weight of this shape: `rank`, or round(density * smaller side), at least 1."""
        if self.rank is not None:
            return self.rank
        return max(1, round(self.density * min(shape)))
