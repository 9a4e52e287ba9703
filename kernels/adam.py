"""Fused Adam: one pass over memory for the moments in any state storage, with the weight update or the
direction as its output.

Per element, in fp32 registers: load the gradient and both moments (fp32, bf16, or blockwise int8 / int4 codes
with one fp32 absmax per block, `lowmem.optim.state.storage`), run `lowmem.optim.parts.cores.adam_math`, store the moments
back in their format (new absmax per block, nearest code), then either

    adam_direction  write the bias-corrected direction D (a projected core: the caller back-projects it), or
    adam_update     update the weight in place, W -= lr D with decoupled decay before or after (the pipeline's
                    Adam conventions), fp32 or bf16 weights (bf16 rounded to nearest, or stochastically).

Quantization reproduces `lowmem.optim.state.quantization.quantize`: x times the reciprocal of max(absmax, SCALE_FLOOR),
clamped to [-1, 1], and the code is the number of map midpoints below it (torch.bucketize). A tile holds ROWS
quantization blocks (256 for int8, 128 for int4 as byte pairs: element 2i in the low nibble). State tensors
are exactly the storage's, so a checkpoint written by either path is read by the other. Not fused: the
rank-1 int4 second moment (its scale needs the whole matrix: `handles` says so, and callers use the reference).

`adam_update_multi` / `adam_direction_multi` run many tensors in one launch per kind (storage x weight dtype x
gradient dtype): a table of base addresses per tensor and each tensor's first program; a program finds its
tensor by binary search over those starts. `foreach_adam_direction` is the reference path's batched form.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from lowmem.kernels._triton import cdiv, jit, tl
from lowmem.kernels.common import decayed_step, offset, store_float
from lowmem.optim.parts.cores import ADAM_CONVENTIONS, FIRST, SECOND, adam_math
from lowmem.optim.state import quantization as q
from lowmem.optim.state.storage import QUANT_BLOCKS, QuantizedStorage, Storage

# constexpr codes of the state storage and of what the kernel writes
FP32, BF16, INT8, INT4 = 0, 1, 2, 3
STATE_CODES = {"fp32": FP32, "bf16": BF16, "int8": INT8, "int4": INT4}
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


# quantization.SCALE_FLOOR: encode and decode floor a block's scale alike (a block of zeros divides by it)
SCALE_FLOOR = tl.constexpr(q.SCALE_FLOOR)


@jit
def _floored_scales(scale_ptr, rows, row_mask):
    """The blocks' stored scales, floored as `quantization.dequantize` floors them, one per row of the tile."""
    return tl.maximum(tl.load(scale_ptr + rows, mask=row_mask, other=0.0), SCALE_FLOOR)[:, None]


@jit
def _normalize(x, absmax):
    """x times the reciprocal of the floored block absmax, clamped: `quantization.quantize` before the codes."""
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, SCALE_FLOOR))
    return tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)


@jit
def _spam_clip(g, v, theta, CLIP: tl.constexpr):
    """SPAM's spike clipping against the second moment before this update (`transforms.SpamClip`): entries with
    g^2 > theta V become sign(g) sqrt(theta V)."""
    if CLIP:
        limit = v * theta
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        g = tl.where(g * g > limit, sign * tl.sqrt_rn(limit), g)
    return g


@jit
def _adam_math(g, m, v, beta1, omb1, beta2, omb2, eps, bias1, bias2_sqrt, corr, EPS_SCALED: tl.constexpr):
    """`cores.adam_math` element-wise: new moments and the bias-corrected direction."""
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
               CLIP: tl.constexpr):
    """ROWS consecutive blocks of QBLOCK elements, starting at block `block0`; CLIP: SPAM's clip first."""
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
        m_scale = _floored_scales(m_scale_ptr, rows, row_mask)
        v_scale = _floored_scales(v_scale_ptr, rows, row_mask)
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
        m_codes = _encode(_normalize(m_lo, m_absmax), m_mid, 4)
        m_codes |= tl.where(hi_mask, _encode(_normalize(m_hi, m_absmax), m_mid, 4), 0) << 4
        v_codes = _encode(_normalize(v_lo, v_absmax), v_mid, 4)
        v_codes |= tl.where(hi_mask, _encode(_normalize(v_hi, v_absmax), v_mid, 4), 0) << 4
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
            m_scale = _floored_scales(m_scale_ptr, rows, row_mask)
            v_scale = _floored_scales(v_scale_ptr, rows, row_mask)
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
            tl.store(m_ptr + idx, _encode(_normalize(m, m_absmax), m_mid, 8).to(tl.uint8), mask=mask)
            tl.store(v_ptr + idx, _encode(_normalize(v, v_absmax), v_mid, 8).to(tl.uint8), mask=mask)
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
                 CLIP: tl.constexpr):
    _adam_tile(tl.program_id(0) * ROWS, numel, out_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr,
               m_map, m_mid, v_map, v_mid, ncols, g_s0, g_s1, o_s0, o_s1, beta1, omb1, beta2, omb2, eps,
               bias1, bias2_sqrt, corr, neg_lr, keep, seed, theta, STATE, WRITE, EPS_SCALED, STRIDED, STOCHASTIC,
               QBLOCK, ROWS, CLIP)


