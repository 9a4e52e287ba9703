"""Adafactor (Shazeer & Stern 2018) as a core: a factored second moment for matrices, so its state is
rows + columns instead of rows x columns.

Per update t of a core gradient G (2-D: factored; 1-D: an unfactored second moment):

    b2_t = 1 - t^decay_rate                                  (decay_rate -0.8: b2_1 = 0)
    R = b2_t R + (1 - b2_t) mean_cols(G^2 + eps1)            row means, fp32
    C = b2_t C + (1 - b2_t) mean_rows(G^2 + eps1)            column means, fp32
    V = (R / mean(R)) outer C                                rank-1 reconstruction
    U = G / sqrt(V);  U = U / max(1, RMS(U) / clip_threshold)
    s = rho_t * (max(eps2, RMS(W)) if scale_parameter else 1)
        rho_t = min(1e-2, 1/sqrt(t)) (warmup_init: min(1e-6 t, 1/sqrt(t))) if relative_step else 1
    U = s U;  with a first moment (beta1 = betas[0] > 0): M = beta1 M + (1 - beta1) U, U = M
    W <- W (1 - lr * weight_decay * s) - lr * U

Weight decay comes before the step, as in transformers' `Adafactor` and galore-torch's `GaLoreAdafactor`,
whatever `adam_convention` says (that option places Adam's decay). By default the external lr stays outside the
first-moment average (as Adam keeps lr outside its moments); `lr_in_first_moment: true` folds it in before the
average as transformers and GaLoreAdafactor do (s = lr * s, W -= U): the two agree exactly at a constant lr and
differ in how an lr schedule mixes into the momentum. With relative_step the external lr is 1 times the
trainer's schedule factor (`optimizer.lr` must be unset). W is the full weight
also when G is a projected core (GaLore-Adafactor's parameter scale is the weight's RMS). The factored
statistics stay fp32 (they are rows + columns); the optional first moment uses the state storage.
"""
from __future__ import annotations

import math

import torch

from lowmem.optim.parts.cores import FIRST, SECOND, Core, CoreStep, moment_parts, register_core
from lowmem.optim.state.storage import QuantizedStorage

ROW, COL = "exp_avg_sq_row", "exp_avg_sq_col"
RELATIVE_STEP_CAP = 1e-2
WARMUP_INIT_RATE = 1e-6


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm() / math.sqrt(tensor.numel())


