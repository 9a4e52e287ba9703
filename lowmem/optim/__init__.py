"""Optimizers: the registry (built-in optimizers loaded from its one list), the pipeline optimizer and its parts.
See README.md here."""
from lowmem.optim.options import OptimizerOptions
from lowmem.optim.registry import (OPTIMIZERS, build_optimizer, create_optimizer, load_built_in,
                                   optimizer_state_bytes, register_optimizer)

load_built_in()

__all__ = ["OPTIMIZERS", "OptimizerOptions", "build_optimizer", "create_optimizer", "optimizer_state_bytes",
           "register_optimizer"]
