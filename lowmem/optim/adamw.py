"""torch's AdamW, the dense baseline every low-memory method is measured against."""
from __future__ import annotations

import torch

from lowmem.optim.registry import OptimizerOptions, register_optimizer


@register_optimizer("adamw", OptimizerOptions)
def build_adamw(groups: list[dict], options: OptimizerOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                             weight_decay=options.weight_decay)
