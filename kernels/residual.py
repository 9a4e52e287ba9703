"""The projected update's epilogue: scale, residual, weight decay and the weight write in one pass.

On canonical (b x a) tiles with any strides (a transposed weight or a non-contiguous gradient needs no copy),
with M the back-projected direction (P D, or D itself for the whole space), G the canonical gradient and B its
back-projected core (P R):

    U = scale M + residual,  W <- W keep - lr U (decay before the step), or (W - lr U) keep (after)

    residual  none, k phi_j (G - c B)_ij (phi: a factor per column, optional), or k sign(G - c B); k is a
              one-element device tensor (a norm limiter's factor stays on the device: no host sync)

`residual_norm` is the reduction a norm limiter needs before any weight moves: ||(G - c B) diag(phi)||_F from
per-tile sums added in a fixed order (deterministic). bf16 weights are rounded to nearest or stochastically.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowmem.kernels._triton import cdiv, jit, tl
from lowmem.kernels.common import decayed_step, store_float

NONE, LINEAR, SIGN = 0, 1, 2  # the residual term: none, k phi_j (G - c B), k sign(G - c B)


@jit
def _tile_offsets(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r[:, None], c[None, :], (r < rows)[:, None] & (c < cols)[None, :]


@jit
def _residual_sumsq_kernel(partial_ptr, g_ptr, b_ptr, phi_ptr, rows, cols, g_s0, g_s1, b_s0, b_s1, c,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile sums of (phi_j (G - c B)_ij)^2 (summed by the launcher in a fixed order: deterministic)."""
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


def _grid(grad_c: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    rows, cols = grad_c.shape
    block_r, block_c = _tiles(grad_c.device)
    return (cdiv(rows, block_r), cdiv(cols, block_c)), block_r, block_c


def residual_norm(grad_c: torch.Tensor, back: torch.Tensor, phi: torch.Tensor, c: float) -> torch.Tensor:
    """||(G - c B) diag(phi)||_F of the canonical gradient G, B and the per-column fp32 `phi`, as a 0-d tensor
    on their device."""
    grid, block_r, block_c = _grid(grad_c)
    partial = torch.empty(grid[0] * grid[1], device=grad_c.device)
    _residual_sumsq_kernel[grid](partial, grad_c, back, phi, *grad_c.shape, *grad_c.stride(), *back.stride(), c,
                                 BLOCK_R=block_r, BLOCK_C=block_c)
    return partial.sum().sqrt()


def epilogue(weight_c: torch.Tensor, grad_c: torch.Tensor, lr: float, decay: float, decay_after: bool,
             update: Optional[torch.Tensor] = None, scale: float = 1.0, k: Optional[torch.Tensor] = None,
             back: Optional[torch.Tensor] = None, c: float = 1.0, phi: Optional[torch.Tensor] = None,
             sign: bool = False, stochastic_rounding: bool = False, seed: int = 0) -> None:
    """Update the canonical weight view `weight_c` (fp32 or bf16) in place by U = scale `update` (fp32, b x a;
    None: no such term) plus, when `k` is given, the residual k phi_j (G - c B)_ij, or k sign(G - c B) with
    `sign` (B = `back`, None: 0; phi None: 1); decay = lr * weight_decay, applied after the step with
    decay_after, else before."""
    if stochastic_rounding and weight_c.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bf16 weights, got {weight_c.dtype}")
    if weight_c.shape != grad_c.shape:
        raise ValueError(f"weight shape {tuple(weight_c.shape)} differs from gradient shape {tuple(grad_c.shape)}")
    mode = NONE if k is None else (SIGN if sign else LINEAR)
    grid, block_r, block_c = _grid(grad_c)
    m = update if update is not None else grad_c  # the slots of absent terms: any tensor, never read
    b = back if back is not None else grad_c
    _epilogue_kernel[grid](
        weight_c, m, grad_c, b, phi if phi is not None else grad_c, k if k is not None else grad_c, *grad_c.shape,
        *weight_c.stride(), *m.stride(), *grad_c.stride(), *b.stride(), scale, c, -lr, 1.0 - decay, seed,
        RESIDUAL=mode, HAS_M=update is not None, HAS_B=back is not None, HAS_PHI=phi is not None,
        DECAY_AFTER=decay_after, STOCHASTIC=stochastic_rounding, BLOCK_R=block_r, BLOCK_C=block_c)
