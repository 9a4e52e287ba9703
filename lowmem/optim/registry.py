"""Optimizers registered by name and chosen in YAML with `optimizer: {name: ..., ...}`.

Each entry pairs an options dataclass (the keys its YAML section may hold, with defaults) with a builder
that turns parameter groups into a `torch.optim.Optimizer`. No if/elif chain: a new optimizer registers
itself in its own module, and that module joins `BUILT_IN`, the one list of what `load_built_in` imports.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

from lowmem.config import from_dict
from lowmem.errors import ConfigError, closest
from lowmem.optim.options import OptimizerOptions

# The modules that register the built-in parts (cores beyond Adam) and optimizers: the one list of them,
# imported by load_built_in (which importing lowmem.optim, or any module under it, runs first).
BUILT_IN = ("lowmem.optim.parts.adafactor", "lowmem.optim.parts.microadam", "lowmem.optim.adamw",
            "lowmem.optim.presets")


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


def load_built_in() -> None:
    """Register the built-in parts and optimizers (once; importing a module twice does nothing)."""
    for module in BUILT_IN:
        importlib.import_module(module)


def parse_optimizer_options(tree: dict) -> OptimizerOptions:
    """Validate the YAML `optimizer:` mapping into the chosen optimizer's options dataclass."""
    load_built_in()
    if not isinstance(tree, dict):
        raise ConfigError(f"optimizer: expected a mapping with a 'name', got {tree!r}")
    if "lora" in tree:  # LoRA prepares the model; any optimizer then trains its adapters
        raise ConfigError("optimizer.lora: LoRA is a model preparation now; move the mapping to model.lora "
                          "(same keys: r, alpha, dropout, target_modules)")
    name = tree.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}'{closest(str(name), OPTIMIZERS)}; "
                          f"choose from {sorted(OPTIMIZERS)}")
    _check_keys(name, tree)
    options = from_dict(OPTIMIZERS[name].options, dict(tree, name=name), "optimizer")
    options.validate()
    options.validate_given([key for key in tree if key != "name"])  # what a preset sets is never refused
    return options


def _check_keys(name: str, tree: dict) -> None:
    """A key the named optimizer does not take: the optimizers that read it, or the closest key of any optimizer
    (a base config's adamw has no `rank`, so `optimizer.rnak` must not suggest its 'name')."""
    own = {f.name for f in fields(OPTIMIZERS[name].options)}
    every = sorted({f.name for entry in OPTIMIZERS.values() for f in fields(entry.options)})
    for key in tree:
        if key in own:
            continue
        readers = sorted(n for n, entry in OPTIMIZERS.items() if entry.options().reads(key))
        if readers:
            raise ConfigError(f"optimizer.{key}: not an option of '{name}'; {', '.join(readers[:6])}"
                              f"{' and others' if len(readers) > 6 else ''} read it (set optimizer.name)")
        raise ConfigError(f"unknown key 'optimizer.{key}'{closest(str(key), every)}")


def build_optimizer(model: nn.Module, options: OptimizerOptions) -> torch.optim.Optimizer:
    """Group the model's trainable parameters and build the optimizer `options.name` names."""
    from lowmem.optim.groups import check_options_against_model, param_groups

    check_options_against_model(model, options)
    return OPTIMIZERS[options.name].build(param_groups(model, options), options)


def create_optimizer(model: nn.Module, name: str = "adamw", **options) -> torch.optim.Optimizer:
    """The public way to a lowmem optimizer in your own loop: `create_optimizer(model, "galore", rank=128,
    state_dtype="int8")` checks the options exactly as the YAML's `optimizer:` section is checked (a misspelled or
    unread key is a ConfigError naming it) and groups the model's parameters as training does (projected
    attention and MLP weights, no decay on norms and biases)."""
    return build_optimizer(model, parse_optimizer_options({"name": name, **options}))


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
