"""Fused Adam: one pass over memory for the moments in any format, with the weight update or the direction as
its output.

Per element, in fp32 registers: load the gradient and both moments (`Moments`: fp32, bf16, or blockwise 8-bit /
4-bit codes with one fp32 absmax per block), run Adam's element-wise math, store the moments back in their
format (new absmax per block, nearest code), then either

    adam_direction  write the bias-corrected direction D (a projected core: the caller back-projects it), or
    adam_update     update the weight in place, W -= lr D with decoupled decay before or after (W keep - lr D,
                    or (W - lr D) keep), fp32 or bf16 weights (bf16 rounded to nearest, or stochastically).

Encoding: x times the reciprocal of max(absmax, scale floor), clamped to [-1, 1]; the code is the number of map
midpoints below it (torch.bucketize's). A tile holds ROWS quantization blocks (4-bit codes as byte pairs:
element 2i in the low nibble). The kernels read and write the caller's tensors in place and nothing else, so
whoever keeps the moments keeps them in one format for both paths.

`adam_update_multi` / `adam_direction_multi` run many tensors in one launch per kind (moment format x weight
dtype x gradient dtype): a table of base addresses per tensor and each tensor's first program; a program finds
its tensor by binary search over those starts.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from lowmem.kernels._triton import cdiv, jit, tl
from lowmem.kernels.common import decayed_step, offset, store_float

# constexpr codes of the moments' format and of what the kernel writes
FP32, BF16, INT8, INT4 = 0, 1, 2, 3
DIRECTION, DECAY_BEFORE, DECAY_AFTER = 0, 1, 2
PLAIN_TILE = 256  # elements per tile row for fp32 / bf16 states (quantized states use their block)
MAX_NUMEL = 2 ** 31  # int32 offsets


# ---------------------------------------------------------------------------------------------------------
# Kernels


@jit
def _encode(x, mid_ptr, BITS: tl.constexpr):
    """Codes of normalized values: how many map midpoints lie below x (the table is padded with +inf to 2^BITS)."""
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        step = 1 << (BITS - 1 - i)
        below = tl.load(mid_ptr + code + (step - 1)) < x
        code = tl.where(below, code + step, code)
    return code


@jit
def _floored_scales(scale_ptr, rows, row_mask, FLOOR: tl.constexpr):
    """The blocks' stored scales, floored at FLOOR (decode floors them as encode does), one per row of the tile."""
    return tl.maximum(tl.load(scale_ptr + rows, mask=row_mask, other=0.0), FLOOR)[:, None]


@jit
def _normalize(x, absmax, FLOOR: tl.constexpr):
    """x times the reciprocal of the floored block absmax, clamped to [-1, 1]: the value the codes encode."""
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, FLOOR))
    return tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)


@jit
def _spam_clip(g, v, theta, CLIP: tl.constexpr):
    """SPAM's spike clipping against the second moment before this update: entries with g^2 > theta V become
    sign(g) sqrt(theta V)."""
    if CLIP:
        limit = v * theta
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        g = tl.where(g * g > limit, sign * tl.sqrt_rn(limit), g)
    return g


@jit
def _adam_math(g, m, v, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, EPS_SCALED: tl.constexpr):
    """Adam's math, element-wise: new moments and the bias-corrected direction (adam_direction's conventions)."""
    m = m * beta1 + g * omb1
    v = v * beta2 + omb2 * g * g
    if EPS_SCALED:
        d = tl.div_rn(tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps), bias1)
    else:
        d = tl.div_rn(m, tl.sqrt_rn(v) + eps) * corr
    return m, v, d


@jit
def _write(out_ptr, idx, mask, d, ncols, o_s0, o_s1, neg_lr, keep, seed,
           WRITE: tl.constexpr, STRIDED: tl.constexpr, STOCHASTIC: tl.constexpr):
    if WRITE == 0:  # DIRECTION: a fresh contiguous fp32 tensor
        tl.store(out_ptr + idx, d, mask=mask)
    else:
        off = offset(idx, ncols, o_s0, o_s1, STRIDED)
        p = tl.load(out_ptr + off, mask=mask, other=0.0).to(tl.float32)
        store_float(out_ptr, off, decayed_step(p, d, neg_lr, keep, WRITE == 2), mask, seed, idx, STOCHASTIC)


