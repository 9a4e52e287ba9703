"""The reference path's batched step: `PipelineOptimizer.step()` on the pure-torch path (optimizer.kernels
resolved to torch) runs the weights it can in three phases instead of one weight at a time:

    1. per weight, in model order: the projector's refresh when due, then R = P^T Gc (one GEMM)
    2. per parameter group, over all weights at once, in torch's fused AdamW kernel (one pass per tensor;
       torch._foreach ops for tensors it cannot take): Adam on the dense weights with the weight update, and
       Adam on all projected cores (their directions D)
    3. per projected weight: the back-projection with the update folded into its GEMM (addmm's beta carries
       the weight decay for drop, Fira's limited residual for fira), then the projector's adapt step (online
       PCA's P step: its gradient per weight, its AdamW step over every P at once)

Same math as `PipelineOptimizer.update_weight` up to rounding (the order of a few multiplications; the first
moment by lerp, as torch's AdamW); the pipeline's tests against the released implementations hold it to
their tolerances. Taken by: the adam core with fp32 states, fp32 weights and gradients, no transforms;
anything else goes through update_weight, weight by weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from lowmem.optim.cores import FIRST, SECOND, bias_correction
from lowmem.optim.projectors import OSD_BETAS, OSD_EPS, OSD_WEIGHT_DECAY, OnlinePCAProjector, canonical
from lowmem.optim.residuals import FIRA_NORM_EPS, DropResidual, FiraResidual, SGDResidual, SignSGDResidual

CHUNK_NUMEL = 1 << 24  # elements per foreach call: bounds the temporaries (the denominators) to 64 MiB or one tensor


@dataclass
class _Entry:
    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    group: dict
    grad_c: Optional[torch.Tensor] = None  # canonical gradient (projected weights)
    core_grad: Optional[torch.Tensor] = None  # R = P^T Gc; None for an empty subspace
    basis: Optional[torch.Tensor] = None  # P of a dense basis, built once for both GEMMs (random: one draw)


def foreach_adam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        exp_avg_sqs: list[torch.Tensor], steps: list[int], lr: float, beta1: float, beta2: float,
                        eps: float, eps_scaled: bool, decay: float, decay_after: bool) -> None:
    """Adam with the weight update over lists of fp32 tensors (the pipeline's conventions, decay = lr * wd)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias1 = [1.0 - beta1 ** s for s in steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2 ** s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_scaled:  # torch's: (m / b1) / (sqrt(v) / b2 + eps)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        step_sizes = [-lr / b1 for b1 in bias1]
    else:  # GaLore's: b2 / b1 * m / (sqrt(v) + eps)
        torch._foreach_add_(denom, eps)
        step_sizes = [-lr * b2 / b1 for b1, b2 in zip(bias1, bias2_sqrt)]
    if decay > 0 and not decay_after:
        torch._foreach_mul_(params, 1.0 - decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
    if decay > 0 and decay_after:
        torch._foreach_mul_(params, 1.0 - decay)


def _fusable(*tensors: torch.Tensor) -> bool:
    """Whether torch's fused AdamW kernel can take these tensors together: it walks memory as one contiguous
    array per tensor, whatever the strides."""
    return all(t.is_contiguous() and t.shape == tensors[0].shape for t in tensors)


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, beta1: float, beta2: float,
                 eps: float, eps_scaled: bool, weight_decay: float = 0.0) -> None:
    """torch's fused AdamW kernel at one step count: p <- p (1 - lr wd) - lr / b1 * m / (sqrt(v) / b2 + eps), the
    moments as torch's AdamW updates them. GaLore's eps (outside the bias correction) is eps / b2 there."""
    if not eps_scaled:
        eps = eps / math.sqrt(1.0 - beta2 ** step)
    counts = [torch.tensor(float(step), device=params[0].device)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], counts, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def _by_step(steps: list[int], chosen: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i in chosen:
        groups.setdefault(steps[i], []).append(i)
    return groups


def fused_adam_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], steps: list[int], lr: float, beta1: float, beta2: float,
                      eps: float, eps_scaled: bool, decay: float, decay_after: bool) -> None:
    """`foreach_adam_update` in torch's fused AdamW kernel (one pass over each tensor instead of about ten) for
    the tensors it can take; GaLore's decay after the step as lr' = lr (1 - decay) with lr' wd' = decay. The
    same moments bit for bit, the weights to float rounding (the order of a few multiplications)."""
    chosen = [i for i in range(len(params)) if _fusable(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])]
    rest = sorted(set(range(len(params))) - set(chosen))
    fused_lr = lr * (1.0 - decay) if decay_after else lr
    for step, group in _by_step(steps, chosen).items():
        _fused_adamw([params[i] for i in group], [grads[i] for i in group], [exp_avgs[i] for i in group],
                     [exp_avg_sqs[i] for i in group], step, fused_lr, beta1, beta2, eps, eps_scaled,
                     decay / fused_lr if fused_lr else 0.0)
    if rest:
        foreach_adam_update([params[i] for i in rest], [grads[i] for i in rest], [exp_avgs[i] for i in rest],
                            [exp_avg_sqs[i] for i in rest], [steps[i] for i in rest], lr, beta1, beta2, eps,
                            eps_scaled, decay, decay_after)


