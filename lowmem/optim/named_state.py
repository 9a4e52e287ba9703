"""Optimizer state keyed by parameter name: the checkpoint format every backend shares.

torch keys an optimizer's saved state by the position of each parameter in its groups, which a different
grouping or sharding would change. By name, a state saved on one process loads on N ranks under ZeRO and
back (lowmem.distributed.zero re-shards it by its own plan).

    {"by_name": {param name: that parameter's state dict}, "groups": [each group's hyper-parameters]}
"""
from __future__ import annotations

import torch
from torch import nn


def named_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """`optimizer.state_dict()` re-keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer.state_dict()
    position = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {position[index]: state for index, state in saved["state"].items()}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]]
    return {"by_name": by_name, "groups": groups}


def load_named_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """Load a by-name state into `optimizer` (through its own load_state_dict, so dtype rules apply)."""
    names = {id(p): n for n, p in model.named_parameters()}
    if len(saved["groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state: saved with {len(saved['groups'])} parameter groups, the optimizer has "
                         f"{len(optimizer.param_groups)}; the optimizer or its target_modules changed")
    state, groups, index = {}, [], 0
    for group, hyper in zip(optimizer.param_groups, saved["groups"]):
        ids = []
        for p in group["params"]:
            if names[id(p)] in saved["by_name"]:
                state[index] = saved["by_name"][names[id(p)]]
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in hyper.items() if k not in ("lowmem_group",)}, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
