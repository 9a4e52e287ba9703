"""Update-in-backward (GaLore's per-layer mode): step each parameter as soon as its gradient is complete
and free that gradient, so the whole model's gradients never exist at once.

Stays correct with gradient accumulation: the trainer calls `arm(False)` before the backward of every
micro-batch but the last of an accumulation window (gradients accumulate as usual) and `arm(True)` before
the last one, so each parameter takes exactly one optimizer update per window. Optimizer counters (refresh,
bias correction) therefore count updates, not micro-batches. Global gradient clipping cannot work this
way (the config refuses it).
"""
from __future__ import annotations

import torch


class UpdateInBackward:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.armed = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                         for group in optimizer.param_groups for p in group["params"] if p.requires_grad]

    def arm(self, enabled: bool) -> None:
        """True before the backward of the last micro-batch of a window, False before the others.
        Arming starts an optimizer update (ProjectedAdam.begin_update: the shared update index)."""
        self.armed = enabled
        begin_update = getattr(self.optimizer, "begin_update", None)
        if enabled and begin_update is not None:
            begin_update()

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        step_param = getattr(self.optimizer, "step_param", None)
        if step_param is not None:
            step_param(param)
        else:
            self._step_only(param)
        param.grad = None

    def _step_only(self, param: torch.Tensor) -> None:
        """Any torch optimizer: step with every group's params list narrowed to this one parameter."""
        saved = [group["params"] for group in self.optimizer.param_groups]
        try:
            for group in self.optimizer.param_groups:
                group["params"] = [param] if any(p is param for p in group["params"]) else []
            self.optimizer.step()
        finally:
            for group, params in zip(self.optimizer.param_groups, saved):
                group["params"] = params

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
