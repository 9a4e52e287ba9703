"""Fake 4-bit quantization (quantize, then dequantize at once) as Stable-SPAM's 4-bit runs simulate it.

Every function here is plain tensor math, the reference for a fused kernel. A quantizer splits a tensor into
groups of `group_size` consecutive elements, computes in fp32 and returns the dequantized values in the
input's shape and dtype. Groups run along the last dimension (a weight's input features, an activation's
features) when `group_size` divides it, so they never cross a row; otherwise (a down projection whose
input, the intermediate size, 256 does not divide: llama_350m's 2736, llama_1b's 5461) they are groups of
the flattened tensor, the reference's `view(-1, group_size)`, the short tail group padded with copies of
its last value (the reference cannot run such a shape; a copy changes no min, max or absmax).

Formats (the reference: TianjinYellow/StableSPAM, utils/act_weight_quantization.py, dummy_quant.py and
act_weight_fp4.py):
    int4 weights      asymmetric min-max onto 16 levels with a zero point      `int4_weight`
    int4 activations  symmetric onto codes -8..7, the k largest |x| kept exact  `int4_activation`
    fp4 (both)        E1M2 absmax, the k largest |x| kept exact                 `fp4_e1m2`
"""
from __future__ import annotations

from typing import Callable

import torch

INT4_MAX_CODE = 15  # unsigned weight codes 0..15
INT4_SYMMETRIC_MAX = 7  # 2**(4-1) - 1: the group absmax maps to code 7; codes are clamped to -8..7
E1M2_STEP = 0.25  # spacing of the E1M2 grid (see fp4_e1m2)
E1M2_ABSMAX_VALUE = 1.0  # the grid value the group absmax lands on in the reference


def _grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """fp32 (num_groups, group_size) groups of `x` (module docstring) and the function that turns groups
    back into a tensor of x's shape and dtype."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])

    def restore(groups: torch.Tensor) -> torch.Tensor:
        return groups.reshape(-1)[: x.numel()].reshape(x.shape).to(x.dtype)

    return flat.view(-1, group_size), restore


def _round(y: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """Round to nearest, or stochastically: up with probability frac(y), so the expectation is y."""
    if stochastic:
        return torch.floor(y + torch.rand_like(y))
    return torch.round(y)


def _keep_outliers(groups: torch.Tensor, keep: int,
                   quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`quantize` applied to the groups with their `keep` largest |values| set to zero (so they do not set the
    scale), then those values written back unchanged."""
    if keep == 0:
        return quantize(groups)
    index = groups.abs().topk(keep, dim=1).indices
    out = quantize(groups.scatter(1, index, 0.0))
    return out.scatter(1, index, groups.gather(1, index))


def int4_weight(w: torch.Tensor, group_size: int, stochastic: bool = False) -> torch.Tensor:
    """Asymmetric min-max INT4 per group, with a zero point:

        scale = max(max(g) - min(g), 1e-5) / 15
        zero  = clamp(-round(min(g) / scale), 0, 15)
        q     = clamp(round(g / scale) + zero, 0, 15)
        out   = (q - zero) * scale

    so every value lies on the group's grid (k - zero) * scale, k = 0..15, on which 0 is exact; the grid's ends
    are min(g) and max(g) up to the rounding of the zero point, whose clamp saturates a group of one sign.
    """
    groups, restore = _grouped(w, group_size)
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / INT4_MAX_CODE
    zero = (-torch.round(low / scale)).clamp(0, INT4_MAX_CODE)
    q = (_round(groups / scale, stochastic) + zero).clamp(0, INT4_MAX_CODE)
    return restore((q - zero) * scale)


def int4_activation(x: torch.Tensor, group_size: int, keep_outliers: int = 2, stochastic: bool = False) -> torch.Tensor:
    """Symmetric INT4 per group, the `keep_outliers` largest |x| of each group kept exactly:

        scale = max(absmax of the other values, 1e-6)
        q     = clamp(round(g * (7 / scale)), -8, 7)
        out   = q * scale / 7

    values lie on k * scale / 7, k = -7..7 (code -8 is never reached: |g| <= scale maps to |q| <= 7).
    """
    def quantize(groups: torch.Tensor) -> torch.Tensor:
        scale = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
        q = _round(groups * (INT4_SYMMETRIC_MAX / scale), stochastic).clamp(-INT4_SYMMETRIC_MAX - 1, INT4_SYMMETRIC_MAX)
        return q * scale / INT4_SYMMETRIC_MAX

    groups, restore = _grouped(x, group_size)
    return restore(_keep_outliers(groups, keep_outliers, quantize))


def fp4_e1m2(x: torch.Tensor, group_size: int, keep_outliers: int = 2) -> torch.Tensor:
    """FP4 E1M2 per group with absmax scaling, the `keep_outliers` largest |x| of each group kept exactly.

    E1M2 (1 sign, 1 exponent, 2 mantissa bits, exponent bias 1) represents the magnitudes
        exponent 0 (subnormal, 0.mm x 2^0): 0, 0.25, 0.5, 0.75
        exponent 1 (normal,    1.mm x 2^0): 1, 1.25, 1.5, 1.75
    a uniform grid of step 0.25. The reference (LLM-FP4's formula as Stable-SPAM codes it, with e=1, m=2,
    b=1) divides each group by its absmax `a` (outliers excluded) so that `a` lands on 1.0; its exponent term
    then always yields the step 0.25, so the values produced are

        out = a * round(g / a * 4) / 4  in  a * {0, +-0.25, +-0.5, +-0.75, +-1}

    nine levels: 1.25..1.75 are never reached. This is that arithmetic (ties round to even; the reference
    adds 1e-12 before rounding, which only differs on exact ties).
    """
    def quantize(groups: torch.Tensor) -> torch.Tensor:
        step = groups.abs().amax(dim=1, keepdim=True).clamp(min=1e-6) * (E1M2_STEP / E1M2_ABSMAX_VALUE)
        return torch.round(groups / step) * step

    groups, restore = _grouped(x, group_size)
    return restore(_keep_outliers(groups, keep_outliers, quantize))


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int, keep_outliers: int,
                    stochastic: bool = False) -> torch.Tensor:
    """`w` fake-quantized in format `fmt` (int4 | fp4 | none); stochastic rounding applies to int4 only."""
    if fmt == "int4":
        return int4_weight(w, group_size, stochastic)
    if fmt == "fp4":  # the reference keeps the top-k weights exact too
        return fp4_e1m2(w, group_size, keep_outliers)
    return w


def quantize_activation(x: torch.Tensor, fmt: str, group_size: int, keep_outliers: int,
                        stochastic: bool = False) -> torch.Tensor:
    """`x` fake-quantized in format `fmt` (int4 | fp4 | none); stochastic rounding applies to int4 only."""
    if fmt == "int4":
        return int4_activation(x, group_size, keep_outliers, stochastic)
    if fmt == "fp4":
        return fp4_e1m2(x, group_size, keep_outliers)
    return x


def linear_grads(grad_out: torch.Tensor, qx: torch.Tensor, qw: torch.Tensor, need_input: bool = True,
                 need_weight: bool = True, need_bias: bool = False,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `qx @ qw.T + b` with the quantizers' derivative taken as identity (straight-through):
    grad_input = grad_out @ Q(W), grad_weight = grad_outᵀ @ Q(x), grad_bias = sum of grad_out."""
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_input = grad_out @ qw if need_input else None
    grad_weight = rows.t() @ qx.reshape(-1, qx.shape[-1]) if need_weight else None
    grad_bias = rows.sum(0) if need_bias else None
    return grad_input, grad_weight, grad_bias
