"""Split a model's parameters into optimizer groups by module-name patterns."""
from __future__ import annotations

import re

from torch import nn

from lowmem.config import ConfigError
from lowmem.optim.registry import OptimizerOptions


def is_projectable(name: str, param, options: OptimizerOptions) -> bool:
    """A 2-D weight of a module whose name contains one of `options.target_modules`."""
    module_name = name.rsplit(".", 1)[0]
    return param.ndim == 2 and any(pattern in module_name for pattern in options.target_modules)


def param_groups(model: nn.Module, options: OptimizerOptions) -> list[dict]:
    """Up to three groups: projected weights, other decayed weights, and no-decay parameters.

    Group keys: params, names, weight_decay, projected (and lr, for the targeted weights, when
    options.target_lr_scale is not 1). Frozen parameters are left out. Extra keys are ignored by torch
    optimizers and read by lowmem's projection optimizers.
    """
    projected, decay, no_decay = ([], []), ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_projectable(name, param, options):
            bucket = projected
        elif param.ndim < 2 or any(pattern in name for pattern in options.no_decay):
            bucket = no_decay
        else:
            bucket = decay
        bucket[0].append(name)
        bucket[1].append(param)
    groups = [
        {"names": names, "params": params, "weight_decay": wd, "projected": is_proj}
        for (names, params), wd, is_proj in (
            (projected, options.weight_decay, True),
            (decay, options.weight_decay, False),
            (no_decay, 0.0, False),
        )
        if params
    ]
    if options.target_lr_scale != 1.0 and groups[0]["projected"]:
        base = options.group_lr if hasattr(options, "group_lr") else options.lr
        groups[0]["lr"] = base * options.target_lr_scale
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def projected_shapes(groups: list[dict]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight in a projected group (what `validate_for_model` checks)."""
    return {name: tuple(p.shape) for g in groups if g["projected"] for name, p in zip(g["names"], g["params"])}


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the modules holding a 2-D weight matrix (linears; embeddings excluded), with layer numbers
    folded into N so that each kind of module is listed once."""
    names = [re.sub(r"\.\d+\.", ".N.", name) for name, module in model.named_modules()
             if not isinstance(module, nn.Embedding) and getattr(module, "weight", None) is not None
             and module.weight.ndim == 2]
    return list(dict.fromkeys(names))


def check_options_against_model(model: nn.Module, options: OptimizerOptions) -> None:
    """Raise ConfigError if an option is impossible for this model's weights (e.g. rank > a matrix side), or
    if a projecting optimizer's target_modules match no weight (it would silently hold AdamW's state).
    Works on a meta-device model, so it runs before any weight is allocated."""
    shapes = projected_shapes(param_groups(model, options))
    if getattr(options, "projects", False) and not shapes:
        shown = ", ".join(linear_module_names(model))
        raise ConfigError(f"optimizer.target_modules: {options.target_modules} match no weight matrix of the "
                          f"model, so '{options.name}' would project nothing and hold AdamW's state; its linear "
                          f"modules are: {shown}")
    options.validate_for_model(shapes)