def fused_adam_direction(grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                         steps: list[int], beta1: float, beta2: float, eps: float, eps_scaled: bool) -> list[torch.Tensor]:
    """`foreach_adam_direction` (moments updated in place, fresh directions returned) in torch's fused AdamW
    kernel where it can take the moments: it steps a zero tensor by lr -1, which leaves the direction there. A
    strided gradient (a transposed view: FRUGAL's whole weights) is copied contiguous first, still several times
    faster than the foreach ops."""
    from lowmem.kernels.adam import foreach_adam_direction  # the reference module: no Triton needed

    directions: list[Optional[torch.Tensor]] = [None] * len(grads)
    chosen = [i for i in range(len(grads)) if _fusable(exp_avgs[i], exp_avg_sqs[i])
              and grads[i].shape == exp_avgs[i].shape]
    for step, group in _by_step(steps, chosen).items():
        outs = [torch.zeros_like(exp_avgs[i]) for i in group]
        _fused_adamw(outs, [grads[i].contiguous() for i in group], [exp_avgs[i] for i in group],
                     [exp_avg_sqs[i] for i in group], step, -1.0, beta1, beta2, eps, eps_scaled)
        for i, out in zip(group, outs):
            directions[i] = out
    rest = [i for i in range(len(grads)) if directions[i] is None]
    if rest:
        found = foreach_adam_direction([grads[i] for i in rest], [exp_avgs[i] for i in rest],
                                       [exp_avg_sqs[i] for i in rest], [steps[i] for i in rest], beta1, beta2, eps,
                                       eps_scaled)
        for i, direction in zip(rest, found):
            directions[i] = direction
    return directions


def _chunks(entries: list[_Entry]) -> Iterator[list[_Entry]]:
    chunk, size = [], 0
    for entry in entries:
        if chunk and size + entry.grad.numel() > CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry.grad.numel()
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------------
# Epilogues by residual policy: the update folded into the back-projection GEMM (a dense basis, a proper
# subspace). Each updates the canonical weight view in place; others take the pipeline's _back_projected.


def _drop_epilogue(batch: BatchedStep, entry: _Entry, weight_c: torch.Tensor, basis: torch.Tensor,
                   direction: torch.Tensor, correction: float, lr: float, decay: float) -> None:
    """W <- (1 - decay) W - lr scale P D (torch's convention), or (1 - decay)(W - lr scale P D): one GEMM."""
    opt = batch.opt
    alpha = -lr * opt.options.scale * ((1.0 - decay) if opt.convention.decay_after else 1.0)
    weight_c.addmm_(basis, direction, beta=1.0 - decay, alpha=alpha)


def _column_squares(matrix: torch.Tensor) -> torch.Tensor:
    """Squared column norms of a 2-D fp32 tensor, by the faster CPU reduction for its layout: linalg.vector_norm
    where each column is contiguous (a transposed view), a sum of squares over the rows otherwise (several times
    faster there than vector_norm over dim 0)."""
    if matrix.stride(0) == 1 and matrix.shape[0] > 1:
        return torch.linalg.vector_norm(matrix, dim=0).square_()
    return matrix.square().sum(dim=0)


