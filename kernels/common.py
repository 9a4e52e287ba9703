"""Jitted helpers the kernel families share: strided addressing, bf16 rounding, the decay conventions."""
from __future__ import annotations

from lowmem.kernels._triton import jit, tl


@jit
def offset(idx, ncols, s0, s1, STRIDED: tl.constexpr):
    """Memory offset of logical (row-major) element `idx` of a 2-D tensor with strides (s0, s1)."""
    if STRIDED:
        return (idx // ncols) * s0 + (idx % ncols) * s1
    else:
        return idx


@jit
def round_bf16(x, seed, idx, STOCHASTIC: tl.constexpr):
    """fp32 -> bf16 in integer arithmetic (the interpreter's float casts truncate): to nearest even, or
    stochastically (up in magnitude with probability dropped-16-bits / 2^16: add 16 random bits, truncate)."""
    bits = x.to(tl.int32, bitcast=True)
    if STOCHASTIC:
        bits += (tl.randint(seed, idx) & 0xFFFF).to(tl.int32)
    else:
        bits += 0x7FFF + ((bits >> 16) & 1)
    high = tl.where(x != x, 0x7FC0, bits >> 16)  # NaN stays NaN
    return high.to(tl.int16).to(tl.bfloat16, bitcast=True)


@jit
def store_float(ptr, off, x, mask, seed, idx, STOCHASTIC: tl.constexpr):
    """Store fp32 values into an fp32 or bf16 tensor."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr + off, round_bf16(x, seed, idx, STOCHASTIC), mask=mask)
    else:
        tl.store(ptr + off, x.to(ptr.dtype.element_ty), mask=mask)


@jit
def decayed_step(w, u, neg_lr, keep, DECAY_AFTER: tl.constexpr):
    """The pipeline's Adam conventions (cores.ADAM_CONVENTIONS), keep = 1 - lr * weight_decay:
    torch's decays first, W keep - lr U; GaLore's steps first, (W - lr U) keep."""
    if DECAY_AFTER:
        return (w + neg_lr * u) * keep
    else:
        return w * keep + neg_lr * u
