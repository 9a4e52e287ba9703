"""Residual policies: what to do with the part of the gradient outside the projector's subspace.

Each policy returns the extra term added to `scale * P D` (D = the core's Adam direction), already in
canonical (b, a) layout, or None to drop the residual. All work in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowmem.optim.projectors import Projector

FIRA_NORM_EPS = 1e-8  # added to ||R|| column norms and to the previous residual norm (as Fira codes it)
FIRA_NORM_BYTES = 4  # the limiter's previous norm, one fp32 scalar tensor


class ResidualPolicy:
    def __init__(self, scale: float, fira_gamma: float = 1.01, fira_variant: str = "paper",
                 inactive_lr_scale: float = 1.0):
        self.scale = scale
        self.fira_gamma = fira_gamma
        self.fira_variant = fira_variant
        self.inactive_lr_scale = inactive_lr_scale

    def __call__(self, state: dict, grad_c: torch.Tensor, core_grad: torch.Tensor, direction: torch.Tensor,
                 projector: Projector) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def state_bytes(self) -> int:
        return 0


class DropResidual(ResidualPolicy):
    """GaLore, OSD: the residual is discarded."""

    def __call__(self, state, grad_c, core_grad, direction, projector):
        return None


class FiraResidual(ResidualPolicy):
    """Fira: scale each column of the residual by phi = ||D_col|| / ||R_col|| (norms over the rank dimension,
    D bias-corrected), then limit its Frobenius-norm growth to gamma per update (first update unlimited).

    fira_variant 'paper' (default, Fira Alg. 1): S = (I - P P^T) G, update = scale * (P D + S_limited).
    fira_variant 'code' (Fira's released code): S = G - scale * P R, update = scale * P D + S_limited.
    """

    def __call__(self, state, grad_c, core_grad, direction, projector):
        rows = grad_c.shape[0]
        back = projector.project_back(state, core_grad, rows)
        residual = grad_c - (back if self.fira_variant == "paper" else self.scale * back)
        phi = direction.norm(dim=0) / (core_grad.norm(dim=0) + FIRA_NORM_EPS)
        residual = residual * phi
        norm = residual.norm()
        if "fira_norm" in state:
            limit = torch.clamp(norm / (state["fira_norm"] + FIRA_NORM_EPS), min=self.fira_gamma) / self.fira_gamma
            residual = residual / limit
            norm = norm / limit
        state["fira_norm"] = norm.detach().float().reshape(())
        return self.scale * residual if self.fira_variant == "paper" else residual

    def state_bytes(self) -> int:
        return FIRA_NORM_BYTES


class SignSGDResidual(ResidualPolicy):
    """FRUGAL: a state-free signSGD step on the residual, at scale * inactive_lr_scale."""

    def __call__(self, state, grad_c, core_grad, direction, projector):
        residual = grad_c - projector.project_back(state, core_grad, grad_c.shape[0])
        return (self.scale * self.inactive_lr_scale) * torch.sign(residual)


class SGDResidual(ResidualPolicy):
    """FRUGAL's 'sgd' rule: a plain SGD step on the residual, at scale * inactive_lr_scale."""

    def __call__(self, state, grad_c, core_grad, direction, projector):
        residual = grad_c - projector.project_back(state, core_grad, grad_c.shape[0])
        return (self.scale * self.inactive_lr_scale) * residual


RESIDUALS: dict[str, type[ResidualPolicy]] = {
    "drop": DropResidual,
    "fira": FiraResidual,
    "sign_sgd": SignSGDResidual,
    "sgd": SGDResidual,
}
FIRA_VARIANTS = ("paper", "code")
