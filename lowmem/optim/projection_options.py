"""Options shared by every projection optimizer: which parts make up the pipeline, and their settings.

The defaults are GaLore's; each preset (`lowmem.optim.presets`) subclasses this with its paper's defaults,
and YAML may override any part: `optimizer: {name: galore, projector: random, residual: fira}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lowmem.config import ConfigError, closest
from lowmem.optim.adam_core import ADAM_CONVENTIONS, MOMENT_POLICIES, STATE_DTYPES
from lowmem.optim.projectors import PROJECTORS
from lowmem.optim.registry import OptimizerOptions
from lowmem.optim.residuals import FIRA_VARIANTS, RESIDUALS


@dataclass
class ProjectionOptions(OptimizerOptions):
    name: str = "galore"
    lr: float = 0.01
    eps: float = 1e-6
    # svd | randomized_svd | random | online_pca | dct | coordinates | blocks
    projector: str = "svd"
    # Rows of the core; None: round(density * smaller side). Ignored by the blocks projector.
    rank: Optional[int] = 128
    # Fraction of the smaller side (when rank is None), or of the projected weights for blocks.
    density: Optional[float] = None
    update_gap: int = 200  # optimizer updates between projector refreshes
    stagger: bool = False  # offset each weight's refresh so no single update pays every SVD
    scale: float = 0.25  # multiplies the back-projected update (GaLore alpha)
    moments_on_refresh: str = "keep"  # keep | reset | rotate
    adam_convention: str = "galore"  # galore: eps not bias-scaled, decay after; torch: AdamW's
    residual: str = "drop"  # drop | fira | sign_sgd | sgd
    fira_gamma: float = 1.01  # Fira's norm-growth limit per update
    # paper (default: where Fira's paper and code differ we follow the paper) | code (Fira's released code,
    # how its published tables were produced); see lowmem.optim.residuals.FiraResidual
    fira_variant: str = "paper"
    inactive_lr_scale: float = 1.0  # FRUGAL: lr multiplier of the state-free residual step
    state_dtype: str = "fp32"  # fp32 | bf16
    seed: int = 0  # seeds random projectors and block choices

    def validate(self) -> None:
        super().validate()
        for key, value, choices in (
            ("projector", self.projector, PROJECTORS),
            ("residual", self.residual, RESIDUALS),
            ("moments_on_refresh", self.moments_on_refresh, MOMENT_POLICIES),
            ("adam_convention", self.adam_convention, ADAM_CONVENTIONS),
            ("fira_variant", self.fira_variant, FIRA_VARIANTS),
            ("state_dtype", self.state_dtype, STATE_DTYPES),
        ):
            if value not in choices:
                raise ConfigError(f"optimizer.{key}: unknown value '{value}'{closest(str(value), choices)}; "
                                  f"choose from {sorted(choices)}")
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

    def validate_for_model(self, projected_shapes: dict[str, tuple[int, ...]]) -> None:
        if self.rank is None or self.projector == "blocks":
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
