"""The projected update's epilogue: back-projection, residual, scale, weight decay and the weight write.

After the core's fused Adam (`lowmem.kernels.adam.adam_direction`) gives the direction D of the core gradient
R = P^T Gc, the weight takes (canonical b x a layout, W^T for a tall weight; lowmem.optim.pipeline):

    U = scale * P D + residual,  W <- the Adam convention's decayed step of W by lr U

    drop      residual 0: for an fp32 weight one cuBLAS call, W <- beta W + alpha P D (addmm); a bf16 weight
              goes through the epilogue kernel (it rounds to nearest or stochastically)
    fira      k phi_j (Gc - c P R)_ij: phi_j = ||D_:j|| / (||R_:j|| + 1e-8) (over the rank, per column), and
              k = the limiter's factor, from the norm of that residual (`lowmem.optim.parts.residuals.FiraResidual`:
              paper c = 1, k = scale / limit; code c = scale, phi / bias correction, k = bias correction / limit)
    sign_sgd  f sign(Gc - P R), f = scale * inactive_lr_scale (FRUGAL)
    sgd       f (Gc - P R)

P R and P D come from one matmul, P [R | D] (cuBLAS). Fira's limiter needs the residual's norm before any
weight moves: one reduction kernel reads Gc and P R for it, and the limiter stays on the device (no host
sync). Then one epilogue kernel reads W, Gc, P R, P D and writes W, whatever the layout (2-D tiles with
strides: transposed weights and non-contiguous gradients need no copies). An empty subspace (an inactive
FRUGAL block) runs the same epilogue on Gc alone (or, with no residual, only the decay); the whole space (an
active block, P = I) runs it on D itself, with no GEMM. The reference is the pipeline's own code:
`reference_projected_update`.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowmem.kernels._triton import cdiv, jit, tl
from lowmem.kernels.common import decayed_step, store_float
from lowmem.optim.parts.cores import ADAM_CONVENTIONS
from lowmem.optim.parts.projectors import canonical
from lowmem.optim.parts.residuals import (
    FIRA_NORM_EPS,
    DropResidual,
    FiraResidual,
    ResidualPolicy,
    SGDResidual,
    SignSGDResidual,
)

NONE, LINEAR, SIGN = 0, 1, 2  # the residual term: none, k phi_j (G - c B), k sign(G - B)


@jit
def _tile_offsets(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r[:, None], c[None, :], (r < rows)[:, None] & (c < cols)[None, :]


@jit
def _residual_sumsq_kernel(partial_ptr, g_ptr, b_ptr, phi_ptr, rows, cols, g_s0, g_s1, b_s0, b_s1, c,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile sums of (phi_j (G - c B)_ij)^2, for Fira's limiter (summed by the launcher: deterministic)."""
    r, col, mask = _tile_offsets(rows, cols, BLOCK_R, BLOCK_C)
    g = tl.load(g_ptr + r * g_s0 + col * g_s1, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + r * b_s0 + col * b_s1, mask=mask, other=0.0)
    phi = tl.load(phi_ptr + col, mask=col < cols, other=0.0)
    s = (g - c * b) * phi
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(s * s))


