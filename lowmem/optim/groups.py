"""Split a model's parameters into optimizer groups by module-name patterns."""
from __future__ import annotations

from torch import nn

from lowmem.errors import ConfigError
from lowmem.model.targets import DEFAULT_TARGETS, linear_module_names
from lowmem.optim.options import OptimizerOptions


def target_patterns(model: nn.Module, options: OptimizerOptions) -> list[str]:
    """options.target_modules, or the model family's attention and MLP projections; for another Hugging Face
    family every 2-D weight but the input embedding and the output head; for a plain module, LLaMA's names."""
    if options.target_modules is not None:
        return list(options.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return DEFAULT_TARGETS["llama"]
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            excluded.add(id(module))
    return [name for name, m in model.named_modules() if id(m) not in excluded and name
            and getattr(m, "weight", None) is not None and m.weight.ndim == 2 and not isinstance(m, nn.Embedding)]


def is_projectable(name: str, param, patterns: list[str]) -> bool:
    """A 2-D weight of a module whose name contains one of `patterns`."""
    module_name = name.rsplit(".", 1)[0]
    return param.ndim == 2 and any(pattern in module_name for pattern in patterns)


def param_groups(model: nn.Module, options: OptimizerOptions) -> list[dict]:
    """Up to three groups: projected weights, other decayed weights, and no-decay parameters.

    Group keys: params, names, weight_decay, projected (and lr, for the targeted weights, when
    options.target_lr_scale is not 1). Frozen parameters are left out. Extra keys are ignored by torch
    optimizers and read by lowmem's projection optimizers.
    """
    projected, decay, no_decay = ([], []), ([], []), ([], [])
    patterns = target_patterns(model, options)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_projectable(name, param, patterns):
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


def check_options_against_model(model: nn.Module, options: OptimizerOptions) -> None:
    """Raise ConfigError if an option is impossible for this model's weights (e.g. rank > a matrix side), or
    if a projecting optimizer's target_modules match no weight (it would silently hold AdamW's state).
    Works on a meta-device model, so it runs before any weight is allocated."""
    shapes = projected_shapes(param_groups(model, options))
    if getattr(options, "projects", False) and not shapes:
        shown = ", ".join(linear_module_names(model))
        raise ConfigError(f"optimizer.target_modules: {target_patterns(model, options)} match no weight matrix of the "
                          f"model, so '{options.name}' would project nothing and hold AdamW's state; its linear "
                          f"modules are: {shown}")
    options.validate_for_model(shapes)
