"""`model.freeze`: parameters that do not train.

Patterns are shell-style (fnmatch, `*` crosses dots) and are matched against the full parameter names and
module names of the model (`model.embed_tokens.weight`, `model.layers.0`): a parameter is frozen when its name
or the name of a module holding it matches. Shell patterns rather than regular expressions because the
names are full of dots, which a regular expression would read as "any character". A frozen parameter gets
requires_grad False: no gradient, and no optimizer state (the optimizer groups leave it out).
"""
from __future__ import annotations

import fnmatch
import re

from torch import nn

from lowmem.errors import ConfigError


def _enclosing(name: str) -> list[str]:
    """The parameter name and the names of the modules holding it, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def frozen_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """The parameter names the patterns freeze; ConfigError naming a pattern that matches nothing, with the
    model's parameter names (layer numbers folded into N)."""
    names = [name for name, _ in model.named_parameters()]
    frozen: set[str] = set()
    for pattern in patterns:
        hit = {name for name in names if any(fnmatch.fnmatchcase(n, pattern) for n in _enclosing(name))}
        if not hit:
            shown = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", name) for name in names))
            raise ConfigError(f"model.freeze: '{pattern}' matches no parameter or module name; the model's "
                              f"parameters are: {', '.join(shown)}")
        frozen |= hit
    return [name for name in names if name in frozen]


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad False on the parameters `patterns` match; their names."""
    names = frozen_names(model, patterns)
    parameters = dict(model.named_parameters())
    for name in names:
        parameters[name].requires_grad_(False)
    if patterns and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze: {patterns} freeze every parameter; nothing would train")
    return names
