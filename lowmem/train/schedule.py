"""Learning-rate schedules: linear warmup, then decay to `min_lr_ratio` of the peak (as the papers do).

Warmup gives update t (0-based) the factor (t+1)/warmup, so the first update already moves the weights; the
papers' scripts use t/warmup, whose first update has lr 0.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

# factor(step, warmup, total, min_ratio) -> multiplier of the peak lr at update `step` (0-based).
SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {}


def schedule(name: str):
    def decorate(fn):
        SCHEDULES[name] = fn
        return fn

    return decorate


def _progress(step: int, warmup: int, total: int) -> float:
    return min(1.0, (step - warmup) / max(1, total - warmup))


@schedule("cosine")
def cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * _progress(step, warmup, total)))


@schedule("linear")
def linear(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - (1 - min_ratio) * _progress(step, warmup, total)


@schedule("constant")
def constant(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer update; its state_dict holds only numbers."""
    factor = SCHEDULES[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step, warmup, total, min_lr_ratio))
