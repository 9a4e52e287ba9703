"""Blockwise quantization of optimizer states: the 8-bit and 4-bit maps, and their encode/decode.

A map is a sorted table of code values in [-1, 1] (signed) or [0, 1] (unsigned). A tensor is stored as the
codes of `x / scale`, the scale being the absmax of each block of consecutive elements (or, for a rank-1
normalized matrix, min(row max, column max) of each element). Decoding is `map[code] * scale`.

- int8, both moments: the dynamic-tree map (bitsandbytes' `create_dynamic_map`, 7 exponent bits: a
  decimal exponent followed by a linear fraction), signed for the first moment and unsigned for the second;
  blocks of 256, one fp32 absmax each. This is bitsandbytes' and torchao's blockwise 8-bit, with one
  difference: a positive value never encodes to the unsigned map's code 0 (it takes the smallest positive
  code instead), so a tiny second moment beside a non-zero first moment cannot blow up the update.
- int4, first moment: the signed dynamic map with 3 exponent bits; blocks of 128.
- int4, second moment: a *zero-free* linear map {1/16, 2/16, ..., 1} (Li et al. 2023, "Memory efficient
  optimizers with 4-bit states"): a map containing 0 rounds tiny second moments to 0, and m / sqrt(v) then
  explodes. Blocks of 128, or optional rank-1 normalization (the paper's default).
Two 4-bit codes share a byte (element 2i in the low nibble, 2i+1 in the high one). Encoding rounds to the
nearest map value. All arithmetic is fp32.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch

from lowmem.kernels.constants import SCALE_FLOOR

Kind = Literal["signed", "unsigned"]



def dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    """The dynamic (tree) quantization map of Dettmers (2016), as bitsandbytes defines it: for exponent
    i = 0 .. max_exponent_bits-1, the midpoints of a linear grid on [0.1, 1] scaled by 10^(i + 1 -
    max_exponent_bits), the grid having more points as the exponent grows; plus 0 and 1. Sorted, 2^bits
    values (unused slots are 0)."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        grid = torch.linspace(0.1, 1, 2 ** fraction_bits + 1, dtype=torch.float32)
        means = ((grid[:-1] + grid[1:]) / 2.0) * 10.0 ** (i + 1 - max_exponent_bits)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # codes left when the exponent bits are all zero
    if extra > 0:
        grid = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0  # at the largest exponent's scale, 10^0
        values += means.tolist() + ((-means).tolist() if signed else [])
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def linear_zero_free_map(total_bits: int) -> torch.Tensor:
    """{1, 2, ..., 2^bits} / 2^bits: unsigned, linear, without 0."""
    levels = 2 ** total_bits
    return torch.arange(1, levels + 1, dtype=torch.float32) / levels