@jit
def _adam_tile(block0, numel, out_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, m_map, m_mid, v_map, v_mid,
               ncols, g_s0, g_s1, o_s0, o_s1, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr,
               neg_lr, keep, seed, theta, STATE: tl.constexpr, WRITE: tl.constexpr, EPS_SCALED: tl.constexpr,
               STRIDED: tl.constexpr, STOCHASTIC: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
               CLIP: tl.constexpr, FLOOR: tl.constexpr):
    """ROWS consecutive blocks of QBLOCK elements, starting at block `block0`; CLIP: SPAM's clip first; FLOOR:
    the least scale a quantized block is encoded and decoded with (a block of zeros divides by it)."""
    rows = block0 + tl.arange(0, ROWS)
    row_mask = rows * QBLOCK < numel
    if STATE == 3:  # INT4: byte pairs, element 2i in the low nibble
        pairs = tl.arange(0, QBLOCK // 2)
        lo = rows[:, None] * QBLOCK + 2 * pairs[None, :]
        hi = lo + 1
        lo_mask = lo < numel
        hi_mask = hi < numel
        byte = lo // 2
        m_bytes = tl.load(m_ptr + byte, mask=lo_mask, other=0).to(tl.int32)
        v_bytes = tl.load(v_ptr + byte, mask=lo_mask, other=0).to(tl.int32)
        m_scale = _floored_scales(m_scale_ptr, rows, row_mask, FLOOR)
        v_scale = _floored_scales(v_scale_ptr, rows, row_mask, FLOOR)
        g_lo = tl.load(g_ptr + offset(lo, ncols, g_s0, g_s1, STRIDED), mask=lo_mask, other=0.0).to(tl.float32)
        g_hi = tl.load(g_ptr + offset(hi, ncols, g_s0, g_s1, STRIDED), mask=hi_mask, other=0.0).to(tl.float32)
        v_lo = tl.load(v_map + (v_bytes & 15)) * v_scale
        v_hi = tl.load(v_map + (v_bytes >> 4)) * v_scale
        m_lo, v_lo, d_lo = _adam_math(_spam_clip(g_lo, v_lo, theta, CLIP), tl.load(m_map + (m_bytes & 15)) * m_scale,
                                      v_lo, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, EPS_SCALED)
        m_hi, v_hi, d_hi = _adam_math(_spam_clip(g_hi, v_hi, theta, CLIP), tl.load(m_map + (m_bytes >> 4)) * m_scale,
                                      v_hi, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, EPS_SCALED)
        m_lo = tl.where(lo_mask, m_lo, 0.0)
        m_hi = tl.where(hi_mask, m_hi, 0.0)
        v_lo = tl.where(lo_mask, v_lo, 0.0)
        v_hi = tl.where(hi_mask, v_hi, 0.0)
        m_absmax = tl.maximum(tl.max(tl.abs(m_lo), axis=1), tl.max(tl.abs(m_hi), axis=1))
        v_absmax = tl.maximum(tl.max(tl.abs(v_lo), axis=1), tl.max(tl.abs(v_hi), axis=1))
        m_codes = _encode(_normalize(m_lo, m_absmax, FLOOR), m_mid, 4)
        m_codes |= tl.where(hi_mask, _encode(_normalize(m_hi, m_absmax, FLOOR), m_mid, 4), 0) << 4
        v_codes = _encode(_normalize(v_lo, v_absmax, FLOOR), v_mid, 4)
        v_codes |= tl.where(hi_mask, _encode(_normalize(v_hi, v_absmax, FLOOR), v_mid, 4), 0) << 4
        tl.store(m_ptr + byte, m_codes.to(tl.uint8), mask=lo_mask)
        tl.store(v_ptr + byte, v_codes.to(tl.uint8), mask=lo_mask)
        tl.store(m_scale_ptr + rows, m_absmax, mask=row_mask)
        tl.store(v_scale_ptr + rows, v_absmax, mask=row_mask)
        _write(out_ptr, lo, lo_mask, d_lo, ncols, o_s0, o_s1, neg_lr, keep, seed, WRITE, STRIDED, STOCHASTIC)
        _write(out_ptr, hi, hi_mask, d_hi, ncols, o_s0, o_s1, neg_lr, keep, seed, WRITE, STRIDED, STOCHASTIC)
    else:
        idx = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        mask = idx < numel
        g = tl.load(g_ptr + offset(idx, ncols, g_s0, g_s1, STRIDED), mask=mask, other=0.0).to(tl.float32)
        if STATE == 2:  # INT8
            m_scale = _floored_scales(m_scale_ptr, rows, row_mask, FLOOR)
            v_scale = _floored_scales(v_scale_ptr, rows, row_mask, FLOOR)
            m = tl.load(m_map + tl.load(m_ptr + idx, mask=mask, other=0).to(tl.int32)) * m_scale
            v = tl.load(v_map + tl.load(v_ptr + idx, mask=mask, other=0).to(tl.int32)) * v_scale
        else:
            m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = _spam_clip(g, v, theta, CLIP)
        m, v, d = _adam_math(g, m, v, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, EPS_SCALED)
        if STATE == 2:
            m = tl.where(mask, m, 0.0)
            v = tl.where(mask, v, 0.0)
            m_absmax = tl.max(tl.abs(m), axis=1)
            v_absmax = tl.max(tl.abs(v), axis=1)
            tl.store(m_ptr + idx, _encode(_normalize(m, m_absmax, FLOOR), m_mid, 8).to(tl.uint8), mask=mask)
            tl.store(v_ptr + idx, _encode(_normalize(v, v_absmax, FLOOR), v_mid, 8).to(tl.uint8), mask=mask)
            tl.store(m_scale_ptr + rows, m_absmax, mask=row_mask)
            tl.store(v_scale_ptr + rows, v_absmax, mask=row_mask)
        else:
            store_float(m_ptr, idx, m, mask, seed, idx, False)
            store_float(v_ptr, idx, v, mask, seed, idx, False)
        _write(out_ptr, idx, mask, d, ncols, o_s0, o_s1, neg_lr, keep, seed, WRITE, STRIDED, STOCHASTIC)


@jit
def _adam_kernel(out_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, m_map, m_mid, v_map, v_mid,
                 numel, ncols, g_s0, g_s1, o_s0, o_s1, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr,
                 neg_lr, keep, seed, theta, STATE: tl.constexpr, WRITE: tl.constexpr, EPS_SCALED: tl.constexpr,
                 STRIDED: tl.constexpr, STOCHASTIC: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
                 CLIP: tl.constexpr, FLOOR: tl.constexpr):
    _adam_tile(tl.program_id(0) * ROWS, numel, out_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr,
               m_map, m_mid, v_map, v_mid, ncols, g_s0, g_s1, o_s0, o_s1, beta1, omb1, beta2, omb2, eps,
               bias1, bias2_sqrt, corr, neg_lr, keep, seed, theta, STATE, WRITE, EPS_SCALED, STRIDED, STOCHASTIC,
               QBLOCK, ROWS, CLIP, FLOOR)


@jit
def _pointer(table_ptr, DTYPE: tl.constexpr):
    return tl.load(table_ptr).to(tl.pointer_type(DTYPE))


@jit
def _adam_multi_kernel(addr_ptr, numel_ptr, starts_ptr, hyper_ptr, seed_ptr, num_tensors, m_map, m_mid, v_map, v_mid,
                       beta1, omb1, beta2, omb2, eps, STATE: tl.constexpr, WRITE: tl.constexpr,
                       EPS_SCALED: tl.constexpr, STOCHASTIC: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
                       SEARCH: tl.constexpr, FLOOR: tl.constexpr):
    """Many contiguous tensors of one kind: addr_ptr holds 6 addresses per tensor (out, grad, m, v, m absmax,
    v absmax), hyper_ptr 5 fp32 per tensor (bias1, bias2_sqrt, corr, -lr, 1 - decay), starts_ptr each
    tensor's first program (num_tensors + 1 entries)."""
    pid = tl.program_id(0)
    t = 0
    for i in tl.static_range(SEARCH):  # the last tensor whose first program is <= pid
        probe = t + (1 << (SEARCH - 1 - i))
        start = tl.load(starts_ptr + probe, mask=probe < num_tensors, other=pid + 1)
        t = tl.where(start <= pid, probe, t)
    block0 = (pid - tl.load(starts_ptr + t)) * ROWS
    row = addr_ptr + t * 6
    hyper = hyper_ptr + t * 5
    numel = tl.load(numel_ptr + t)
    _adam_tile(block0, numel, _pointer(row, OUT_DTYPE), _pointer(row + 1, G_DTYPE), _pointer(row + 2, S_DTYPE),
               _pointer(row + 3, S_DTYPE), _pointer(row + 4, tl.float32), _pointer(row + 5, tl.float32),
               m_map, m_mid, v_map, v_mid, numel, 0, 1, 0, 1, beta1, omb1, beta2, omb2, eps,
               tl.load(hyper), tl.load(hyper + 1), tl.load(hyper + 2), tl.load(hyper + 3), tl.load(hyper + 4),
               tl.load(seed_ptr + t), 0.0, STATE, WRITE, EPS_SCALED, False, STOCHASTIC, QBLOCK, ROWS, False,
               FLOOR)


# ---------------------------------------------------------------------------------------------------------
# Launchers


class Moments(NamedTuple):
    """One tensor's Adam moments as the kernels read and write them, in place: fp32 or bf16 values in the
    gradient's shape (bits 0), or blockwise codes, flat uint8 (bits 8; bits 4: two codes a byte), with one fp32
    absmax per `block` elements. A code c decodes to map[c] * max(absmax, scale_floor); each map is (values,
    midpoints padded with +inf to 2^bits entries), signed for the first moment and unsigned for the second."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    bits: int = 0
    block: int = PLAIN_TILE
    exp_avg_absmax: Optional[torch.Tensor] = None
    exp_avg_sq_absmax: Optional[torch.Tensor] = None
    signed_map: tuple[torch.Tensor, ...] = ()
    unsigned_map: tuple[torch.Tensor, ...] = ()
    scale_floor: float = 0.0

    @property
    def code(self) -> int:
        if self.bits:
            return INT8 if self.bits == 8 else INT4
        return BF16 if self.exp_avg.dtype == torch.bfloat16 else FP32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(m, v, m absmax, v absmax): the absmax slots repeat m / v for values (never read)."""
        if not self.bits:
            return self.exp_avg, self.exp_avg_sq, self.exp_avg, self.exp_avg_sq
        if self.exp_avg_absmax is None or self.exp_avg_sq_absmax is None:
            raise ValueError("quantized moments need one absmax per block for each moment")
        return self.exp_avg, self.exp_avg_sq, self.exp_avg_absmax, self.exp_avg_sq_absmax

    def maps(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if not self.bits:
            dummy = torch.empty(1, device=device)
            return dummy, dummy, dummy, dummy
        return (*self.signed_map, *self.unsigned_map)


def _tiles(device: torch.device, state: int) -> int:
    """Tile rows per program: the interpreter pays ~1 ms a program besides its numpy work (a few large
    programs); a GPU wants 1-2K elements a program (untuned: no GPU was at hand)."""
    if device.type != "cuda":
        return 16
    return 4 if state == INT8 else 8


def _layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(columns, row stride, column stride) of a tensor read in row-major order (1-D: one row)."""
    if t.dim() == 2:
        return t.shape[1], t.stride(0), t.stride(1)
    if t.dim() <= 1:
        return t.numel(), 0, t.stride(0) if t.dim() else 1
    if not t.is_contiguous():
        raise ValueError(f"the fused Adam kernels take 1-D, 2-D or contiguous tensors, got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")
    return t.numel(), 0, 1


def _scalars(step: int, beta1: float, beta2: float) -> tuple[float, float, float]:
    """(1 - b1^t, sqrt(1 - b2^t), sqrt(1 - b2^t) / (1 - b1^t)), in double as Adam's torch math computes them."""
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    return bias1, bias2_sqrt, bias2_sqrt / bias1


def _launch(out: torch.Tensor, grad: torch.Tensor, moments: Moments, write: int, step: int, beta1: float,
            beta2: float, eps: float, eps_scaled: bool, lr: float, decay: float, stochastic_rounding: bool,
            seed: int, clip: Optional[float] = None) -> None:
    numel = grad.numel()
    if numel >= MAX_NUMEL:
        raise ValueError(f"the fused Adam kernels index with int32: {numel} elements is too many")
    if out.shape != grad.shape:
        raise ValueError(f"weight shape {tuple(out.shape)} differs from gradient shape {tuple(grad.shape)}")
    ncols, g_s0, g_s1 = _layout(grad)
    _, o_s0, o_s1 = _layout(out)
    strided = not (grad.is_contiguous() and out.is_contiguous())
    kind = moments.code
    rows = _tiles(grad.device, kind)
    bias1, bias2_sqrt, corr = _scalars(step, beta1, beta2)
    grid = (cdiv(cdiv(numel, moments.block), rows),)
    _adam_kernel[grid](out, grad, *moments.tensors(), *moments.maps(grad.device),
                       numel, ncols, g_s0, g_s1, o_s0, o_s1, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                       bias1, bias2_sqrt, corr, -lr, 1.0 - decay, seed, clip or 0.0, STATE=kind, WRITE=write,
                       EPS_SCALED=eps_scaled, STRIDED=strided, STOCHASTIC=stochastic_rounding, QBLOCK=moments.block,
                       ROWS=rows, CLIP=clip is not None, FLOOR=moments.scale_floor)


def adam_direction(grad: torch.Tensor, moments: Moments, step: int, beta1: float, beta2: float, eps: float,
                   eps_scaled: bool, clip: Optional[float] = None) -> torch.Tensor:
    """Update `moments` in place with `grad` and return the bias-corrected direction as a fresh fp32 tensor of
    grad's shape; `step` counts this update (1 first). eps_scaled: torch's (m / (1-b1^t)) / (sqrt(v) /
    sqrt(1-b2^t) + eps), else GaLore's sqrt(1-b2^t) / (1-b1^t) * m / (sqrt(v) + eps). clip: SPAM's theta, the
    gradient clipped against the stored second moment first (g^2 > theta V becomes sign(g) sqrt(theta V))."""
    direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    _launch(direction, grad, moments, DIRECTION, step, beta1, beta2, eps, eps_scaled, 0.0, 0.0, False, 0, clip)
    return direction


def adam_update(param: torch.Tensor, grad: torch.Tensor, moments: Moments, step: int, lr: float, beta1: float,
                beta2: float, eps: float, eps_scaled: bool, decay: float = 0.0, decay_after: bool = False,
                stochastic_rounding: bool = False, seed: int = 0, clip: Optional[float] = None) -> None:
    """Update the moments and the fp32 or bf16 weight `param` in place: W -= lr * D, with the weight multiplied
    by (1 - decay) before the step (torch's convention) or after it (decay_after: GaLore's); decay is
    lr * weight_decay. bf16 weights round to nearest, or stochastically (seeded by `seed`). eps_scaled and
    clip: as in adam_direction."""
    if stochastic_rounding and param.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bf16 weights, got {param.dtype}")
    write = DECAY_AFTER if decay_after else DECAY_BEFORE
    _launch(param, grad, moments, write, step, beta1, beta2, eps, eps_scaled, lr, decay, stochastic_rounding,
            seed, clip)


# ---------------------------------------------------------------------------------------------------------
# Many tensors in one launch


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.uint8: "uint8"}


def _multi(outs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], moments: Sequence[Moments],
           steps: Sequence[int], write: int, lrs: Sequence[float], decays: Sequence[float], beta1: float,
           beta2: float, eps: float, eps_scaled: bool, stochastic_rounding: bool, seeds: Sequence[int]) -> None:
    """One launch per kind (moment format, output dtype, gradient dtype); each kind's tensors in one table."""
    kinds: dict[tuple, list[int]] = {}
    for i, (out, grad, m) in enumerate(zip(outs, grads, moments)):
        if not (out.is_contiguous() and grad.is_contiguous()):
            raise ValueError(f"tensor {i}: the multi-tensor launch takes contiguous tensors (use adam_update)")
        if out.shape != grad.shape or grad.numel() >= MAX_NUMEL:
            raise ValueError(f"tensor {i}: shape {tuple(out.shape)} vs {tuple(grad.shape)} (at most 2^31 elements)")
        kinds.setdefault((m.code, m.block, m.exp_avg.dtype, out.dtype, grad.dtype), []).append(i)
    for (kind, qblock, state_dtype, out_dtype, grad_dtype), members in kinds.items():
        first = moments[members[0]]
        device = grads[members[0]].device
        rows = _tiles(device, kind)
        addresses, numels, starts, hyper = [], [], [0], []
        for i in members:
            addresses += [outs[i].data_ptr(), grads[i].data_ptr(), *(t.data_ptr() for t in moments[i].tensors())]
            numels.append(grads[i].numel())
            starts.append(starts[-1] + cdiv(cdiv(grads[i].numel(), qblock), rows))
            hyper += [*_scalars(steps[i], beta1, beta2), -lrs[i], 1.0 - decays[i]]
        table = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
        numel_t = torch.tensor(numels, dtype=torch.int32).to(device, non_blocking=True)
        starts_t = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        hyper_t = torch.tensor(hyper, dtype=torch.float32).to(device, non_blocking=True)
        seed_t = torch.tensor([seeds[i] for i in members], dtype=torch.int32).to(device, non_blocking=True)
        _adam_multi_kernel[(starts[-1],)](
            table, numel_t, starts_t, hyper_t, seed_t, len(members), *first.maps(device),
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, STATE=kind, WRITE=write, EPS_SCALED=eps_scaled,
            STOCHASTIC=stochastic_rounding, OUT_DTYPE=getattr(tl, _TL_DTYPES[out_dtype]),
            G_DTYPE=getattr(tl, _TL_DTYPES[grad_dtype]), S_DTYPE=getattr(tl, _TL_DTYPES[state_dtype]),
            QBLOCK=qblock, ROWS=rows, SEARCH=max(1, (len(members) - 1).bit_length()), FLOOR=first.scale_floor)


