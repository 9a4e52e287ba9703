"""Update-in-backward (GaLore's per-layer mode): step each parameter as soon as its gradient is complete
and free that gradient, so the whole model's gradients never exist at once.

Stays correct with gradient accumulation: the trainer calls `arm(False)` before the backward of every
micro-batch but the last of an accumulation window (gradients accumulate as usual), `arm(True)` before
the last one, and `finish()` after it, so each parameter takes exactly one optimizer update per window
(`finish` applies the gradients of weights the last micro-batch did not reach). Optimizer counters
(refresh, bias correction) therefore count updates, not micro-batches. Global gradient clipping cannot
work this way (the config refuses it). A gradient that is not finite is never applied: it is recorded in
`non_finite`, nothing more is stepped in that window, and the caller stops.
"""
from __future__ import annotations

import torch


class UpdateInBackward:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.armed = False
        self.non_finite: str | None = None  # the first weight of this window whose gradient was not finite
        self._names = {p: name for group in optimizer.param_groups
                       for p, name in zip(group["params"], group.get("names") or [])}
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._params]

    def arm(self, enabled: bool) -> None:
        """True before the backward of the last micro-batch of a window, False before the others.
        Arming starts an optimizer update (PipelineOptimizer.begin_update: the shared update index)."""
        self.armed = enabled
        if enabled:
            self.non_finite = None
            begin_update = getattr(self.optimizer, "begin_update", None)
            if begin_update is not None:
                begin_update()

    def finish(self) -> None:
        """End the update after the last backward of a window: step every weight still holding a gradient
        (one that only earlier micro-batches reached, whose hook did not fire in the armed backward)."""
        for param in self._params:
            if param.grad is not None:
                self._apply(param)
        self.armed = False
        # torch's LRScheduler warns on its first step unless optimizer.step() ran before it, which it learns
        # from this flag (set by its wrapper around step). step_param bypasses step(): an update did happen.
        self.optimizer._opt_called = True

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if self.armed:
            self._apply(param)

    def _apply(self, param: torch.Tensor) -> None:
        # A sum is non-finite when any entry is, and needs no temporary the size of the gradient.
        if self.non_finite is None and not torch.isfinite(param.grad.sum(dtype=torch.float32)):
            self.non_finite = self._names.get(param, f"a weight of shape {tuple(param.shape)}")
        if self.non_finite is None:
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