class QuantMap:
    """A sorted code table with nearest-value encoding."""

    def __init__(self, values: torch.Tensor, bits: int):
        self.values = values
        self.bits = bits
        self.midpoints = (values[1:] + values[:-1]) / 2
        if float(values[0]) == 0.0 and len(values) > 1:
            # An unsigned map with 0 as its smallest code: only an exact 0 encodes to it. Round-to-nearest would
            # store a positive second moment below half the smallest positive code as 0, and a later
            # m / (sqrt(v) + eps) with a non-zero m then moves the weight by about m / eps.
            self.midpoints[0] = 0.0
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU encode tables (_encode_by_prefix)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.values.to(device), self.midpoints.to(device))
        return self._on_device[key]

    def encode(self, normalized: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of the nearest map value to each element of `normalized` (already in the map's range)."""
        _, midpoints = self.tables(normalized.device)
        if normalized.device.type == "cpu" and normalized.dtype == torch.float32:
            return self._encode_by_prefix(normalized.contiguous())
        return torch.bucketize(normalized, midpoints, out_int32=True).to(torch.uint8)

    def _encode_by_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The same codes as bucketize, several times faster on CPU (whose bucketize is a scalar binary search):
        the top 16 bits of a float, in an order-preserving form, select one of 65536 intervals; every interval
        holds at most one midpoint (checked when the table is built), so the code is the number of midpoints
        below the interval plus one comparison."""
        below, threshold = self.prefix_tables()
        key = _order_key(x).reshape(-1)  # int32: index_select with int32 indices is the fastest CPU gather
        return below.index_select(0, key).add_(x.reshape(-1) > threshold.index_select(0, key)).view(x.shape)

    def prefix_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU encode tables (_encode_by_prefix): per 16-bit prefix, the midpoints below it (uint8) and the
        one midpoint inside it (fp32; +inf where none)."""
        if self._prefix is None:
            keys = _order_key(self.midpoints.contiguous()).long()
            every = torch.arange(1 << 16)
            below = torch.searchsorted(keys, every, right=False)
            inside = torch.searchsorted(keys, every, right=True) - below
            assert int(inside.max()) <= 1, "two midpoints share a 16-bit prefix"
            threshold = torch.full((1 << 16,), float("inf"))
            threshold[inside > 0] = self.midpoints[below[inside > 0]]
            self._prefix = (below.to(torch.uint8), threshold)
        return self._prefix

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        values, _ = self.tables(codes.device)
        return values.index_select(0, codes.reshape(-1).int()).view(codes.shape)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of float32 `x` as integers in [0, 65536) in the order of the floats."""
    bits = x.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return (ordered >> 16) + (1 << 15)


@functools.cache
def state_map(bits: int, kind: Kind) -> QuantMap:
    """The map a moment of this kind is stored with at this width (module docstring)."""
    if bits == 8:
        return QuantMap(dynamic_map(signed=kind == "signed", max_exponent_bits=7, total_bits=8), 8)
    if bits == 4:
        if kind == "signed":
            return QuantMap(dynamic_map(signed=True, max_exponent_bits=3, total_bits=4), 4)
        return QuantMap(linear_zero_free_map(4), 4)
    raise ValueError(f"no {bits}-bit state map")


# ---------------------------------------------------------------------------------------------------------
# Scales


def block_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    """The absmax of each block of `block` consecutive elements of a flat tensor (the last may be short)."""
    pad = (-flat.numel()) % block
    padded = torch.nn.functional.pad(flat.abs(), (0, pad)) if pad else flat.abs()
    return padded.view(-1, block).amax(dim=1)


def expand_blocks(scales: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """One scale per element: each block's scale repeated over its elements."""
    return scales.repeat_interleave(block)[:numel]


def rank1_scales(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column absmax of a 2-D tensor; element (i, j) is normalized by min(row_i, col_j), which
    bounds |x_ij| (SM3-style statistics, the 4-bit-states paper's rank-1 normalization)."""
    magnitude = matrix.abs()
    return magnitude.amax(dim=1), magnitude.amax(dim=0)


def rank1_expand(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return torch.minimum(rows[:, None], cols[None, :])


# ---------------------------------------------------------------------------------------------------------
# Codes


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2i in the low nibble, 2i+1 in the high one (an odd tail pads 0)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).view(-1)[:numel]


def quantize(values: torch.Tensor, qmap: QuantMap, scales: torch.Tensor) -> torch.Tensor:
    """Codes of `values / scales` (element-wise scales), packed when the map is 4-bit. Flat uint8."""
    # multiplying by the reciprocal, then clamping, as bitsandbytes does: the same codes at near-ties
    normalized = (values.reshape(-1) * scales.reshape(-1).clamp(min=SCALE_FLOOR).reciprocal()).clamp_(-1.0, 1.0)
    codes = qmap.encode(normalized)
    return pack_nibbles(codes) if qmap.bits == 4 else codes


def dequantize(codes: torch.Tensor, qmap: QuantMap, scales: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat fp32 values of stored codes with element-wise `scales`."""
    if qmap.bits == 4:
        codes = unpack_nibbles(codes, numel)
    return qmap.decode(codes).mul_(scales.reshape(-1).clamp(min=SCALE_FLOOR))


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of the codes of `numel` elements."""
    return numel if bits == 8 else (numel + 1) // 2
