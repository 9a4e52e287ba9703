"""MicroAdam's fused passes (lowmem.kernels.microadam) under the Triton interpreter against the core's own step:
error-feedback correction, requantization (min / max rounded to bf16, codes, packing), and the direction
recomputed from the window, over more updates than the window holds (the ring wraps), with block sizes that
do not divide the tensor, odd element counts and a transposed gradient.

Tolerance: the direction to rtol 1e-5 (same sums in the same row order; the kernel divides with div_rn where
torch may multiply by a reciprocal); the window, the error-feedback codes and min / max are compared exactly,
except that a code may differ by one level where a value sits within rounding of a code boundary (measured:
none in these runs)."""
from types import SimpleNamespace

import pytest
import torch

from lowmem.kernels import microadam as km
from lowmem.optim.parts.microadam import ef_dequantize, ef_quantize, window_width

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

BETAS = (0.9, 0.999)


def options(**overrides):
    base = dict(window=3, k_init=0.05, topk_block=512, ef_block=64, state_dtype="auto", ef_alpha=0.0)
    return SimpleNamespace(**dict(base, **overrides))


def initial_state(o, numel, value_dtype=torch.bfloat16):
    """What MicroAdamCore.step sets up before its first update."""
    width = window_width(numel, o.topk_block, o.k_init)
    codes, low, high = ef_quantize(torch.zeros(numel), o.ef_block)
    return {"micro_step": 0, "window_row": 0, "window_indices": torch.zeros(o.window, width, dtype=torch.int16),
            "window_values": torch.zeros(o.window, width, dtype=value_dtype), "ef_codes": codes, "ef_min": low,
            "ef_max": high}


def assert_codes_close(ours, ref, numel):
    a = torch.stack([ours & 15, ours >> 4], 1).reshape(-1)[:numel].int()
    b = torch.stack([ref & 15, ref >> 4], 1).reshape(-1)[:numel].int()
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() <= 1e-3


@pytest.mark.parametrize("shape, overrides", [
    ((37, 101), {}),                                          # 3,737 elements: partial last top-k block and bucket
    ((2001,), {"ef_block": 50, "k_init": 0.011}),             # odd count, bucket of 50 (25 pairs, padded to 32)
    ((64, 48), {"topk_block": 1024, "ef_block": 33}),         # odd bucket: the reference quantizer
    ((40, 30), {"state_dtype": "fp32", "transposed": True}),  # fp32 window values, a transposed gradient
])
def test_microadam_matches_core(shape, overrides):
    torch.manual_seed(0)
    transposed = overrides.pop("transposed", False)
    o = options(**overrides)
    numel = torch.Size(shape).numel()
    value_dtype = torch.float32 if o.state_dtype == "fp32" else torch.bfloat16
    ref, ours = {}, initial_state(o, numel, value_dtype)
    for _ in range(5):  # window 3: rows are overwritten
        grad = torch.randn(shape[::-1]).T if transposed else torch.randn(shape)
        expected = km.reference_microadam_direction(grad, ref, o, *BETAS, 1e-8)
        got = km.microadam_direction(grad, ours, o, *BETAS, 1e-8)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        for key in ("micro_step", "window_row"):
            assert ours[key] == ref[key]
        assert torch.equal(ours["window_indices"], ref["window_indices"])
        torch.testing.assert_close(ours["window_values"], ref["window_values"], rtol=0, atol=0)
        assert_codes_close(ours["ef_codes"], ref["ef_codes"], numel)
        assert torch.equal(ours["ef_min"], ref["ef_min"]) and torch.equal(ours["ef_max"], ref["ef_max"])
        # the error feedback carries over: resynchronize so a one-level code difference cannot grow
        ours["ef_codes"].copy_(ref["ef_codes"])


def test_error_feedback_round_trip():
    """The correction pass adds exactly what ef_dequantize decodes; requantizing reproduces ef_quantize."""
    torch.manual_seed(1)
    numel, bucket = 3001, 64
    values = torch.randn(numel) * torch.rand(numel) ** 3
    codes, low, high = ef_quantize(values, bucket)
    grad = torch.randn(numel)
    corrected = km.ef_correct(grad, codes, low, high, bucket)
    torch.testing.assert_close(corrected, grad + ef_dequantize(codes, low, high, bucket, numel), rtol=1e-6, atol=1e-7)
    ours = (torch.empty_like(codes), torch.empty_like(low), torch.empty_like(high))
    km.ef_quantize_into(values, *ours, bucket)
    assert torch.equal(ours[1], low) and torch.equal(ours[2], high)
    assert_codes_close(ours[0], codes, numel)