def adam_direction_multi(grads: Sequence[torch.Tensor], moments: Sequence[Moments], steps: Sequence[int],
                         beta1: float, beta2: float, eps: float, eps_scaled: bool) -> list[torch.Tensor]:
    """`adam_direction` for many tensors, one launch per kind: the directions, in order. Tensors of one
    quantized kind share the first one's maps and scale floor."""
    directions = [torch.empty(g.shape, dtype=torch.float32, device=g.device) for g in grads]
    zeros = [0.0] * len(grads)
    _multi(directions, grads, moments, steps, DIRECTION, zeros, zeros, beta1, beta2, eps, eps_scaled, False,
           [0] * len(grads))
    return directions


def adam_update_multi(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], moments: Sequence[Moments],
                      steps: Sequence[int], lrs: Sequence[float], decays: Sequence[float], beta1: float,
                      beta2: float, eps: float, eps_scaled: bool, decay_after: bool = False,
                      stochastic_rounding: bool = False, seeds: Optional[Sequence[int]] = None) -> None:
    """`adam_update` for many weights, one launch per kind; per-weight step counts, lr and decay."""
    seeds = seeds if seeds is not None else [0] * len(params)
    _multi(params, grads, moments, steps, DECAY_AFTER if decay_after else DECAY_BEFORE, lrs, decays, beta1, beta2,
           eps, eps_scaled, stochastic_rounding, seeds)