def adafactor_math(grad: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None,
                   second: torch.Tensor | None, beta2: float, eps1: float, clip_threshold: float) -> torch.Tensor:
    """Update the second-moment statistics in place (row/col for a matrix, `second` for a vector) and return
    the clipped, unscaled direction G / sqrt(V) / max(1, RMS / clip) as a fresh fp32 tensor."""
    squared = grad * grad + eps1
    if row is not None:
        row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
        col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
        row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = torch.mul(row_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
    else:
        second.mul_(beta2).add_(squared, alpha=1.0 - beta2)
        update = second.rsqrt().mul_(grad)
    return update.div_((rms(update) / clip_threshold).clamp_(min=1.0))


@register_core("adafactor")
class AdafactorCore(Core):
    name = "adafactor"
    moment_keys = (FIRST, SECOND, ROW, COL)
    counter_keys = ("factor_step",)
    has_second_moment = True  # the rank-1 reconstruction R C / mean(R) of a factored one
    decays_before_step = True

    def __init__(self, options, policy):
        super().__init__(options, policy)
        self.lr_in_direction = options.lr_in_first_moment

    def _step_factor(self, step: int, weight: torch.Tensor) -> float:
        o = self.options
        rho = 1.0
        if o.relative_step:
            rho = min(WARMUP_INIT_RATE * step if o.warmup_init else RELATIVE_STEP_CAP, 1.0 / math.sqrt(step))
        if o.scale_parameter:
            rho *= max(o.adafactor_eps[1], float(rms(weight.float())))
        return rho

    def step(self, grad, state, group, ctx):
        o = self.options
        factored = grad.dim() >= 2
        if "factor_step" not in state:
            state["factor_step"] = 0
            if factored:
                state[ROW] = torch.zeros(grad.shape[:-1], device=grad.device)
                state[COL] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=grad.device)
            else:
                self.policy.for_shape(grad.shape).zeros(state, SECOND, grad.shape, grad.device, "unsigned")
        state["factor_step"] += 1
        step = state["factor_step"]
        beta2 = 1.0 - step ** o.decay_rate
        factor = self._step_factor(step, ctx.weight)
        # the direction's own scale; with lr_in_first_moment the lr too, so the first moment averages lr * U
        scale = factor * group["lr"] if self.lr_in_direction else factor
        if ctx.fused and grad.dim() == 2:
            return self._fused_step(grad, state, group, beta2, scale, factor)
        if factored:
            update = adafactor_math(grad, state[ROW], state[COL], None, beta2, o.adafactor_eps[0], o.clip_threshold)
        else:
            storage = self.policy.for_shape(grad.shape)
            second = storage.read(state, SECOND, grad.shape, "unsigned")
            update = adafactor_math(grad, None, None, second, beta2, o.adafactor_eps[0], o.clip_threshold)
            storage.write(state, SECOND, second, "unsigned")
        update.mul_(scale)
        beta1 = group["betas"][0]
        if beta1 > 0:
            storage = self.policy.for_shape(grad.shape)
            if not storage.holds(state, FIRST, grad.shape):
                storage.zeros(state, FIRST, grad.shape, grad.device, "signed")
            exp_avg = storage.read(state, FIRST, grad.shape, "signed")
            exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
            storage.write(state, FIRST, exp_avg, "signed")
            update = exp_avg.clone() if exp_avg is state.get(FIRST) else exp_avg
        return CoreStep(update, 1.0, decay_scale=factor)

    def _fused_step(self, grad: torch.Tensor, state: dict, group: dict, beta2: float, scale: float,
                    factor: float) -> CoreStep:
        """`step` for a matrix on lowmem.kernels.adafactor: the statistics, clipping and first moment in three
        passes over the gradient. An fp32 or bf16 first moment is updated by the kernel where it is stored; a
        quantized one through an fp32 copy."""
        from lowmem.kernels import adafactor as fused  # lazily: kernel modules import Triton

        o = self.options
        beta1 = group["betas"][0]
        exp_avg = storage = None
        if beta1 > 0:
            storage = self.policy.for_shape(grad.shape)
            if not storage.holds(state, FIRST, grad.shape):
                storage.zeros(state, FIRST, grad.shape, grad.device, "signed")
            quantized = isinstance(storage, QuantizedStorage)
            exp_avg = storage.read(state, FIRST, grad.shape, "signed") if quantized else state[FIRST]
        direction = fused.adafactor_direction(grad, state[ROW], state[COL], beta2, o.adafactor_eps[0],
                                              o.clip_threshold, scale, exp_avg, beta1)
        if exp_avg is not None and exp_avg is not state[FIRST]:
            storage.write(state, FIRST, exp_avg, "signed")
        return CoreStep(direction, 1.0, decay_scale=factor)

    def reset_moments(self, state, shape):
        for key in (ROW, COL):
            if key in state:
                state[key].zero_()
        storage = self.policy.for_shape(tuple(shape))
        for key, kind in ((SECOND, "unsigned"), (FIRST, "signed")):
            if key in state:
                storage.zeros(state, key, shape, state[key].device, kind)

    def second_moment(self, state, shape):
        if ROW in state:
            return torch.outer(state[ROW], state[COL]) / state[ROW].mean() if len(shape) == 2 else None
        if SECOND in state:
            return self.policy.for_shape(tuple(shape)).read(state, SECOND, shape, "unsigned")
        return None

    def state_parts(self, shape):
        shape = tuple(shape)
        moments = [("first moment", "signed")] if self.options.betas[0] > 0 else []
        if len(shape) < 2:
            moments.append(("second moment", "unsigned"))
        parts = moment_parts(self.policy.for_shape(shape), shape, moments)
        if len(shape) >= 2:  # the factored statistics: fp32 rows and columns
            parts["second moment (factored)"] = 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
        return parts
