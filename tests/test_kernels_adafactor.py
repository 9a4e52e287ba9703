"""Adafactor's factored update (lowmem.kernels.adafactor) under the Triton interpreter against the core's math.

Tolerance: rtol 1e-5 on the statistics and the direction (the kernels sum rows and columns in another order
than torch's mean); a bf16 first moment to one bf16 unit (rtol 2^-7, and that much of its largest value)."""
import math

import pytest
import torch

from lowmem.kernels import adafactor as kf
from lowmem.optim.parts.adafactor import AdafactorCore
from lowmem.optim.parts.cores import CoreContext
from lowmem.optim.presets import AdafactorOptions
from lowmem.optim.state.storage import StoragePolicy

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter


def tolerance(moment_dtype, reference):
    """A bf16 first moment cancels: a rounding difference carried from an earlier step keeps that step's scale."""
    if moment_dtype == torch.bfloat16:
        return dict(rtol=2 ** -7, atol=2 ** -7 * float(reference.float().abs().max()))
    return dict(rtol=1e-5, atol=1e-9)


def beta2_at(step, decay_rate=-0.8):
    return 1.0 - step ** decay_rate


@pytest.mark.parametrize("shape, transposed", [((37, 300), False), ((300, 37), False), ((37, 300), True)])
@pytest.mark.parametrize("clip_threshold", [1.0, 0.05])  # 0.05: the clipping divisor is active
@pytest.mark.parametrize("moment_dtype", [None, torch.float32, torch.bfloat16])
def test_adafactor_direction_matches_reference(shape, transposed, clip_threshold, moment_dtype):
    torch.manual_seed(0)
    rows, cols = shape
    stats = [(torch.zeros(rows), torch.zeros(cols)) for _ in range(2)]
    moments = [torch.zeros(shape, dtype=moment_dtype) if moment_dtype else None for _ in range(2)]
    for step in range(1, 4):
        grad = torch.randn(shape[::-1]).T if transposed else torch.randn(shape)
        grad = grad * torch.rand(rows, 1) * 3  # rows of different scales: the factors matter
        factor = 0.01 / math.sqrt(step)
        args = (beta2_at(step), 1e-30, clip_threshold, factor)
        expected = kf.reference_adafactor_direction(grad, *stats[0], *args, moments[0], 0.9)
        got = kf.adafactor_direction(grad, *stats[1], *args, moments[1], 0.9)
        torch.testing.assert_close(got, expected, **tolerance(moment_dtype, expected))
    for ours, ref in zip(stats[1], stats[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    if moment_dtype is not None:
        torch.testing.assert_close(moments[1].float(), moments[0].float(), **tolerance(moment_dtype, moments[0]))


def test_matches_the_adafactor_core():
    """Driven with the core's own state and step factor, the kernels give the core's direction."""
    torch.manual_seed(1)
    options = AdafactorOptions()
    core = AdafactorCore(options, StoragePolicy("fp32"))
    weight = torch.randn(64, 200)
    state, ours = {}, {}
    group = {"betas": options.betas, "lr": 1.0, "eps": options.eps}
    for step in range(1, 4):
        grad = torch.randn(64, 200)
        expected = core.step(grad, state, group, CoreContext(weight))
        if not ours:
            ours = {"row": torch.zeros(64), "col": torch.zeros(200)}
        factor = core._step_factor(step, weight)
        got = kf.adafactor_direction(grad, ours["row"], ours["col"], 1.0 - step ** options.decay_rate,
                                     options.adafactor_eps[0], options.clip_threshold, factor)
        torch.testing.assert_close(got, expected.direction, rtol=1e-5, atol=1e-9)
        assert expected.decay_scale == factor


def test_vectors_are_left_to_the_reference():
    assert not kf.handles(torch.zeros(10))
    with pytest.raises(ValueError, match="matrices"):
        kf.adafactor_direction(torch.zeros(10), torch.zeros(1), torch.zeros(10), 0.5, 1e-30, 1.0, 1.0)
