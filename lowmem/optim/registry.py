"""Optimizers registered by name and chosen in YAML with `optimizer: {name: ..., ...}`.

Each entry pairs an options dataclass (the keys its YAML section may hold, with defaults) with a builder
that turns parameter groups into a `torch.optim.Optimizer`. No if/elif chain: a new optimizer registers
itself in its own module, which `lowmem.optim` imports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Optional

import torch
from torch import nn

from lowmem.config import ConfigError, closest, from_dict
from lowmem.lora import LoraOptions


@dataclass
class OptimizerOptions:
    """Keys every optimizer accepts. Subclasses add their own."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Module-name substrings of the 2-D weights a low-rank method projects; null: the attention and MLP
    # projections of the model's architecture (lowmem.optim.groups.DEFAULT_TARGETS). Everything else
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
    # Train LoRA adapters (through peft) with this optimizer instead of the weights themselves (lowmem.lora).
    lora: Optional[LoraOptions] = None

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
        if self.lora is not None:
            self.lora.validate()

    def reads(self, key: str) -> bool:
        """Whether this optimizer, as configured, reads option `key` (one of its fields; the pipeline: read by a
        part it chose). Setting a key it does not read is refused (validate_given)."""
        return key in self.__dataclass_fields__

    def validate_given(self, given: Collection[str]) -> None:
        """Refuse keys the YAML set (`given`) that the chosen configuration does not read (its parts decide)."""

    def validate_for_model(self, projected_shapes: dict[str, tuple[int, ...]]) -> None:
        """Check values against the shapes of the weights this optimizer will project (name -> shape)."""


Builder = Callable[[list[dict], OptimizerOptions], torch.optim.Optimizer]


@dataclass
class RegistryEntry:
    options: type[OptimizerOptions]
    build: Builder


OPTIMIZERS: dict[str, RegistryEntry] = {}


def register_optimizer(name: str, options: type[OptimizerOptions]) -> Callable[[Builder], Builder]:
    def decorate(build: Builder) -> Builder:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer '{name}' registered twice")
        OPTIMIZERS[name] = RegistryEntry(options, build)
        return build

    return decorate


def parse_optimizer_options(tree: dict) -> OptimizerOptions:
    """Validate the YAML `optimizer:` mapping into the chosen optimizer's options dataclass."""
    import lowmem.optim  # noqa: F401  (registers every optimizer)

    if not isinstance(tree, dict):
        raise ConfigError(f"optimizer: expected a mapping with a 'name', got {tree!r}")
    name = tree.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}'{closest(str(name), OPTIMIZERS)}; "
                          f"choose from {sorted(OPTIMIZERS)}")
    options = from_dict(OPTIMIZERS[name].options, dict(tree, name=name), "optimizer")
    options.validate()
    options.validate_given([key for key in tree if key != "name"])  # what a preset sets is never refused
    return options


def build_optimizer(model: nn.Module, options: OptimizerOptions) -> torch.optim.Optimizer:
    """Group the model's trainable parameters and build the optimizer `options.name` names."""
    from lowmem.optim.groups import check_options_against_model, param_groups

    check_options_against_model(model, options)
    return OPTIMIZERS[options.name].build(param_groups(model, options), options)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer holds as state, counted exactly (not RSS)."""
    seen: set[int] = set()

    def count(value) -> int:
        if isinstance(value, torch.Tensor):
            key = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
            if key in seen and value.device.type != "meta":
                return 0
            seen.add(key)
            return value.untyped_storage().nbytes() if value.device.type != "meta" else value.nbytes
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(state) for state in optimizer.state.values())
