"""MicroAdam's dense passes, fused.

    ef_correct       a = g + Q^-1(e): one pass reading the gradient and the 4-bit error feedback (codes two a
                     byte, element 2i in the low nibble; per bucket a bf16 min and max: e = min + code (max -
                     min) / levels)
    ef_quantize_into e = Q(a): per bucket min / max (rounded to bf16), codes, two per byte, in one pass
    window_direction one program per top-k block: zero the block, add each window row's values (scaled by its
                     row weights) into it row after row (indices are block-local, unique within a row; a barrier
                     between rows), then D = c1 m / (sqrt(c2 v) + eps) over the block, written once

The top-k selection between them (torch.topk per block) and the window row's write are the caller's.
ef_quantize_into needs an even bucket (pairs of codes never straddle two buckets).
"""
from __future__ import annotations

import torch

from lowmem.kernels._triton import cdiv, jit, next_power_of_2, tl
from lowmem.kernels.common import offset, round_bf16


@jit
def _ef_correct_kernel(out_ptr, g_ptr, codes_ptr, low_ptr, high_ptr, numel, ncols, g_s0, g_s1, bucket, levels,
                       STRIDED: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    g = tl.load(g_ptr + offset(idx, ncols, g_s0, g_s1, STRIDED), mask=mask, other=0.0).to(tl.float32)
    byte = tl.load(codes_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    code = ((byte >> ((idx % 2) * 4)) & 15).to(tl.float32)
    b = idx // bucket
    low = tl.load(low_ptr + b, mask=mask, other=0.0).to(tl.float32)
    high = tl.load(high_ptr + b, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, g + (low + code * tl.div_rn(high - low, levels)), mask=mask)


@jit
def _ef_quantize_kernel(codes_ptr, low_ptr, high_ptr, x_ptr, numel, num_buckets, levels, HALF: tl.constexpr,
                        PAIRS: tl.constexpr, BUCKETS: tl.constexpr):
    """BUCKETS buckets of 2 HALF elements each (pairs padded to PAIRS, a power of 2)."""
    b = tl.program_id(0) * BUCKETS + tl.arange(0, BUCKETS)
    p = tl.arange(0, PAIRS)
    lo = b[:, None] * (2 * HALF) + 2 * p[None, :]
    lo_mask = (p < HALF)[None, :] & (lo < numel)
    hi_mask = (p < HALF)[None, :] & (lo + 1 < numel)
    x_lo = tl.load(x_ptr + lo, mask=lo_mask, other=0.0)
    x_hi = tl.load(x_ptr + lo + 1, mask=hi_mask, other=0.0)
    low = tl.minimum(tl.min(tl.where(lo_mask, x_lo, float("inf")), axis=1),
                     tl.min(tl.where(hi_mask, x_hi, float("inf")), axis=1))
    high = tl.maximum(tl.max(tl.where(lo_mask, x_lo, -float("inf")), axis=1),
                      tl.max(tl.where(hi_mask, x_hi, -float("inf")), axis=1))
    low_bf16 = round_bf16(low, 0, b, False)
    high_bf16 = round_bf16(high, 0, b, False)
    bucket_mask = b < num_buckets
    tl.store(low_ptr + b, low_bf16, mask=bucket_mask)
    tl.store(high_ptr + b, high_bf16, mask=bucket_mask)
    low_f = low_bf16.to(tl.float32)[:, None]
    unit = tl.maximum(tl.div_rn(high_bf16.to(tl.float32) - low_bf16.to(tl.float32), levels), 1e-30)[:, None]
    c_lo = tl.minimum(tl.maximum(tl.floor(tl.div_rn(x_lo - low_f, unit) + 0.5), 0.0), levels).to(tl.int32)
    c_hi = tl.minimum(tl.maximum(tl.floor(tl.div_rn(x_hi - low_f, unit) + 0.5), 0.0), levels).to(tl.int32)
    packed = c_lo | (tl.where(hi_mask, c_hi, 0) << 4)
    tl.store(codes_ptr + lo // 2, packed.to(tl.uint8), mask=lo_mask)


@jit
def _window_direction_kernel(out_ptr, scratch_ptr, index_ptr, value_ptr, w1_ptr, w2_ptr, rows, width, numel,
                             topk_block, full_blocks, k_full, k_last, c1, c2, eps,
                             K: tl.constexpr, CHUNK: tl.constexpr):
    """Program b: the direction over top-k block b from the window's rows (out holds m, scratch v, meanwhile)."""
    b = tl.program_id(0)
    start = b * topk_block
    length = tl.minimum(topk_block, numel - start)
    col0 = b * k_full
    kept = tl.where(b < full_blocks, k_full, k_last)
    for chunk in range(0, length, CHUNK):
        i = start + chunk + tl.arange(0, CHUNK)
        mask = i < start + length
        tl.store(out_ptr + i, tl.zeros((CHUNK,), tl.float32), mask=mask)
        tl.store(scratch_ptr + i, tl.zeros((CHUNK,), tl.float32), mask=mask)
    tl.debug_barrier()
    j = tl.arange(0, K)
    in_block = j < kept
    for r in range(rows):  # row after row: an index may recur in another row, never within one
        local = tl.load(index_ptr + r * width + col0 + j, mask=in_block, other=0).to(tl.int32)
        value = tl.load(value_ptr + r * width + col0 + j, mask=in_block, other=0.0).to(tl.float32)
        target = start + local
        m = tl.load(out_ptr + target, mask=in_block, other=0.0, cache_modifier=".cg")
        v = tl.load(scratch_ptr + target, mask=in_block, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + target, m + value * tl.load(w1_ptr + r), mask=in_block)
        tl.store(scratch_ptr + target, v + value * value * tl.load(w2_ptr + r), mask=in_block)
        tl.debug_barrier()
    for chunk in range(0, length, CHUNK):
        i = start + chunk + tl.arange(0, CHUNK)
        mask = i < start + length
        m = tl.load(out_ptr + i, mask=mask, other=0.0, cache_modifier=".cg")
        v = tl.load(scratch_ptr + i, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + i, tl.div_rn(m * c1, tl.sqrt_rn(v * c2) + eps), mask=mask)


def _tiles(device: torch.device) -> int:
    """Elements a program: many for the interpreter, 1024 on a GPU (untuned)."""
    return 16384 if device.type != "cuda" else 1024


def ef_correct(grad: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bucket: int,
               levels: int) -> torch.Tensor:
    """Flat fp32 g + Q^-1(e): the gradient (any shape; 2-D read with its strides) plus the decoded error
    feedback of `bucket` elements per min / max."""
    numel = grad.numel()
    if grad.dim() == 2:
        ncols, s0, s1 = grad.shape[1], *grad.stride()
    else:
        grad = grad.reshape(-1)
        ncols, s0, s1 = numel, 0, grad.stride(0)
    out = torch.empty(numel, device=grad.device)
    block = _tiles(grad.device)
    _ef_correct_kernel[(cdiv(numel, block),)](out, grad, codes, low, high, numel, ncols, s0, s1, bucket,
                                              float(levels), STRIDED=not grad.is_contiguous(), BLOCK=block)
    return out


def ef_quantize_into(values: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bucket: int,
                     levels: int) -> None:
    """Quantize the flat fp32 `values` into the existing codes and bf16 min / max tensors: per even-sized
    bucket, code = floor((x - min) / u + 1/2) clamped to [0, levels], u = max((max - min) / levels, 1e-30)."""
    if bucket % 2:
        raise ValueError(f"the fused error-feedback quantizer takes even buckets, got {bucket}")
    numel = values.numel()
    num_buckets = cdiv(numel, bucket)
    pairs = next_power_of_2(bucket // 2)
    buckets = max(1, _tiles(values.device) * 2 // (2 * pairs))  # powers of 2: about 2 blocks of elements
    _ef_quantize_kernel[(cdiv(num_buckets, buckets),)](codes, low, high, values, numel, num_buckets, float(levels),
                                                       HALF=bucket // 2, PAIRS=pairs, BUCKETS=buckets)


def window_direction(indices: torch.Tensor, values: torch.Tensor, rows: int, first_weights: torch.Tensor,
                     second_weights: torch.Tensor, numel: int, topk_block: int, full_blocks: int, k_full: int,
                     k_last: int, c1: float, c2: float, eps: float) -> torch.Tensor:
    """c1 m / (sqrt(c2 v) + eps) as a fresh flat fp32 direction of `numel` elements, m and v the sums over the
    first `rows` window rows r of first_weights[r] V_r and second_weights[r] V_r^2 (zero where no row holds an
    entry). `indices` (int16, block-local) and `values` are the window (rows x width): top-k block b, of
    `topk_block` elements, owns k_full columns from b * k_full (the last, partial block k_last)."""
    device = values.device
    width = values.shape[1]
    out = torch.empty(numel, device=device)
    scratch = torch.empty(numel, device=device)
    _window_direction_kernel[(cdiv(numel, topk_block),)](
        out, scratch, indices, values, first_weights, second_weights, rows, width, numel, topk_block,
        full_blocks, k_full, k_last, c1, c2, eps, K=next_power_of_2(max(k_full, k_last)),
        CHUNK=min(next_power_of_2(topk_block), _tiles(device)))
    return out
