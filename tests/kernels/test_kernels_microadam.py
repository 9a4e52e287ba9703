"""MicroAdam's fused passes (lowmem.kernels.microadam) under the Triton interpreter: the core's step on the
kernels against its step on the torch path. Error-feedback correction, requantization (min / max rounded to
bf16, codes, packing) and the direction recomputed from the window, over more updates than the window holds
(the ring wraps), with block sizes that do not divide the tensor, odd element counts and a transposed
gradient.

Tolerance: the direction to rtol 1e-5 (same sums in the same row order; the kernel divides with div_rn where
torch may multiply by a reciprocal); the window, the error-feedback codes and min / max are compared exactly,
except that a code may differ by one level where a value sits within rounding of a code boundary (measured:
none in these runs)."""
import pytest
import torch

from lowmem.kernels import microadam as km
from lowmem.optim.parts.cores import CoreContext
from lowmem.optim.parts.microadam import EF_LEVELS, MicroAdamCore, ef_dequantize, ef_quantize
from lowmem.optim.presets import MicroAdamOptions
from lowmem.optim.state.storage import StoragePolicy

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

BETAS = (0.9, 0.999)


def make_core(**overrides):
    options = MicroAdamOptions(**dict(dict(window=3, k_init=0.05, topk_block=512, ef_block=64), **overrides))
    return MicroAdamCore(options, StoragePolicy("fp32"))


def assert_codes_close(ours, ref, numel):
    a = torch.stack([ours & 15, ours >> 4], 1).reshape(-1)[:numel].int()
    b = torch.stack([ref & 15, ref >> 4], 1).reshape(-1)[:numel].int()
    assert (a - b).abs().max() <= 1 and (a != b).float().mean() <= 1e-3


@pytest.mark.parametrize("shape, overrides", [
    ((37, 101), {}),                                          # 3,737 elements: partial last top-k block and bucket
    ((2001,), {"ef_block": 50, "k_init": 0.011}),             # odd count, bucket of 50 (25 pairs, padded to 32)
    ((64, 48), {"topk_block": 1024, "ef_block": 33}),         # odd bucket: the torch quantizer
    ((40, 30), {"state_dtype": "fp32", "transposed": True}),  # fp32 window values, a transposed gradient
])
def test_microadam_matches_core(shape, overrides):
    torch.manual_seed(0)
    transposed = overrides.pop("transposed", False)
    core = make_core(**overrides)
    numel = torch.Size(shape).numel()
    group = {"betas": BETAS, "eps": 1e-8}
    ref, ours = {}, {}
    for _ in range(5):  # window 3: rows are overwritten
        grad = torch.randn(shape[::-1]).T if transposed else torch.randn(shape)
        expected = core.step(grad, ref, group, CoreContext(grad)).direction
        got = core.step(grad, ours, group, CoreContext(grad, fused=True)).direction
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
    corrected = km.ef_correct(grad, codes, low, high, bucket, EF_LEVELS)
    torch.testing.assert_close(corrected, grad + ef_dequantize(codes, low, high, bucket, numel), rtol=1e-6, atol=1e-7)
    ours = (torch.empty_like(codes), torch.empty_like(low), torch.empty_like(high))
    km.ef_quantize_into(values, *ours, bucket, EF_LEVELS)
    assert torch.equal(ours[1], low) and torch.equal(ours[2], high)
    assert_codes_close(ours[0], codes, numel)