@jit
def _pointer(table_ptr, DTYPE: tl.constexpr):
    return tl.load(table_ptr).to(tl.pointer_type(DTYPE))


@jit
def _adam_multi_kernel(addr_ptr, numel_ptr, starts_ptr, hyper_ptr, seed_ptr, num_tensors, m_map, m_mid, v_map, v_mid,
                       beta1, omb1, beta2, omb2, eps, STATE: tl.constexpr, WRITE: tl.constexpr,
                       EPS_SCALED: tl.constexpr, STOCHASTIC: tl.constexpr, OUT_DTYPE: tl.constexpr,
                       G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
                       SEARCH: tl.constexpr):
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
               tl.load(seed_ptr + t), 0.0, STATE, WRITE, EPS_SCALED, False, STOCHASTIC, QBLOCK, ROWS, False)


# ---------------------------------------------------------------------------------------------------------
# Launchers


@functools.cache
def _map_tables(bits: int, kind: q.Kind, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A state map's values and its midpoints padded with +inf to 2^bits entries, on `device`."""
    qmap = q.state_map(bits, kind)
    padded = torch.cat([qmap.midpoints, torch.tensor([math.inf])])
    return qmap.values.to(device), padded.to(device)


def _kind(storage: Storage) -> int:
    return STATE_CODES[storage.name]


def handles(storage: Storage, shape: Sequence[int]) -> bool:
    """Whether the fused kernels keep a moment of this storage and shape (not: rank-1 int4 second moments)."""
    return not (isinstance(storage, QuantizedStorage) and storage.rank1 and len(shape) == 2)


def _tiles(device: torch.device, state: int) -> int:
    """Tile rows per program: the interpreter pays ~1 ms a program besides its numpy work (a few large
    programs); a GPU wants 1-2K elements a program (untuned: no GPU was at hand)."""
    if device.type != "cuda":
        return 16
    return 4 if state == INT8 else 8


def _row_width(storage: Storage) -> int:
    """Elements per tile row: a quantization block, or PLAIN_TILE for fp32 / bf16 moments."""
    return QUANT_BLOCKS[storage.name] if storage.name in QUANT_BLOCKS else PLAIN_TILE


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
    """(1 - b1^t, sqrt(1 - b2^t), sqrt(1 - b2^t) / (1 - b1^t)), in double as adam_math computes them."""
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    return bias1, bias2_sqrt, bias2_sqrt / bias1


def _moments(state: dict, storage: Storage) -> tuple[torch.Tensor, ...]:
    """(m, v, m scale, v scale): the scale slots repeat m / v for unquantized storages (never read)."""
    m, v = state[FIRST], state[SECOND]
    if isinstance(storage, QuantizedStorage):
        return m, v, state[FIRST + "_absmax"], state[SECOND + "_absmax"]
    return m, v, m, v


def _maps(storage: Storage, device: torch.device) -> tuple[torch.Tensor, ...]:
    if not isinstance(storage, QuantizedStorage):
        dummy = torch.empty(1, device=device)
        return dummy, dummy, dummy, dummy
    return (*_map_tables(storage.bits, "signed", str(device)), *_map_tables(storage.bits, "unsigned", str(device)))


def _launch(out: torch.Tensor, grad: torch.Tensor, state: dict, storage: Storage, write: int, step: int,
            beta1: float, beta2: float, eps: float, eps_scaled: bool, lr: float, decay: float,
            stochastic_rounding: bool, seed: int, clip: Optional[float] = None) -> None:
    numel = grad.numel()
    if not handles(storage, grad.shape):
        raise ValueError("the fused Adam kernels do not keep rank-1 int4 moments; use the reference path")
    if numel >= MAX_NUMEL:
        raise ValueError(f"the fused Adam kernels index with int32: {numel} elements is too many")
    if out.shape != grad.shape:
        raise ValueError(f"weight shape {tuple(out.shape)} differs from gradient shape {tuple(grad.shape)}")
    ncols, g_s0, g_s1 = _layout(grad)
    _, o_s0, o_s1 = _layout(out)
    strided = not (grad.is_contiguous() and out.is_contiguous())
    m, v, m_scale, v_scale = _moments(state, storage)
    kind = _kind(storage)
    qblock = _row_width(storage)
    rows = _tiles(grad.device, kind)
    bias1, bias2_sqrt, corr = _scalars(step, beta1, beta2)
    grid = (cdiv(cdiv(numel, qblock), rows),)
    _adam_kernel[grid](out, grad, m, v, m_scale, v_scale, *_maps(storage, grad.device),
                       numel, ncols, g_s0, g_s1, o_s0, o_s1, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                       bias1, bias2_sqrt, corr, -lr, 1.0 - decay, seed, clip or 0.0, STATE=kind, WRITE=write,
                       EPS_SCALED=eps_scaled, STRIDED=strided, STOCHASTIC=stochastic_rounding, QBLOCK=qblock,
                       ROWS=rows, CLIP=clip is not None)


def adam_direction(grad: torch.Tensor, state: dict, storage: Storage, step: int, beta1: float, beta2: float,
                   eps: float, eps_scaled: bool, clip: Optional[float] = None) -> torch.Tensor:
    """Update the moments in `state` (kept by `storage`, already initialized) with `grad` and return the
    bias-corrected direction as a fresh fp32 tensor of grad's shape; `step` counts this update (1 first).
    clip: SPAM's theta, the gradient clipped against the stored second moment first (None: no clipping)."""
    direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    _launch(direction, grad, state, storage, DIRECTION, step, beta1, beta2, eps, eps_scaled, 0.0, 0.0, False, 0,
            clip)
    return direction


def adam_update(param: torch.Tensor, grad: torch.Tensor, state: dict, storage: Storage, step: int, lr: float,
                beta1: float, beta2: float, eps: float, eps_scaled: bool, decay: float = 0.0,
                decay_after: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                clip: Optional[float] = None) -> None:
    """Update the moments and the fp32 or bf16 weight `param` in place: W -= lr * D, with the weight multiplied
    by (1 - decay) before the step (torch's convention) or after it (decay_after: GaLore's); decay is
    lr * weight_decay. bf16 weights round to nearest, or stochastically (seeded by `seed`). clip: as in
    adam_direction."""
    if stochastic_rounding and param.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding applies to bf16 weights, got {param.dtype}")
    write = DECAY_AFTER if decay_after else DECAY_BEFORE
    _launch(param, grad, state, storage, write, step, beta1, beta2, eps, eps_scaled, lr, decay,
            stochastic_rounding, seed, clip)


# ---------------------------------------------------------------------------------------------------------
# Many tensors in one launch


_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8"}


def _tl_dtype(dtype: torch.dtype):
    return getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "u8": "uint8"}[_TL_DTYPES[dtype]])


