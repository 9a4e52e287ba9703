"""Residual policies: what to do with the part of the gradient outside the projector's subspace.

Each policy returns the extra term added to `scale * P D` (D = the core's Adam direction), already in
canonical (b, a) layout, or None to drop the residual. All work in fp32, on fresh tensors (in place). On the
fused path a policy gives the same term as the factors of lowmem.kernels.residual's epilogue instead
(`epilogue_terms`), which forms it tile by tile while it updates the weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FIRA_NORM_EPS = 1e-8  # added to ||R|| column norms and to the previous residual norm (as Fira codes it)
FIRA_NORM_BYTES = 4  # the limiter's previous norm, one fp32 scalar tensor


@dataclass
class EpilogueTerms:
    """A residual as the fused epilogue forms it: k phi_j (Gc - c B)_ij, or k sign(Gc - c B) with `sign` (B =
    back, phi None: 1); k a one-element fp32 tensor on the gradient's device."""

    k: torch.Tensor
    c: float = 1.0
    phi: Optional[torch.Tensor] = None
    sign: bool = False


class ResidualPolicy:
    """`__call__(state, grad_c, core_grad, direction, back, bias_correction)`: grad_c is the canonical
    fp32 gradient (b x a, may alias the parameter's .grad: never modified), core_grad R = P^T Gc, direction D
    the core's bias-corrected Adam direction, back = P R (b x a, computed only when `needs_back`), or None
    when the subspace is empty (an inactive FRUGAL block: the whole gradient is residual and R, D are None),
    bias_correction the factor sqrt(1-b2^t)/(1-b1^t) that D carries. Returns a fresh tensor or None."""

    needs_back = True  # the optimizer computes back = P R only for policies that use it
    vanishes_on_full = False  # True: the residual is zero when the subspace is the whole space (active block)
    # Why all-reducing R = P^T G instead of G would not be exact with this residual (None: it is).
    sync_refusal: str | None = "uses what the projection leaves out of G"
    fusable = False  # True: `epilogue_terms` gives the residual to the fused epilogue

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        return False  # only ever beside a projection

    def cost(self, shape: tuple[int, ...], core_shape: tuple[int, ...]) -> float:
        return 0.0 if self.sync_refusal is None else 6.0 * math.prod(shape)

    def __init__(self, scale: float, fira_gamma: float = 1.01, fira_variant: str = "paper",
                 inactive_lr_scale: float = 1.0):
        self.scale = scale
        self.fira_gamma = fira_gamma
        self.fira_variant = fira_variant
        self.inactive_lr_scale = inactive_lr_scale

    def __call__(self, state: dict, grad_c: torch.Tensor, core_grad: Optional[torch.Tensor],
                 direction: Optional[torch.Tensor], back: Optional[torch.Tensor],
                 bias_correction: float) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def epilogue_terms(self, state: dict, grad_c: torch.Tensor, core_grad: Optional[torch.Tensor],
                       direction: Optional[torch.Tensor], back: Optional[torch.Tensor],
                       bias_correction: float) -> Optional[EpilogueTerms]:
        """The term `__call__` returns, as the fused epilogue's factors (None: no residual), with the same
        arguments and the same effect on `state`."""
        raise NotImplementedError(f"{type(self).__name__} has no fused epilogue")

    def state_bytes(self) -> int:
        return 0

    def reset(self, state: dict) -> None:
        """Forget the policy's state (a FRUGAL refresh clears every weight's state)."""


class DropResidual(ResidualPolicy):
    """GaLore, OSD: the residual is discarded."""

    needs_back = False
    vanishes_on_full = True
    sync_refusal = None
    fusable = True

    def __call__(self, state, grad_c, core_grad, direction, back, bias_correction):
        return None

    def epilogue_terms(self, state, grad_c, core_grad, direction, back, bias_correction):
        return None


