"""Fake 4-bit quantization (`lowmem.model.quant.fake`) in one pass: quantize and dequantize a tensor group by group.

A program holds GROUPS groups of `group_size` consecutive elements of the flattened tensor (which are the rows'
groups when group_size divides the last dimension, and the reference's row-crossing groups otherwise), padded
to a power of 2 with lanes that take part in nothing. The last group's missing elements are copies of the
tensor's last value, as the reference pads it. Per group, in fp32 registers:

    outliers  the `keep` largest |x| are picked one by one (the first index among ties; a tie leaves the same
              values, whichever is picked) and set to 0 for the scale, then written back exactly
    int4 weight      min-max asymmetric with a zero point (`fake_quant.int4_weight`)
    int4 activation  symmetric absmax onto -8..7 (`fake_quant.int4_activation`)
    fp4              E1M2 absmax grid of step absmax / 4 (`fake_quant.fp4_e1m2`)

Rounding is to nearest even (torch.round, exactly), divisions are IEEE (div_rn) in the order torch's CPU
evaluation takes (a number over a tensor is a reciprocal times the number), and a bf16 / fp16 output is rounded
to nearest: the results equal the CPU reference bit for bit (tests, interpreted). On a GPU a product the
compiler contracts into an FMA, or torch's CUDA division by a constant (a reciprocal multiply), can move a value
by one ulp and so flip a rounding tie: one quantization level on rare elements. Stochastic rounding
(training-mode int4 with `stochastic_rounding`) draws torch's generator: the reference runs it.

The linear layer's backward is straight-through: it recomputes Q(W) with the same kernel and multiplies by the
saved Q(x) (cuBLAS), so forward and backward both run on it.
"""
from __future__ import annotations

import torch

from lowmem.kernels._triton import cdiv, jit, next_power_of_2, tl
from lowmem.kernels.common import store_float

INT4_WEIGHT, INT4_ACTIVATION, FP4 = 0, 1, 2
FORMATS: dict[tuple[str, str], int] = {("weight", "int4"): INT4_WEIGHT, ("activation", "int4"): INT4_ACTIVATION,
                                       ("weight", "fp4"): FP4, ("activation", "fp4"): FP4}


@jit
def _round_even(y):
    """torch.round: to nearest, ties to even (exact: y - floor(y) has no rounding error at these magnitudes)."""
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@jit
def _fake_quant_kernel(out_ptr, x_ptr, numel, num_groups, group_size, FORMAT: tl.constexpr, KEEP: tl.constexpr,
                       GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    j = tl.arange(0, BLOCK)
    idx = g[:, None] * group_size + j[None, :]
    in_group = (j < group_size)[None, :] & (g < num_groups)[:, None]
    real = in_group & (idx < numel)
    last = tl.load(x_ptr + numel - 1).to(tl.float32)
    x = tl.load(x_ptr + idx, mask=real, other=0.0).to(tl.float32)
    x = tl.where(real, x, last)  # the tail group's padding: copies of the last value
    selected = tl.zeros((GROUPS, BLOCK), dtype=tl.int32) != 0
    for _ in tl.static_range(KEEP):
        a = tl.where(selected | (in_group == 0), -1.0, tl.abs(x))
        peak = tl.max(a, axis=1)
        first = tl.min(tl.where(a == peak[:, None], j[None, :], BLOCK), axis=1)
        selected = selected | (j[None, :] == first[:, None])
    v = tl.where(selected, 0.0, x)
    if FORMAT == 0:
        present = g < num_groups  # rows past the last group: finite stand-ins (their lanes are never stored)
        low = tl.where(present, tl.min(tl.where(in_group, v, float("inf")), axis=1), 0.0)
        high = tl.where(present, tl.max(tl.where(in_group, v, -float("inf")), axis=1), 0.0)
        scale = tl.div_rn(tl.maximum(high - low, 1e-5), tl.full(low.shape, 15.0, tl.float32))
        zero = tl.minimum(tl.maximum(-_round_even(tl.div_rn(low, scale)), 0.0), 15.0)
        q = tl.minimum(tl.maximum(_round_even(tl.div_rn(v, scale[:, None])) + zero[:, None], 0.0), 15.0)
        y = (q - zero[:, None]) * scale[:, None]
    else:
        absmax = tl.maximum(tl.max(tl.where(in_group, tl.abs(v), 0.0), axis=1), 1e-6)
        if FORMAT == 1:
            # 7 / scale as torch evaluates a number over a tensor: the reciprocal, times 7
            mult = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax) * 7.0
            q = tl.minimum(tl.maximum(_round_even(v * mult[:, None]), -8.0), 7.0)
            y = tl.div_rn(q * absmax[:, None], tl.full(q.shape, 7.0, tl.float32))
        else:
            step = absmax * 0.25
            y = _round_even(tl.div_rn(v, step[:, None])) * step[:, None]
    y = tl.where(selected, x, y)
    store_float(out_ptr, idx, y, real, 0, idx, False)


def handles(fmt: str, stochastic: bool) -> bool:
    """Whether the kernel computes this quantizer (a 4-bit format, round to nearest)."""
    return fmt in ("int4", "fp4") and not stochastic


def _tiles(device: torch.device, block: int) -> int:
    """Whole groups a program: many for the interpreter (~1 ms a program), about 2K elements on a GPU (untuned)."""
    budget = 16384 if device.type != "cuda" else 2048
    return max(1, budget // block)


def fake_quantize(x: torch.Tensor, kind: str, fmt: str, group_size: int, keep_outliers: int = 0) -> torch.Tensor:
    """`lowmem.model.quant.fake`'s int4_weight / int4_activation / fp4_e1m2 of `x` (kind: weight | activation) in its
    shape and dtype, round to nearest; int4 weights keep no outliers, as the reference."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    code = FORMATS[(kind, fmt)]
    keep = 0 if code == INT4_WEIGHT else keep_outliers
    if keep >= group_size:
        raise ValueError(f"keep_outliers {keep} leaves nothing to quantize in groups of {group_size}")
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    num_groups = cdiv(numel, group_size)
    block = next_power_of_2(group_size)
    groups = _tiles(x.device, block)
    _fake_quant_kernel[(cdiv(num_groups, groups),)](out, x, numel, num_groups, group_size, FORMAT=code, KEEP=keep,
                                                    GROUPS=groups, BLOCK=block)
    return out
