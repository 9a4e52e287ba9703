"""Direction transforms: parts that act on the core's direction D, after the core and before back-projection and
the residual (D is r x a under a projector, the weight's shape on the dense path). `optimizer.directions: [...]`
lists them, applied in order. Each sees D and the core gradient R the core stepped on (after the gradient
transforms), and returns a new D (never changing the one it was given, which may be the core's own buffer).

    cautious   Cautious optimizers (Liang et al. 2024, "Cautious Optimizers: Improving Training with One Line of
               Code"): only the entries whose direction agrees in sign with the current gradient move,
               D <- D * m / max(mean(m), 1e-3) with m = [D * R > 0]; the division keeps the update's size. For
               Adam D and the first moment share their signs, so this is the released C-AdamW rule on any core.
               No state. Not element-wise (the mean spans the tensor).

A new kind of direction stage (channel-wise scaling, orthogonalisation) is one class here with its `name`,
registered in DIRECTIONS, declaring what the pipeline derives from: `elementwise`, `sync_refusal`, `cost`.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch

from lowmem.config.schema import Registry

CAUTIOUS_MEAN_FLOOR = 1e-3  # the released code's floor on the kept fraction (a nearly empty mask moves little)

DIRECTIONS = Registry("optimizer.directions")


class DirectionTransform:
    name: ClassVar[str]
    elementwise: ClassVar[bool] = False  # each element's result depends on that element alone
    sync_refusal: ClassVar[Optional[str]] = None  # why R = P^T G summed over ranks would not serve (None: it does)

    def __init__(self, options):
        self.options = options

    def apply(self, direction: torch.Tensor, core_grad: torch.Tensor, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def cost(self, core_shape: tuple[int, ...]) -> float:
        return 3.0 * math.prod(core_shape)


@DIRECTIONS.register
class Cautious(DirectionTransform):
    name = "cautious"

    def apply(self, direction: torch.Tensor, core_grad: torch.Tensor, state: dict) -> torch.Tensor:
        mask = (direction * core_grad > 0).to(direction.dtype)
        return direction * mask.div_(mask.mean().clamp_(min=CAUTIOUS_MEAN_FLOOR))


class DirectionChain:
    """The direction transforms of one optimizer, one stage of its rule."""

    def __init__(self, options):
        self.parts = [DIRECTIONS.lookup(name)(options) for name in options.directions]

    def __bool__(self) -> bool:
        return bool(self.parts)

    def apply(self, direction: torch.Tensor, core_grad: torch.Tensor, state: dict) -> torch.Tensor:
        for part in self.parts:
            direction = part.apply(direction, core_grad, state)
        return direction

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        return all(part.elementwise for part in self.parts)

    @property
    def sync_refusal(self) -> Optional[str]:
        return next((part.sync_refusal for part in self.parts if part.sync_refusal), None)

    def cost(self, shape: tuple[int, ...], core_shape: tuple[int, ...]) -> float:
        return sum(part.cost(core_shape) for part in self.parts)
