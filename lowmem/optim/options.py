"""The keys every optimizer accepts (the `optimizer:` section's base); each optimizer's options subclass adds its
own. A leaf: it imports nothing of lowmem's but the errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Optional

from lowmem.errors import ConfigError


@dataclass
class OptimizerOptions:
    """Keys every optimizer accepts. Subclasses add their own."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Module-name substrings of the 2-D weights a low-rank method projects; null: the attention and MLP
    # projections of the model's architecture (lowmem.model.targets.DEFAULT_TARGETS). Everything else
    # (embeddings, head, norms) is updated by the optimizer's dense path.
    target_modules: Optional[list[str]] = None
    # Parameter-name substrings that never get weight decay (1-D parameters never do).
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias"])
    # Step each weight in its post-accumulate-grad hook and free its gradient at once.
    update_in_backward: bool = False
    # lr multiplier of the weights target_modules match. The projection presets move those weights at an
    # effective lr x scale while embeddings and head move at lr; setting this on AdamW gives it the same split
    # (a fair baseline at small budgets, where that split alone can decide a ranking).
    target_lr_scale: float = 1.0

    def validate(self) -> None:
        """Check values that do not depend on the model. Raise ConfigError naming the key."""
        if self.lr is not None and self.lr <= 0:  # None: the optimizer sets its own step size
            raise ConfigError(f"optimizer.lr: must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optimizer.betas[{i}]: must be in [0, 1), got {beta}")
        if self.eps <= 0:
            raise ConfigError(f"optimizer.eps: must be positive, got {self.eps}")
        if self.target_lr_scale <= 0:
            raise ConfigError(f"optimizer.target_lr_scale: must be positive, got {self.target_lr_scale}")

    def reads(self, key: str) -> bool:
        """Whether this optimizer, as configured, reads option `key` (one of its fields; the pipeline: read by a
        part it chose). Setting a key it does not read is refused (validate_given)."""
        return key in self.__dataclass_fields__

    def validate_given(self, given: Collection[str]) -> None:
        """Refuse keys the YAML set (`given`) that the chosen configuration does not read (its parts decide)."""

    def validate_for_model(self, projected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check values against the shapes of the weights this optimizer will project (name -> shape)."""