def _multi(outs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict],
           storages: Sequence[Storage], steps: Sequence[int], write: int, lrs: Sequence[float],
           decays: Sequence[float], beta1: float, beta2: float, eps: float, eps_scaled: bool,
           stochastic_rounding: bool, seeds: Sequence[int]) -> None:
    """One launch per kind (storage, output dtype, gradient dtype); each kind's tensors in one table."""
    kinds: dict[tuple, list[int]] = {}
    for i, (out, grad, storage) in enumerate(zip(outs, grads, storages)):
        if not (out.is_contiguous() and grad.is_contiguous()) or not handles(storage, grad.shape):
            raise ValueError(f"tensor {i}: the multi-tensor launch takes contiguous tensors without rank-1 "
                             f"int4 moments (use adam_update / the reference for it)")
        if out.shape != grad.shape or grad.numel() >= MAX_NUMEL:
            raise ValueError(f"tensor {i}: shape {tuple(out.shape)} vs {tuple(grad.shape)} (at most 2^31 elements)")
        kinds.setdefault((storage.name, out.dtype, grad.dtype), []).append(i)
    for (name, out_dtype, grad_dtype), members in kinds.items():
        storage = storages[members[0]]
        device = grads[members[0]].device
        kind, qblock = _kind(storage), _row_width(storage)
        rows = _tiles(device, kind)
        addresses, numels, starts, hyper = [], [], [0], []
        for i in members:
            m, v, m_scale, v_scale = _moments(states[i], storage)
            addresses += [outs[i].data_ptr(), grads[i].data_ptr(), m.data_ptr(), v.data_ptr(), m_scale.data_ptr(),
                          v_scale.data_ptr()]
            numels.append(grads[i].numel())
            starts.append(starts[-1] + cdiv(cdiv(grads[i].numel(), qblock), rows))
            hyper += [*_scalars(steps[i], beta1, beta2), -lrs[i], 1.0 - decays[i]]
        table = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
        numel_t = torch.tensor(numels, dtype=torch.int32).to(device, non_blocking=True)
        starts_t = torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True)
        hyper_t = torch.tensor(hyper, dtype=torch.float32).to(device, non_blocking=True)
        seed_t = torch.tensor([seeds[i] for i in members], dtype=torch.int32).to(device, non_blocking=True)
        state_dtype = states[members[0]][FIRST].dtype
        _adam_multi_kernel[(starts[-1],)](
            table, numel_t, starts_t, hyper_t, seed_t, len(members), *_maps(storage, device),
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, STATE=kind, WRITE=write, EPS_SCALED=eps_scaled,
            STOCHASTIC=stochastic_rounding, OUT_DTYPE=_tl_dtype(out_dtype), G_DTYPE=_tl_dtype(grad_dtype),
            S_DTYPE=_tl_dtype(state_dtype), QBLOCK=qblock, ROWS=rows,
            SEARCH=max(1, (len(members) - 1).bit_length()))


