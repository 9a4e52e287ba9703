"""The batched step: `PipelineOptimizer.step()` runs the weights it can in three phases instead of one weight
at a time:

    1. per weight, in model order: the projector's refresh when due, then R = P^T Gc (one GEMM)
    2. over all weights at once: Adam on the dense weights with the weight update, and Adam on all projected
       cores (their directions D)
    3. per projected weight: the back-projection and the weight update, then the projector's adapt step

On the pure-torch path (optimizer.kernels resolved to torch) phase 2 runs per parameter group in torch's fused
AdamW kernel (one pass per tensor; torch._foreach ops for tensors it cannot take) and phase 3 folds the update
into the back-projection GEMM (addmm's beta carries the weight decay for drop, Fira's limited residual for
fira), then online PCA's P step (its gradient per weight, its AdamW step over every P at once): the same math as `PipelineOptimizer.update_weight` up to rounding (the order of a few
multiplications; the first moment by lerp, as torch's AdamW), which the pipeline's tests against the released
implementations hold to their tolerances. Taken by the adam core with fp32 states, fp32 weights and
gradients, no transforms.

On the Triton kernels phase 2 is one multi-tensor launch per kind (moment format x weight dtype x gradient
dtype) for all dense weights with the same betas and eps, and one for all projected cores
(lowmem.kernels.adam's adam_update_multi / adam_direction_multi), and phase 3 the fused epilogue of each weight:
the same kernels' arithmetic as update_weight's fused path, weight by weight. Taken by the adam core without
transforms, any state storage, fp32 or bf16 weights and gradients (a dense weight contiguous; a core the
kernels cannot batch, rank-1 int4 or strided, is stepped alone in phase 2).

Anything else goes through update_weight, weight by weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from lowmem.optim.parts.cores import FIRST, SECOND, CoreContext, bias_correction, kernel_moments
from lowmem.optim.parts.projectors import OSD_BETAS, OSD_EPS, OSD_WEIGHT_DECAY, OnlinePCAProjector, canonical
from lowmem.optim.parts.residuals import FIRA_NORM_EPS, DropResidual, FiraResidual, SGDResidual, SignSGDResidual

if TYPE_CHECKING:
    from lowmem.kernels.adam import Moments

# elements per foreach call or per multi-tensor direction launch: bounds the temporaries (the denominators, the
# directions) to 64 MiB or one tensor
CHUNK_NUMEL = 1 << 24


@dataclass
class _Entry:
    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    group: dict
    grad_c: Optional[torch.Tensor] = None  # canonical gradient (projected weights)
    core_grad: Optional[torch.Tensor] = None  # R = P^T Gc; None for an empty subspace
    basis: Optional[torch.Tensor] = None  # P of a dense basis, built once for both GEMMs (random: one draw)
    moments: Optional[Moments] = None  # the kernels' view of the Adam moments (None: not in a multi-tensor launch)


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


def foreach_adam_direction(grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                           steps: list[int], beta1: float, beta2: float, eps: float,
                           eps_scaled: bool) -> list[torch.Tensor]:
    """`adam_math` over lists of fp32 tensors with torch._foreach ops (a few launches for all of them instead of
    a dozen per tensor), bit for bit: moments updated in place, fresh directions returned."""
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    bias1 = [1.0 - beta1 ** s for s in steps]
    bias2_sqrt = [math.sqrt(1.0 - beta2 ** s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if eps_scaled:
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        directions = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(directions, bias1)
        return directions
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(directions, [b2 / b1 for b1, b2 in zip(bias1, bias2_sqrt)])
    return directions


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


def _chunks(entries: list[_Entry],
            numel: Callable[[_Entry], int] = lambda e: e.grad.numel()) -> Iterator[list[_Entry]]:
    """Consecutive runs of entries of at most CHUNK_NUMEL elements (by `numel`; a larger entry alone)."""
    chunk, size = [], 0
    for entry in entries:
        if chunk and size + numel(entry) > CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += numel(entry)
    if chunk:
        yield chunk


def _by_hyper(entries: list[_Entry]) -> dict[tuple[float, float, float], list[_Entry]]:
    """Entries by (beta1, beta2, eps), the hyper-parameters one multi-tensor launch shares."""
    runs: dict[tuple[float, float, float], list[_Entry]] = {}
    for entry in entries:
        runs.setdefault((*entry.group["betas"], entry.group["eps"]), []).append(entry)
    return runs


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
        self.fused_dense: list[_Entry] = []  # the kernels' batch (module docstring)
        self.fused_projected: list[_Entry] = []
        self.fused_empty: list[_Entry] = []
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
        """Whether the optimizer's rule can batch at all (the per-weight checks are in `add`): the torch path
        with fp32 states, or weights on the kernels."""
        if opt.options.implementation == "per_weight" or opt.options.unbatchable():
            return False
        return opt.policy.state_dtype == "fp32" or any(opt._fused(p.device) for g in opt.param_groups
                                                       for p in g["params"])

    def add(self, p: torch.Tensor, group: dict) -> bool:
        """Take p's update into the batch (its refresh and projection now); False: step it alone."""
        opt = self.opt
        grad = p.grad
        if grad is None or p in opt._core_grads or grad.is_sparse:
            return False
        if opt._fused(p.device):
            return self._add_fused(p, grad, group)
        if p.dtype != torch.float32 or grad.dtype != torch.float32 or opt.policy.state_dtype != "fp32":
            return False
        state = self._begin(p)
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

    def _begin(self, p: torch.Tensor) -> dict:
        """p's state, with the update index moved on as update_weight moves it."""
        opt = self.opt
        state = opt.state[p]
        state.setdefault("step", 0)
        opt._update_index = max(opt._update_index, state["step"])
        return state

    def _add_fused(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
        """`add` on the kernels: a dense weight into one multi-tensor update, a projected weight's core into
        one multi-tensor direction (update_weight's fused path, batched)."""
        opt = self.opt
        if p.dtype not in (torch.float32, torch.bfloat16) or grad.dtype not in (torch.float32, torch.bfloat16):
            return False
        if not opt._is_projected(p, group):
            if not (p.is_contiguous() and grad.is_contiguous() and opt.core.fusable(grad.shape)):
                return False
            state = self._begin(p)
            self.fused_dense.append(_Entry(p, grad, state, group,
                                           moments=kernel_moments(state, opt.core._count(grad, state))))
            return True
        state = self._begin(p)
        grad = grad.float()  # as update_weight: the projection and the epilogue read fp32
        opt._refresh_if_due(grad, state, opt._keys[p])
        entry = _Entry(p, grad, state, group, grad_c=canonical(grad))
        if opt.projector.is_empty(state):
            self.fused_empty.append(entry)
            return True
        entry.core_grad = opt.projector.project(state, entry.grad_c)
        if opt.core.fusable(entry.core_grad.shape) and entry.core_grad.is_contiguous():
            entry.moments = kernel_moments(state, opt.core._count(entry.core_grad, state))
        self.fused_projected.append(entry)
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
        if self.fused_dense or self.fused_projected or self.fused_empty:
            self._finish_fused()
        self._step_bases()
        for entries in (*self.dense.values(), *self.projected.values(), self.empty, self.fused_dense,
                        self.fused_projected, self.fused_empty):
            for entry in entries:
                entry.state["step"] += 1
                opt._updates_done = max(opt._updates_done, entry.state["step"])

    def _finish_fused(self) -> None:
        """Phases 2 and 3 on the kernels."""
        from lowmem.kernels.adam import adam_direction_multi, adam_update_multi  # lazily: they import Triton

        opt = self.opt
        convention = opt.convention
        for (beta1, beta2, eps), entries in _by_hyper(self.fused_dense).items():
            adam_update_multi([e.param for e in entries], [e.grad for e in entries], [e.moments for e in entries],
                              [e.state["adam_step"] for e in entries], [e.group["lr"] for e in entries],
                              [e.group["lr"] * e.group["weight_decay"] for e in entries], beta1, beta2, eps,
                              convention.eps_scaled, convention.decay_after)
        for (beta1, beta2, eps), entries in _by_hyper(self.fused_projected).items():
            for chunk in _chunks(entries, lambda e: e.core_grad.numel()):  # the directions' memory
                batch = [e for e in chunk if e.moments is not None]
                directions = adam_direction_multi([e.core_grad for e in batch], [e.moments for e in batch],
                                                  [e.state["adam_step"] for e in batch], beta1, beta2, eps,
                                                  convention.eps_scaled) if batch else []
                by_entry = dict(zip(map(id, batch), directions))
                for entry in chunk:
                    weight = entry.param.float()
                    if id(entry) in by_entry:
                        direction = by_entry.pop(id(entry))
                        correction = bias_correction(entry.state["adam_step"], beta1, beta2)
                    else:  # the core's own fused step, alone
                        ctx = CoreContext(weight, opt._keys[entry.param].label, fused=True)
                        direction, _, correction = opt._core_step(entry.core_grad, entry.state, entry.group, ctx,
                                                                  None)
                    self._fused_epilogue(entry, weight, direction, correction)
        for entry in self.fused_empty:
            self._fused_epilogue(entry, entry.param.float(), None, 1.0)

    def _fused_epilogue(self, entry: _Entry, weight: torch.Tensor, direction: Optional[torch.Tensor],
                        correction: float) -> None:
        """update_weight's phase after the core on the kernels: the fused epilogue where it applies, else the
        back-projection in torch; `weight` is p in fp32 (p itself when fp32), copied back."""
        opt = self.opt
        group, state = entry.group, entry.state
        lr = group["lr"]
        decay = lr * group["weight_decay"]
        if opt._fuses_epilogue(state):
            opt._fused_epilogue(weight, entry.grad, opt._fused_basis(state, entry.grad, entry.core_grad),
                                entry.core_grad, direction, correction, state, lr, decay)
        else:
            update_c = opt._back_projected(entry.grad_c, entry.core_grad, direction, correction, state)
            opt.convention.apply_update(canonical(weight), update_c, lr, decay)
        if weight is not entry.param:
            entry.param.copy_(weight)
        opt.projector.adapt(state, entry.grad_c, lr / group["initial_lr"], entry.core_grad)

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
