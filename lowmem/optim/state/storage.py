"""How an optimizer keeps a moment tensor: fp32, bf16, or blockwise 8-bit / 4-bit codes (state_dtype).

A storage reads a stored moment as an fp32 tensor the caller may update in place, and writes an fp32 value
back; the math never sees the storage format. State stays flat and tensor-only, under the moment's key and
companions with suffixes, so `torch.load(weights_only=True)` reads a checkpoint:

    fp32 / bf16   state[key]                     the values, in the moment's shape
    int8 / int4   state[key]                     uint8 codes (flat; two 4-bit codes per byte)
                  state[key + "_absmax"]         fp32, one per block (256 for int8, 128 for int4)
      rank-1      state[key + "_row"], ["_col"]  fp32 row and column maxima (int4 second moment, optional)

Tensors under 4096 elements stay fp32 (as bitsandbytes and torchao do): their codes and scales would save
nothing worth the error. `state_dtype: auto` means the parameter's dtype (fp32, or bf16 for bf16
weights), as torch AdamW and the papers' code keep it.
"""
from __future__ import annotations

import math

import torch

from lowmem.optim.state import quantization as q

STATE_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")
QUANTIZED_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCKS = {"int8": 256, "int4": 128}
MIN_QUANTIZED_NUMEL = 4096
SCALE_BYTES = 4  # fp32 absmax / row / column maxima
SUFFIXES = ("_absmax", "_row", "_col")


def resolve_state_dtype(state_dtype: str, param_dtype: torch.dtype) -> str:
    """`auto` -> the parameter's dtype (bf16 for bf16 weights, fp32 otherwise); any other name unchanged."""
    if state_dtype != "auto":
        return state_dtype
    return "bf16" if param_dtype == torch.bfloat16 else "fp32"


class Storage:
    """Plain values in a torch dtype (fp32 or bf16)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.dtype = dtype

    def holds(self, state: dict, key: str, shape: torch.Size) -> bool:
        """Whether `state` holds `key` stored for `shape` (a changed core shape means fresh moments)."""
        return key in state and state[key].shape == shape

    def zeros(self, state: dict, key: str, shape: torch.Size, device: torch.device, kind: q.Kind) -> None:
        state[key] = torch.zeros(shape, dtype=self.dtype, device=device)

    def read(self, state: dict, key: str, shape: torch.Size, kind: q.Kind) -> torch.Tensor:
        """fp32 values the caller may modify (the stored tensor itself when it is fp32)."""
        return state[key].float()

    def write(self, state: dict, key: str, value: torch.Tensor, kind: q.Kind) -> None:
        stored = state[key]
        if value is not stored:
            stored.copy_(value)

    def drop(self, state: dict, key: str) -> None:
        for name in (key, *(key + s for s in SUFFIXES)):
            state.pop(name, None)

    def nbytes(self, shape: tuple[int, ...], kind: q.Kind) -> int:
        return sum(self.nbytes_parts(shape, kind))

    def nbytes_parts(self, shape: tuple[int, ...], kind: q.Kind) -> tuple[int, int]:
        """(bytes of the values or codes, bytes of the scales) of a moment of `shape`."""
        return math.prod(shape) * torch.empty((), dtype=self.dtype).element_size(), 0


class QuantizedStorage(Storage):
    """Blockwise codes with an fp32 absmax per block; optionally rank-1 scales for the 4-bit second moment."""

    def __init__(self, name: str, rank1_second_moment: bool = False):
        super().__init__(name, torch.uint8)
        self.bits = QUANTIZED_BITS[name]
        self.block = QUANT_BLOCKS[name]
        self.rank1 = rank1_second_moment and self.bits == 4

    def _rank1(self, shape: torch.Size, kind: q.Kind) -> bool:
        return self.rank1 and kind == "unsigned" and len(shape) == 2

    def holds(self, state, key, shape):
        return key in state and state[key].numel() == q.code_bytes(math.prod(shape), self.bits)

    def zeros(self, state, key, shape, device, kind):
        numel = math.prod(shape)
        if self._rank1(torch.Size(shape), kind):
            self._store(state, key, torch.zeros(numel, device=device), shape, kind)
            return
        # what _store writes for zeros, without quantizing them: every code is the code of 0 (an odd int4 tail's
        # high nibble 0, as pack_nibbles pads), every absmax 0
        code = int(q.state_map(self.bits, kind).encode(torch.zeros(1))[0])
        codes = torch.full((q.code_bytes(numel, self.bits),), code | (code << 4) if self.bits == 4 else code,
                           dtype=torch.uint8, device=device)
        if self.bits == 4 and numel % 2:
            codes[-1] = code
        state[key] = codes
        state[key + "_absmax"] = torch.zeros(-(-numel // self.block), device=device)

    def _scales(self, state: dict, key: str, shape: torch.Size, kind: q.Kind) -> torch.Tensor:
        if self._rank1(shape, kind):
            return q.rank1_expand(state[key + "_row"], state[key + "_col"])
        return q.expand_blocks(state[key + "_absmax"], self.block, math.prod(shape))

    def _store(self, state: dict, key: str, flat: torch.Tensor, shape: torch.Size, kind: q.Kind) -> None:
        if self._rank1(shape, kind):
            rows, cols = q.rank1_scales(flat.view(shape))
            state[key + "_row"], state[key + "_col"] = rows, cols
            scales = q.rank1_expand(rows, cols)
        else:
            absmax = q.block_absmax(flat, self.block)
            state[key + "_absmax"] = absmax
            scales = q.expand_blocks(absmax, self.block, flat.numel())
        state[key] = q.quantize(flat, q.state_map(self.bits, kind), scales)

    def read(self, state, key, shape, kind):
        values = q.dequantize(state[key], q.state_map(self.bits, kind), self._scales(state, key, shape, kind),
                              math.prod(shape))
        return values.view(shape)

    def write(self, state, key, value, kind):
        self._store(state, key, value.reshape(-1).float(), value.shape, kind)

    def nbytes_parts(self, shape, kind):
        numel = math.prod(shape)
        if self._rank1(torch.Size(shape), kind):
            scales = shape[0] + shape[1]
        else:
            scales = -(-numel // self.block)
        return q.code_bytes(numel, self.bits), SCALE_BYTES * scales


FP32 = Storage("fp32", torch.float32)
BF16 = Storage("bf16", torch.bfloat16)


class StoragePolicy:
    """Which storage a moment of a given size gets, for one optimizer's resolved state_dtype."""

    def __init__(self, state_dtype: str, rank1_second_moment: bool = False):
        self.state_dtype = state_dtype
        if state_dtype in QUANTIZED_BITS:
            self.storage: Storage = QuantizedStorage(state_dtype, rank1_second_moment)
        else:
            self.storage = {"fp32": FP32, "bf16": BF16}[state_dtype]

    @property
    def quantized(self) -> bool:
        return isinstance(self.storage, QuantizedStorage)

    def for_shape(self, shape: tuple[int, ...]) -> Storage:
        if self.quantized and math.prod(shape) < MIN_QUANTIZED_NUMEL:
            return FP32
        return self.storage

    @property
    def basis_dtype(self) -> torch.dtype:
        """A projector's basis: fp32 next to fp32 moments, bf16 next to bf16 or quantized ones."""
        return torch.float32 if self.state_dtype == "fp32" else torch.bfloat16

    @property
    def basis_itemsize(self) -> int:
        return torch.empty((), dtype=self.basis_dtype).element_size()