def _fira_epilogue(batch: BatchedStep, entry: _Entry, weight_c: torch.Tensor, basis: torch.Tensor,
                   direction: torch.Tensor, correction: float, lr: float, decay: float) -> None:
    """FiraResidual's update with one back-projection GEMM and S never formed.

    With S = (Gc - c P R) diag(phi) and U = scale P D + k S (k: the limiter's factor),
        U = k Gc diag(phi) + P (scale D - k c R diag(phi))
    and the limiter's ||S||^2 = sum_j phi_j^2 (||Gc_j||^2 - 2 c ||R_j||^2 + c^2 R_j^T P^T P R_j), exact since
    P^T Gc = R (no orthonormality assumed): column norms of Gc, and r x a work. The norm's terms cancel where Gc
    lies almost wholly in the subspace; S is then at rounding level either way."""
    opt = batch.opt
    residual: FiraResidual = opt.residual
    code = residual.fira_variant == "code"
    c = residual.scale if code else 1.0
    core_grad = entry.core_grad
    core_squares = _column_squares(core_grad)
    phi = _column_squares(direction).sqrt_().div_(core_squares.sqrt().add_(FIRA_NORM_EPS))
    if code:
        phi.div_(correction)
    # the terms summed in float64, so their cancellation costs no further digits; each is an fp32 column sum, as
    # accurate as ||Gc_j||^2 itself and as S formed in fp32 would be (one read of Gc, the rest r x a)
    columns = _column_squares(entry.grad_c).double()
    columns.add_(core_squares.double(), alpha=-2.0 * c)
    columns.add_(((basis.T @ basis) @ core_grad).mul_(core_grad).sum(dim=0).double(), alpha=c * c)
    norm = (phi.double().square() * columns.clamp_(min=0.0)).sum().sqrt().float()
    limit = residual.limit(entry.state, norm)
    k = correction if code else residual.scale
    if limit is not None:
        k = k / float(limit)  # a host sync: this path runs where torch runs the step (CPU, mostly)
    inner = direction.mul_(residual.scale).addcmul_(core_grad, phi, value=-k * c)  # the direction is this step's own
    # W <- keep W - step (P inner + Gc diag(k phi)) with U never formed: the GEMM with the decay in its beta, then
    # one addcmul (torch's convention decays first, step = lr; GaLore's after, step = lr keep)
    keep = 1.0 - decay
    step = lr * keep if opt.convention.decay_after else lr
    weight_c.addmm_(basis, inner, beta=keep, alpha=-step)
    weight_c.addcmul_(entry.grad_c, phi.mul_(k), value=-step)


EPILOGUES: dict[type, Callable[..., None]] = {DropResidual: _drop_epilogue, FiraResidual: _fira_epilogue}