def adam_direction_multi(grads: Sequence[torch.Tensor], states: Sequence[dict], storages: Sequence[Storage],
                         steps: Sequence[int], beta1: float, beta2: float, eps: float,
                         eps_scaled: bool) -> list[torch.Tensor]:
    """`adam_direction` for many tensors, one launch per kind: the directions, in order."""
    directions = [torch.empty(g.shape, dtype=torch.float32, device=g.device) for g in grads]
    zeros = [0.0] * len(grads)
    _multi(directions, grads, states, storages, steps, DIRECTION, zeros, zeros, beta1, beta2, eps, eps_scaled,
           False, [0] * len(grads))
    return directions


def adam_update_multi(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict],
                      storages: Sequence[Storage], steps: Sequence[int], lrs: Sequence[float],
                      decays: Sequence[float], beta1: float, beta2: float, eps: float, eps_scaled: bool,
                      decay_after: bool = False, stochastic_rounding: bool = False,
                      seeds: Optional[Sequence[int]] = None) -> None:
    """`adam_update` for many weights, one launch per kind; per-weight step counts, lr and decay."""
    seeds = seeds if seeds is not None else [0] * len(params)
    _multi(params, grads, states, storages, steps, DECAY_AFTER if decay_after else DECAY_BEFORE, lrs, decays,
           beta1, beta2, eps, eps_scaled, stochastic_rounding, seeds)


# ---------------------------------------------------------------------------------------------------------
# References: the optimizer's own code (AdamCore's read / adam_math / write, the conventions' apply_update)


def reference_adam_direction(grad: torch.Tensor, state: dict, storage: Storage, step: int, beta1: float,
                             beta2: float, eps: float, eps_scaled: bool) -> torch.Tensor:
    exp_avg = storage.read(state, FIRST, grad.shape, "signed")
    exp_avg_sq = storage.read(state, SECOND, grad.shape, "unsigned")
    direction = adam_math(grad.float(), exp_avg, exp_avg_sq, step, beta1, beta2, eps, eps_scaled)
    storage.write(state, FIRST, exp_avg, "signed")
    storage.write(state, SECOND, exp_avg_sq, "unsigned")
    return direction


def reference_adam_update(param: torch.Tensor, grad: torch.Tensor, state: dict, storage: Storage, step: int,
                          lr: float, beta1: float, beta2: float, eps: float, eps_scaled: bool, decay: float = 0.0,
                          decay_after: bool = False) -> None:
    weight = param.float()
    direction = reference_adam_direction(grad, state, storage, step, beta1, beta2, eps, eps_scaled)
    ADAM_CONVENTIONS["galore" if decay_after else "torch"].apply_update(weight, direction, lr, decay)
    if weight is not param:
        param.copy_(weight)


def foreach_adam_direction(grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                           exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[int], beta1: float, beta2: float,
                           eps: float, eps_scaled: bool) -> list[torch.Tensor]:
    """`adam_math` over lists of fp32 tensors with torch._foreach ops (a few launches for all of them instead of
    a dozen per tensor): moments updated in place, fresh directions returned."""
    grads = list(grads)
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