class FiraResidual(ResidualPolicy):
    """Fira: scale each column of the residual by phi = ||N_col|| / (||R_col|| + 1e-8) (norms over the rank
    dimension), then limit its Frobenius-norm growth to gamma per update: S <- S / (max(||S|| / (prev + 1e-8),
    gamma) / gamma), prev being the previous update's limited norm. The first update is unlimited, and so is
    any update whose previous norm is 0 (after an all-zero gradient), so one zero gradient cannot pin the
    residual near 1e-8.

    Where Fira's paper and its released code differ we follow the paper by default (lowmem's rule);
    `fira_variant: code` reproduces the released code, which is what produced Fira's published tables.

    fira_variant 'paper' (default, Fira Alg. 1): N = D (bias-corrected), S = (I - P P^T) G, limiter on that
        S, update = scale * (P D + S_limited).
    fira_variant 'code' (optimizer_torch/fira_adamw.py): N = M / (sqrt(V) + eps) WITHOUT bias correction,
        S = G - scale * P R (project_back multiplies by alpha), limiter compares and stores norms in those
        uncorrected units, and the bias correction bc = sqrt(1-b2^t)/(1-b1^t) multiplies S only after
        limiting: update = bc * (scale * P N + S_limited) = scale * P D + bc * S_limited. N is recovered as
        D / bc, exact in the galore Adam convention (Fira's); with adam_convention torch it is approximate.
    """

    fusable = True

    def __call__(self, state, grad_c, core_grad, direction, back, bias_correction):
        if back is None:  # empty subspace: phi = ||D|| / ||R|| over zero rows = 0, so S = 0
            return None
        code = self.fira_variant == "code"
        residual = torch.sub(grad_c, back, alpha=self.scale if code else 1.0)
        phi = self._phi(core_grad, direction, bias_correction)
        residual.mul_(phi)
        limit = self.limit(state, residual.norm())
        if limit is not None:
            residual.div_(limit)
        return residual.mul_(bias_correction if code else self.scale)

    def epilogue_terms(self, state, grad_c, core_grad, direction, back, bias_correction):
        """The limiter's norm from the epilogue's reduction kernel, kept on the device (no host sync)."""
        if back is None:
            return None
        from lowmem.kernels.residual import residual_norm  # lazily: kernel modules import Triton

        code = self.fira_variant == "code"
        c = self.scale if code else 1.0
        phi = self._phi(core_grad, direction, bias_correction)
        norm = residual_norm(grad_c, back, phi, c)
        limit = self.limit(state, norm)
        factor = bias_correction if code else self.scale
        k = torch.full_like(norm, factor) if limit is None else factor / limit
        return EpilogueTerms(k.reshape(1), c, phi)

    def _phi(self, core_grad: torch.Tensor, direction: torch.Tensor, bias_correction: float) -> torch.Tensor:
        """phi_j = ||N_:j|| / (||R_:j|| + 1e-8), N = D, or D / bc in the code variant (||N|| = ||D|| / bc)."""
        phi = direction.norm(dim=0).div_(core_grad.norm(dim=0).add_(FIRA_NORM_EPS))
        return phi.div_(bias_correction) if self.fira_variant == "code" else phi

    def limit(self, state: dict, norm: torch.Tensor) -> Optional[torch.Tensor]:
        """The limiter's divisor for a scaled residual of Frobenius norm `norm` (None on a first update), with the
        limited norm stored for the next update."""
        previous = state.get("fira_norm")
        limit = None
        if previous is not None:
            limit = torch.clamp(norm / (previous + FIRA_NORM_EPS), min=self.fira_gamma) / self.fira_gamma
            limit = torch.where(previous > 0, limit, torch.ones_like(limit))  # previous 0: as a first update
            norm = norm / limit
        state["fira_norm"] = norm.detach().float().reshape(())
        return limit

    def state_bytes(self) -> int:
        return FIRA_NORM_BYTES

    def reset(self, state):
        state.pop("fira_norm", None)


class SignSGDResidual(ResidualPolicy):
    """FRUGAL: a state-free signSGD step on the residual, at scale * inactive_lr_scale."""

    vanishes_on_full = True
    fusable = True

    def __call__(self, state, grad_c, core_grad, direction, back, bias_correction):
        residual = torch.sign(grad_c) if back is None else torch.sub(grad_c, back).sign_()
        return residual.mul_(self.scale * self.inactive_lr_scale)

    def epilogue_terms(self, state, grad_c, core_grad, direction, back, bias_correction):
        return EpilogueTerms(torch.full((1,), self.scale * self.inactive_lr_scale, device=grad_c.device), sign=True)


class SGDResidual(ResidualPolicy):
    """FRUGAL's 'sgd' rule: a plain SGD step on the residual, at scale * inactive_lr_scale."""

    vanishes_on_full = True
    fusable = True

    def __call__(self, state, grad_c, core_grad, direction, back, bias_correction):
        factor = self.scale * self.inactive_lr_scale
        return grad_c * factor if back is None else torch.sub(grad_c, back).mul_(factor)

    def epilogue_terms(self, state, grad_c, core_grad, direction, back, bias_correction):
        return EpilogueTerms(torch.full((1,), self.scale * self.inactive_lr_scale, device=grad_c.device))


RESIDUALS: dict[str, type[ResidualPolicy]] = {
    "drop": DropResidual,
    "fira": FiraResidual,
    "sign_sgd": SignSGDResidual,
    "sgd": SGDResidual,
}
FIRA_VARIANTS = ("paper", "code")
