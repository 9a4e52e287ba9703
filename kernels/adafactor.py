"""Adafactor's factored update of a matrix in three passes over the gradient.

    1. row sums and per-row-block column sums of G^2 + eps1 (one read of G; column partials summed by torch,
       deterministic)
       torch, on the row and column vectors only: R, C moving averages, row factor rsqrt(R / mean R), rsqrt(C)
    2. sum of (r_i c_j G_ij)^2 per tile: the update's RMS, for the clipping divisor max(1, RMS / clip)
    3. U = factor r_i c_j G_ij / clip; with a first moment M = beta1 M + (1 - beta1) U, U = M; written as a fresh
       fp32 direction (the caller applies it and the decay)

The clipping divisor stays on the device (no host sync). Matrices only; the first moment, when given, is an
fp32 or bf16 tensor the last pass updates in place.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from lowmem.kernels._triton import cdiv, jit, tl
from lowmem.kernels.common import store_float


@jit
def _square_sums_kernel(row_sum_ptr, col_part_ptr, g_ptr, rows, cols, g_s0, g_s1, eps1,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (c < cols)[None, :]
        g = tl.load(g_ptr + r[:, None] * g_s0 + c[None, :] * g_s1, mask=mask, other=0.0).to(tl.float32)
        squared = tl.where(mask, g * g + eps1, 0.0)
        acc += tl.sum(squared, axis=1)
        tl.store(col_part_ptr + tl.program_id(0) * cols + c, tl.sum(squared, axis=0), mask=c < cols)
    tl.store(row_sum_ptr + r, acc, mask=row_mask)


@jit
def _factored(g_ptr, rf_ptr, cf_ptr, rows, cols, g_s0, g_s1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile's (r_i c_j) G_ij, its offsets and mask."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    g = tl.load(g_ptr + r[:, None] * g_s0 + c[None, :] * g_s1, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(rf_ptr + r, mask=r < rows, other=0.0)
    cf = tl.load(cf_ptr + c, mask=c < cols, other=0.0)
    return (rf[:, None] * cf[None, :]) * g, r[:, None] * cols + c[None, :], mask


@jit
def _update_sumsq_kernel(partial_ptr, g_ptr, rf_ptr, cf_ptr, rows, cols, g_s0, g_s1,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    u, _, mask = _factored(g_ptr, rf_ptr, cf_ptr, rows, cols, g_s0, g_s1, BLOCK_R, BLOCK_C)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(u * u))


@jit
def _direction_kernel(out_ptr, m_ptr, g_ptr, rf_ptr, cf_ptr, clip_ptr, rows, cols, g_s0, g_s1, factor, beta1, omb1,
                      HAS_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    u, idx, mask = _factored(g_ptr, rf_ptr, cf_ptr, rows, cols, g_s0, g_s1, BLOCK_R, BLOCK_C)
    u = tl.div_rn(u, tl.load(clip_ptr)) * factor
    if HAS_M:
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32) * beta1 + u * omb1
        store_float(m_ptr, idx, m, mask, 0, idx, False)
        u = m
    tl.store(out_ptr + idx, u, mask=mask)


def _tiles(device: torch.device) -> tuple[int, int]:
    """(rows, columns) of a tile: few large ones for the interpreter, 16 x 256 on a GPU (untuned)."""
    return (64, 256) if device.type != "cuda" else (16, 256)


def handles(grad: torch.Tensor) -> bool:
    """Whether the kernels factor this gradient (2-D: a vector's second moment is not factored)."""
    return grad.dim() == 2


def adafactor_direction(grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, beta2: float, eps1: float,
                        clip_threshold: float, factor: float, exp_avg: Optional[torch.Tensor] = None,
                        beta1: float = 0.0) -> torch.Tensor:
    """Update the fp32 row / column statistics (and `exp_avg`, fp32 or bf16, when given) in place from the 2-D
    `grad` and return the Adafactor direction as a fresh fp32 tensor: factor * the clipped factored update, or
    the first moment of it. `factor` is the core's step factor (relative step and parameter scale)."""
    if not handles(grad):
        raise ValueError(f"the Adafactor kernels factor matrices, got shape {tuple(grad.shape)}")
    rows, cols = grad.shape
    block_r, block_c = _tiles(grad.device)
    row_blocks = cdiv(rows, block_r)
    row_sum = torch.empty(rows, device=grad.device)
    col_part = torch.empty(row_blocks, cols, device=grad.device)
    _square_sums_kernel[(row_blocks,)](row_sum, col_part, grad, rows, cols, *grad.stride(), eps1,
                                       BLOCK_R=block_r, BLOCK_C=block_c)
    row.mul_(beta2).add_(row_sum.div_(cols), alpha=1.0 - beta2)
    col.mul_(beta2).add_(col_part.sum(dim=0).div_(rows), alpha=1.0 - beta2)
    row_factor = (row / row.mean()).rsqrt_()
    col_factor = col.rsqrt()
    grid = (row_blocks, cdiv(cols, block_c))
    partial = torch.empty(grid[0] * grid[1], device=grad.device)
    _update_sumsq_kernel[grid](partial, grad, row_factor, col_factor, rows, cols, *grad.stride(),
                               BLOCK_R=block_r, BLOCK_C=block_c)
    clip = (partial.sum().sqrt_() / math.sqrt(grad.numel()) / clip_threshold).clamp_(min=1.0).reshape(1)
    direction = torch.empty(grad.shape, device=grad.device)
    has_m = exp_avg is not None
    if has_m and not exp_avg.is_contiguous():
        raise ValueError("the first moment must be contiguous")
    _direction_kernel[grid](direction, exp_avg if has_m else direction, grad, row_factor, col_factor, clip, rows,
                            cols, *grad.stride(), factor, beta1, 1.0 - beta1, HAS_M=has_m, BLOCK_R=block_r,
                            BLOCK_C=block_c)
    return direction