@jit
def _epilogue_kernel(w_ptr, m_ptr, g_ptr, b_ptr, phi_ptr, k_ptr, rows, cols, w_s0, w_s1, m_s0, m_s1,
                     g_s0, g_s1, b_s0, b_s1, m_scale, c, neg_lr, keep, seed, RESIDUAL: tl.constexpr,
                     HAS_M: tl.constexpr, HAS_B: tl.constexpr, HAS_PHI: tl.constexpr, DECAY_AFTER: tl.constexpr,
                     STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """W <- decayed step of W by U = m_scale M + residual(G, B), over canonical (rows x cols) tiles."""
    r, col, mask = _tile_offsets(rows, cols, BLOCK_R, BLOCK_C)
    u = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if HAS_M:
        u += m_scale * tl.load(m_ptr + r * m_s0 + col * m_s1, mask=mask, other=0.0)
    if RESIDUAL != 0:
        g = tl.load(g_ptr + r * g_s0 + col * g_s1, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            g -= c * tl.load(b_ptr + r * b_s0 + col * b_s1, mask=mask, other=0.0)
        k = tl.load(k_ptr)
        if RESIDUAL == 1:
            if HAS_PHI:
                k = k * tl.load(phi_ptr + col, mask=col < cols, other=0.0)
            u += k * g
        else:
            u += k * tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    off = r * w_s0 + col * w_s1
    w = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    store_float(w_ptr, off, decayed_step(w, u, neg_lr, keep, DECAY_AFTER), mask, seed, r * cols + col, STOCHASTIC)


def _tiles(device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a tile: few large ones for the interpreter; 32 x 128 on a GPU (untuned)."""
    return (64, 256) if device.type != "cuda" else (32, 128)


def _fira_factor(residual: FiraResidual, state: dict, grad_c: torch.Tensor, back: torch.Tensor,
                 core_grad: torch.Tensor, direction: torch.Tensor,
                 bias_correction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(phi, k, c) of FiraResidual, with its limiter on the device: the residual's norm from a reduction kernel."""
    code = residual.fira_variant == "code"
    c = residual.scale if code else 1.0
    phi = direction.norm(dim=0).div_(core_grad.norm(dim=0).add_(FIRA_NORM_EPS))
    if code:
        phi.div_(bias_correction)
    rows, cols = grad_c.shape
    block_r, block_c = _tiles(grad_c.device)
    grid = (cdiv(rows, block_r), cdiv(cols, block_c))
    partial = torch.empty(grid[0] * grid[1], device=grad_c.device)
    _residual_sumsq_kernel[grid](partial, grad_c, back, phi, rows, cols, *grad_c.stride(), *back.stride(), c,
                                 BLOCK_R=block_r, BLOCK_C=block_c)
    norm = partial.sum().sqrt()
    previous = state.get("fira_norm")
    limit = torch.ones_like(norm)
    if previous is not None:
        limit = torch.clamp(norm / (previous + FIRA_NORM_EPS), min=residual.fira_gamma) / residual.fira_gamma
        limit = torch.where(previous > 0, limit, torch.ones_like(limit))
    state["fira_norm"] = (norm / limit).reshape(())
    k = (bias_correction if code else residual.scale) / limit
    return phi, k.reshape(1), c


def handles(residual: ResidualPolicy) -> bool:
    """Whether the epilogue implements this residual policy (the pipeline's own code runs any other)."""
    return isinstance(residual, (DropResidual, FiraResidual, SignSGDResidual, SGDResidual))


def projected_update(weight: torch.Tensor, grad: torch.Tensor, basis: Optional[torch.Tensor],
                     core_grad: Optional[torch.Tensor], direction: Optional[torch.Tensor],
                     residual: ResidualPolicy, state: dict, bias_correction: float, lr: float, decay: float,
                     decay_after: bool, stochastic_rounding: bool = False, seed: int = 0) -> None:
    """Update `weight` (fp32 or bf16, original orientation) in place from the core's `direction` D of
    `core_grad` R = basis^T canonical(grad) (basis: fp32 b x r; None for the identity, the whole space of an
    active FRUGAL block, where R = canonical(grad); None with R and D None for an empty subspace).
    `residual` is the optimizer's policy (its scale is GaLore's alpha), `state` the weight's (Fira keeps its
    limiter norm there); decay = lr * weight_decay * the core's decay scale, applied after the step with
    decay_after (GaLore's convention) or before (torch's)."""
    if stochastic_rounding and weight.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bf16 weights, got {weight.dtype}")
    if not handles(residual):
        raise ValueError(f"no fused epilogue for the residual policy {type(residual).__name__}")
    grad_c, weight_c = canonical(grad), canonical(weight)
    scale = residual.scale
    if basis is not None and isinstance(residual, DropResidual) and weight.dtype == torch.float32:
        # U = scale P D: the whole update is one GEMM with the decay as beta
        alpha = -lr * scale * ((1.0 - decay) if decay_after else 1.0)
        weight_c.addmm_(basis, direction, beta=1.0 - decay, alpha=alpha)
        return
    full = basis is None and direction is not None
    with_residual = not isinstance(residual, DropResidual) and not (full and residual.vanishes_on_full)
    mode, c, phi, k = NONE, 1.0, None, None
    pd = back = None
    if full:
        pd, back = direction, core_grad
    elif basis is not None:
        if not with_residual:
            pd = basis @ direction
        else:
            stacked = basis @ torch.cat([core_grad, direction], dim=1)  # [P R | P D], one GEMM
            back, pd = stacked[:, :core_grad.shape[1]], stacked[:, core_grad.shape[1]:]
    if not with_residual:
        back = None
    elif isinstance(residual, FiraResidual):
        if direction is not None:  # an empty subspace has phi = 0: no residual
            mode = LINEAR
            phi, k, c = _fira_factor(residual, state, grad_c, back, core_grad, direction, bias_correction)
    else:
        mode = SIGN if isinstance(residual, SignSGDResidual) else LINEAR
        k = torch.full((1,), scale * residual.inactive_lr_scale, device=grad.device)
    rows, cols = grad_c.shape
    block_r, block_c = _tiles(grad.device)
    dummy = grad_c
    m, b = (pd if pd is not None else dummy), (back if back is not None else dummy)
    _epilogue_kernel[(cdiv(rows, block_r), cdiv(cols, block_c))](
        weight_c, m, grad_c, b, phi if phi is not None else dummy, k if k is not None else dummy, rows, cols,
        *weight_c.stride(), *m.stride(), *grad_c.stride(), *b.stride(), scale, c, -lr, 1.0 - decay, seed,
        RESIDUAL=mode, HAS_M=pd is not None, HAS_B=back is not None, HAS_PHI=phi is not None,
        DECAY_AFTER=decay_after, STOCHASTIC=stochastic_rounding, BLOCK_R=block_r, BLOCK_C=block_c)


def reference_projected_update(weight: torch.Tensor, grad: torch.Tensor, basis: Optional[torch.Tensor],
                               core_grad: Optional[torch.Tensor], direction: Optional[torch.Tensor],
                               residual: ResidualPolicy, state: dict, bias_correction: float, lr: float,
                               decay: float, decay_after: bool) -> None:
    """The pipeline's `_projected_update` after the core step, and its `update_weight` / `_step_param`."""
    grad_c = canonical(grad.float())
    if direction is None:
        update_c = residual(state, grad_c, None, None, None, 1.0)
        if update_c is None:
            update_c = torch.zeros_like(grad_c)
    else:
        extra = None
        if basis is not None or not residual.vanishes_on_full:
            back = (core_grad if basis is None else basis @ core_grad) if residual.needs_back else None
            extra = residual(state, grad_c, core_grad, direction, back, bias_correction)
        update_c = (direction if basis is None else basis @ direction) * residual.scale
        if extra is not None:
            update_c.add_(extra)
    update = update_c.T if grad.shape[0] >= grad.shape[1] else update_c
    fp32 = weight.float()
    ADAM_CONVENTIONS["galore" if decay_after else "torch"].apply_update(fp32, update, lr, decay)
    if fp32 is not weight:
        weight.copy_(fp32)
