"""The Adam core of the projected optimizers: moment update, weight-decay conventions, moments at a refresh.

`adam_direction` holds all of the element-wise Adam math in one function so that a fused kernel can
replace it later. Moments may be stored in fp32 or bf16; the math is always fp32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

STATE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fresh_copy(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A copy with its own, exactly-sized storage (a slice of a larger SVD output must not pin it)."""
    out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device)
    return out.copy_(tensor)


def bias_correction(step: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): the factor between GaLore's bias-corrected and uncorrected directions."""
    return math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   beta1: float, beta2: float, eps: float, eps_scaled: bool) -> torch.Tensor:
    """Update the moments in place with `grad` and return the bias-corrected Adam direction (fp32), a fresh
    tensor the caller may modify in place. All of the element-wise Adam math lives here.

    eps_scaled=False is GaLore's convention, sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps);
    eps_scaled=True is torch's, (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps).
    """
    m = exp_avg.float()
    v = exp_avg_sq.float()
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    # one temporary: the denominator, overwritten by the direction (same values as m / denom)
    if eps_scaled:
        denom = v.sqrt().div_(bias2_sqrt).add_(eps)
        direction = torch.div(m, denom, out=denom).div_(bias1)
    else:
        denom = v.sqrt().add_(eps)
        direction = torch.div(m, denom, out=denom).mul_(bias2_sqrt / bias1)
    if m is not exp_avg:  # bf16 states: write the fp32 result back
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    return direction


# ---------------------------------------------------------------------------------------------------------
# Weight-decay conventions: where the decay goes relative to the update.


def _decay_after(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """GaLore / HF AdamW: step first, then decay the already-updated weight."""
    param.add_(update, alpha=-lr)
    if weight_decay > 0:
        param.mul_(1.0 - lr * weight_decay)


def _decay_before(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """torch AdamW / FRUGAL: decay the weight, then step."""
    if weight_decay > 0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update, alpha=-lr)


class AdamConvention:
    """Where eps sits (bias-scaled or not) and where weight decay is applied."""

    def __init__(self, eps_scaled: bool, apply_update: Callable[[torch.Tensor, torch.Tensor, float, float], None]):
        self.eps_scaled = eps_scaled
        self.apply_update = apply_update


ADAM_CONVENTIONS: dict[str, AdamConvention] = {
    "galore": AdamConvention(eps_scaled=False, apply_update=_decay_after),
    "torch": AdamConvention(eps_scaled=True, apply_update=_decay_before),
}


# ---------------------------------------------------------------------------------------------------------
# What happens to the moments when the projector's basis changes.


class KeepMoments:
    """GaLore: keep M and V as they are, though they are expressed in the old basis."""

    needs_bases = False

    def __call__(self, state: dict, old_basis: Optional[torch.Tensor], new_basis: torch.Tensor) -> None:
        pass


class ResetMoments:
    """FRUGAL: zero M and V and restart the bias correction."""

    needs_bases = False

    def __call__(self, state: dict, old_basis: Optional[torch.Tensor], new_basis: torch.Tensor) -> None:
        state.pop("exp_avg", None)
        state.pop("exp_avg_sq", None)


class RotateMoments:
    """Express the moments in the new basis with C = P_new^T P_old.

    M is rotated exactly: M <- C M, so P_new M equals the part of P_old M inside the new subspace.
    V cannot be rotated exactly without the cross second moments it does not keep; we use (C*C) V
    (C squared element-wise), which is exact when the old coordinates are uncorrelated, stays
    non-negative, and keeps V when the basis does not change.
    """

    needs_bases = True

    def __call__(self, state: dict, old_basis: Optional[torch.Tensor], new_basis: torch.Tensor) -> None:
        if old_basis is None or "exp_avg" not in state:
            return
        rotation = new_basis.T @ old_basis
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["exp_avg"] = (rotation @ m.float()).to(m.dtype)
        state["exp_avg_sq"] = ((rotation * rotation) @ v.float()).to(v.dtype)


MOMENT_POLICIES: dict[str, KeepMoments | ResetMoments | RotateMoments] = {
    "keep": KeepMoments(),
    "reset": ResetMoments(),
    "rotate": RotateMoments(),
}


def ensure_moments(state: dict, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    """Zero moments when there are none or their shape no longer fits (then bias correction restarts)."""
    if "exp_avg" not in state or state["exp_avg"].shape != shape:
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        state["adam_step"] = 0


def moments_bytes(rows: int, cols: int, itemsize: int) -> int:
    """M and V of a rows x cols core."""
    return 2 * rows * cols * itemsize
