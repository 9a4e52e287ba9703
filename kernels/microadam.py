"""MicroAdam's update (lowmem.optim.parts.microadam.MicroAdamCore.step) with its dense passes fused.

    ef_correct       a = g + Q^-1(e): one pass reading the gradient and the 4-bit error feedback
    top-k            torch.topk per block of the corrected gradient (a library primitive, like the matmuls of the
                     projected update); the window row and the zeroing of the chosen entries touch k_init of the
                     elements (1%), in torch
    ef_quantize      e = Q(a): per bucket min / max (rounded to bf16), codes, two per byte, in one pass
    window_direction one program per top-k block: zero the block, add each window row's values (scaled by
                     beta^age) into it row after row (indices are unique within a row; a barrier between rows),
                     then D = c1 m / (sqrt(c2 v) + eps) over the block, written once

The state tensors are the core's (window_indices int16 block-local, window_values bf16 / fp32, ef_codes
packed, ef_min / ef_max bf16), so the two paths read each other's state. ef_quantize needs an even bucket
(pairs of codes never straddle two buckets); an odd `ef_block` uses the reference's `ef_quantize`.
"""
from __future__ import annotations

import torch

from lowmem.kernels._triton import cdiv, jit, next_power_of_2, tl
from lowmem.kernels.common import offset, round_bf16
from lowmem.optim.parts.cores import CoreContext
from lowmem.optim.parts.microadam import (
    EF_LEVELS,
    MicroAdamCore,
    block_starts,
    blockwise_topk,
    ef_quantize,
    topk_layout,
)
from lowmem.optim.state.storage import StoragePolicy


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


def ef_correct(grad: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
               bucket: int) -> torch.Tensor:
    """Flat fp32 g + Q^-1(e) (lowmem.optim.parts.microadam.ef_dequantize added to the gradient)."""
    numel = grad.numel()
    if grad.dim() == 2:
        ncols, s0, s1 = grad.shape[1], *grad.stride()
    else:
        grad = grad.reshape(-1)
        ncols, s0, s1 = numel, 0, grad.stride(0)
    out = torch.empty(numel, device=grad.device)
    block = _tiles(grad.device)
    _ef_correct_kernel[(cdiv(numel, block),)](out, grad, codes, low, high, numel, ncols, s0, s1, bucket,
                                              float(EF_LEVELS), STRIDED=not grad.is_contiguous(), BLOCK=block)
    return out


def ef_quantize_into(values: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                     bucket: int) -> None:
    """`microadam.ef_quantize(values, bucket)` written into the existing code and min / max tensors."""
    if bucket % 2:
        for stored, new in zip((codes, low, high), ef_quantize(values, bucket)):
            stored.copy_(new)
        return
    numel = values.numel()
    num_buckets = cdiv(numel, bucket)
    pairs = next_power_of_2(bucket // 2)
    buckets = max(1, _tiles(values.device) * 2 // (2 * pairs))  # powers of 2: about 2 blocks of elements
    _ef_quantize_kernel[(cdiv(num_buckets, buckets),)](codes, low, high, values, numel, num_buckets,
                                                       float(EF_LEVELS), HALF=bucket // 2, PAIRS=pairs,
                                                       BUCKETS=buckets)


def window_direction(state: dict, step: int, window: int, numel: int, topk_block: int, k_init: float,
                     beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """`microadam_math` over the window's valid rows, as a fresh flat fp32 direction."""
    device = state["window_values"].device
    rows = min(step, window)
    ages = (step - 1 - torch.arange(rows, device=device)) % window
    w1 = beta1 ** ages.float()
    w2 = beta2 ** ages.float()
    full, k_full, k_last = topk_layout(numel, topk_block, k_init)
    width = state["window_values"].shape[1]
    out = torch.empty(numel, device=device)
    scratch = torch.empty(numel, device=device)
    c1 = (1.0 - beta1) / (1.0 - beta1 ** step)
    c2 = (1.0 - beta2) / (1.0 - beta2 ** step)
    _window_direction_kernel[(cdiv(numel, topk_block),)](
        out, scratch, state["window_indices"], state["window_values"], w1, w2, rows, width, numel, topk_block,
        full, k_full, k_last, c1, c2, eps, K=next_power_of_2(max(k_full, k_last)),
        CHUNK=min(next_power_of_2(topk_block), _tiles(device)))
    return out


def microadam_direction(grad: torch.Tensor, state: dict, options, beta1: float, beta2: float,
                        eps: float) -> torch.Tensor:
    """One MicroAdamCore update on an initialized `state` (options: window, k_init, topk_block, ef_block): the
    window row, the error feedback and the counters change as the core changes them; returns the direction in
    grad's shape (fresh fp32)."""
    o = options
    numel = grad.numel()
    state["micro_step"] += 1
    step = state["micro_step"]
    corrected = ef_correct(grad, state["ef_codes"], state["ef_min"], state["ef_max"], o.ef_block)
    chosen = blockwise_topk(corrected, o.topk_block, o.k_init)
    starts = block_starts(numel, o.topk_block, o.k_init, grad.device)
    row = state["window_row"]
    state["window_indices"][row] = (chosen - starts).to(torch.int16)
    state["window_values"][row] = corrected[chosen].to(state["window_values"].dtype)
    state["window_row"] = (row + 1) % o.window
    corrected[chosen] = 0.0
    ef_quantize_into(corrected, state["ef_codes"], state["ef_min"], state["ef_max"], o.ef_block)
    direction = window_direction(state, step, o.window, numel, o.topk_block, o.k_init, beta1, beta2, eps)
    return direction.view(grad.shape)


def reference_microadam_direction(grad: torch.Tensor, state: dict, options, beta1: float, beta2: float,
                                  eps: float) -> torch.Tensor:
    """The core's own step."""
    core = MicroAdamCore(options, StoragePolicy("fp32"))
    group = {"betas": (beta1, beta2), "eps": eps}
    return core.step(grad, state, group, CoreContext(grad)).direction

