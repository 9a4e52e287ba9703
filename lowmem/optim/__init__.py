"""Optimizer registry and the optimizers it holds. Importing this package registers every optimizer."""
from lowmem.optim import adamw  # noqa: F401  (registers "adamw", "bnb_adamw8bit")
from lowmem.optim import presets  # noqa: F401  (registers the pipeline presets)
from lowmem.optim.registry import (OPTIMIZERS, OptimizerOptions, build_optimizer, optimizer_state_bytes,
                                   register_optimizer)

__all__ = ["OPTIMIZERS", "OptimizerOptions", "build_optimizer", "optimizer_state_bytes", "register_optimizer"]