class BatchedStep:
    """One `step()`'s batched weights: `add` each (phase 1), then `finish` (phases 2 and 3)."""

    def __init__(self, opt):
        self.opt = opt
        self.dense: dict[int, list[_Entry]] = {}
        self.projected: dict[int, list[_Entry]] = {}
        self.empty: list[_Entry] = []
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.bases: dict[float, list[tuple[dict, torch.Tensor]]] = {}  # online PCA: lr factor -> (state, dP)

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer of like's shape and strides, shared by the weights of that layout during this step (fresh
        large allocations cost page faults on every step)."""
        key = (tuple(like.shape), like.stride(), like.dtype, like.device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty_like(like)
        return self._scratch[key]

    @staticmethod
    def applies(opt) -> bool:
        """Whether the optimizer's rule can batch at all (the per-weight checks are in `add`)."""
        return opt.options.core == "adam" and not opt.transforms and opt.policy.state_dtype == "fp32"

    def add(self, p: torch.Tensor, group: dict) -> bool:
        """Take p's update into the batch (its refresh and projection now); False: step it alone."""
        opt = self.opt
        grad = p.grad
        if (grad is None or p in opt._core_grads or p.dtype != torch.float32 or grad.dtype != torch.float32
                or grad.is_sparse or opt._fused(p.device)):
            return False
        state = opt.state[p]
        state.setdefault("step", 0)
        opt._update_index = max(opt._update_index, state["step"])
        entry = _Entry(p, grad, state, group)
        if opt._is_projected(p, group):
            opt._refresh_if_due(grad, state, opt._keys[p])
            entry.grad_c = canonical(grad)
            if opt.projector.is_empty(state):
                self.empty.append(entry)
                return True
            if opt.projector.dense_basis and not opt.projector.is_full(state):
                entry.basis = opt.projector.basis(state, entry.grad_c.shape[0], grad.device)
                entry.core_grad = entry.basis.T @ entry.grad_c  # Projector.project, with the basis kept
            else:
                entry.core_grad = opt.projector.project(state, entry.grad_c)
            opt.core._count(entry.core_grad, state)
            self.projected.setdefault(id(group), []).append(entry)
        else:
            opt.core._count(grad, state)
            self.dense.setdefault(id(group), []).append(entry)
        return True

    def finish(self) -> None:
        opt = self.opt
        convention = opt.convention
        for entries in self.dense.values():
            group = entries[0].group
            beta1, beta2 = group["betas"]
            for chunk in _chunks(entries):
                fused_adam_update([e.param for e in chunk], [e.grad for e in chunk],
                                    [e.state[FIRST] for e in chunk], [e.state[SECOND] for e in chunk],
                                    [e.state["adam_step"] for e in chunk], group["lr"], beta1, beta2, group["eps"],
                                    convention.eps_scaled, group["lr"] * group["weight_decay"],
                                    convention.decay_after)
        for entries in self.projected.values():
            group = entries[0].group
            beta1, beta2 = group["betas"]
            for chunk in _chunks(entries):
                directions = fused_adam_direction([e.core_grad for e in chunk], [e.state[FIRST] for e in chunk],
                                                    [e.state[SECOND] for e in chunk],
                                                    [e.state["adam_step"] for e in chunk], beta1, beta2,
                                                    group["eps"], convention.eps_scaled)
                for entry, direction in zip(chunk, directions):
                    self._epilogue(entry, direction, bias_correction(entry.state["adam_step"], beta1, beta2))
        for entry in self.empty:
            self._epilogue(entry, None, 1.0)
        self._step_bases()
        for entries in (*self.dense.values(), *self.projected.values(), self.empty):
            for entry in entries:
                entry.state["step"] += 1
                opt._updates_done = max(opt._updates_done, entry.state["step"])

    def _epilogue(self, entry: _Entry, direction: Optional[torch.Tensor], correction: float) -> None:
        opt = self.opt
        projector = opt.projector
        group = entry.group
        lr = group["lr"]
        decay = lr * group["weight_decay"]
        weight_c = canonical(entry.param)
        epilogue = EPILOGUES.get(type(opt.residual))
        if epilogue is not None and direction is not None and entry.basis is not None:
            epilogue(self, entry, weight_c, entry.basis, direction, correction, lr, decay)
        elif direction is None and type(opt.residual) in (SignSGDResidual, SGDResidual):
            # an empty subspace: the whole gradient is residual, W -= lr factor sign(Gc) (or Gc), the factor
            # folded into the step size, the sign written into a shared buffer
            residual = opt.residual
            update_c = entry.grad_c
            if isinstance(residual, SignSGDResidual):
                update_c = torch.sign(entry.grad_c, out=self.scratch(entry.grad_c))
            opt.convention.apply_update(weight_c, update_c, lr * residual.scale * residual.inactive_lr_scale, decay)
        else:
            update_c = opt._back_projected(entry.grad_c, entry.core_grad, direction, correction, entry.state,
                                           entry.basis)
            opt.convention.apply_update(weight_c, update_c, lr, decay)
        if isinstance(projector, OnlinePCAProjector) and entry.state["basis"].dtype == torch.float32:
            grad_p = projector.basis_gradient(entry.state, entry.grad_c, entry.core_grad)
            if grad_p is not None:  # P's AdamW step, batched over the weights in finish
                self.bases.setdefault(lr / group["initial_lr"], []).append((entry.state, grad_p))
        else:
            projector.adapt(entry.state, entry.grad_c, lr / group["initial_lr"], entry.core_grad)
        entry.basis = None

    def _step_bases(self) -> None:
        """Online PCA's AdamW step on every P at once (OnlinePCAProjector.adapt's, in the fused kernel)."""
        for lr_factor, items in self.bases.items():
            for state, _ in items:
                state["basis_step"] += 1
            lr = lr_factor / self.opt.projector.update_gap
            fused_adam_update([s["basis"] for s, _ in items], [g for _, g in items],
                              [s["basis_exp_avg"] for s, _ in items], [s["basis_exp_avg_sq"] for s, _ in items],
                              [s["basis_step"] for s, _ in items], lr, OSD_BETAS[0], OSD_BETAS[1], OSD_EPS, True,
                              lr * OSD_WEIGHT_DECAY, False)
