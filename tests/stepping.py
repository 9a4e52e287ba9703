"""The one way tests step an optimizer on given gradients (imported as `from stepping import ...`)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def step_on(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[Sequence[torch.Tensor]],
            lrs: Optional[Sequence[float]] = None, each: Optional[Callable[[int], None]] = None) -> None:
    """One update of `opt` per entry of `grads` (one gradient per param, copied in); with `lrs`, every group's
    lr is set to lrs[t] before update t (an lr schedule); `each(t)` runs after update t (a check per step)."""
    for t, step_grads in enumerate(grads):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        if each is not None:
            each(t)


def stepped(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], weights: Sequence[torch.Tensor],
            grads: Sequence[Sequence[torch.Tensor]], lrs: Optional[Sequence[float]] = None,
            ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """Fresh parameters holding copies of `weights`, the optimizer `make(params)` builds, stepped on `grads`:
    the weights after the last update, and the optimizer."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = make(params)
    step_on(opt, params, grads, lrs)
    return [p.detach() for p in params], opt


def random_gradients(shapes: Sequence[tuple[int, ...]], steps: int, seed: int = 0,
                     scale: Callable[[int], float] = lambda t: 1.0) -> list[list[torch.Tensor]]:
    """`steps` lists of seeded normal gradients of `shapes`, the ones of update t times scale(t)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * scale(t) for s in shapes] for t in range(steps)]


def update(opt, params, per_weight: bool) -> None:
    """One update: weight by weight (begin_update, step_param: the per-weight rule), or by step()."""
    if per_weight:
        opt.begin_update()
        for p in params:
            opt.step_param(p)
    else:
        opt.step()
