"""Adafactor's factored update (lowmem.kernels.adafactor) under the Triton interpreter: the core's step on the
kernels against its step on the torch path.

Tolerance: rtol 1e-5 on the statistics and the direction (the kernels sum rows and columns in another order
than torch's mean); a bf16 first moment to one bf16 unit (rtol 2^-7, and that much of its largest value)."""
import pytest
import torch

from lowmem.kernels import adafactor as kf
from lowmem.optim.parts.adafactor import COL, ROW, AdafactorCore
from lowmem.optim.parts.cores import FIRST, CoreContext
from lowmem.optim.presets import AdafactorOptions
from lowmem.optim.state.storage import StoragePolicy

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter


def tolerance(moment_dtype, reference):
    """A bf16 first moment cancels: a rounding difference carried from an earlier step keeps that step's scale."""
    if moment_dtype == "bf16":
        return dict(rtol=2 ** -7, atol=2 ** -7 * float(reference.float().abs().max()))
    return dict(rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape, transposed", [((37, 300), False), ((300, 37), False), ((37, 300), True)])
@pytest.mark.parametrize("clip_threshold", [1.0, 0.05])  # 0.05: the clipping divisor is active
@pytest.mark.parametrize("moment_dtype", [None, "fp32", "bf16"])
def test_adafactor_direction_matches_the_torch_path(shape, transposed, clip_threshold, moment_dtype):
    """The paper's relative step and parameter scale (the direction's factor), with no first moment or one
    kept in fp32 or bf16."""
    torch.manual_seed(0)
    rows, _ = shape
    betas = (0.9, 0.999) if moment_dtype else (0.0, 0.999)
    options = AdafactorOptions(betas=betas, clip_threshold=clip_threshold, state_dtype=moment_dtype or "fp32")
    core = AdafactorCore(options, StoragePolicy(options.state_dtype))
    weight = torch.randn(shape) * 0.3
    group = {"betas": betas, "lr": 1.0, "eps": options.eps}
    states = {}, {}
    for _ in range(3):
        grad = torch.randn(shape[::-1]).T if transposed else torch.randn(shape)
        grad = grad * torch.rand(rows, 1) * 3  # rows of different scales: the factors matter
        expected, got = (core.step(grad, state, group, CoreContext(weight, fused=fused))
                         for state, fused in zip(states, (False, True)))
        torch.testing.assert_close(got.direction, expected.direction, **tolerance(moment_dtype, expected.direction))
        assert got.decay_scale == expected.decay_scale
    for key in (ROW, COL):
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=0)
    if moment_dtype is not None:
        torch.testing.assert_close(states[1][FIRST].float(), states[0][FIRST].float(),
                                   **tolerance(moment_dtype, states[0][FIRST]))


def test_vectors_take_the_torch_path():
    """A vector's second moment is not factored: the kernels decline it and the core steps it in torch."""
    assert not kf.handles(torch.zeros(10))
    with pytest.raises(ValueError, match="matrices"):
        kf.adafactor_direction(torch.zeros(10), torch.zeros(1), torch.zeros(10), 0.5, 1e-30, 1.0, 1.0)
    core = AdafactorCore(AdafactorOptions(), StoragePolicy("fp32"))
    grad, weight = torch.randn(10), torch.randn(10)
    group = {"betas": (0.0, 0.999), "lr": 1.0, "eps": 1e-8}
    expected, got = (core.step(grad, {}, group, CoreContext(weight, fused=fused)).direction for fused in (False, True))
    assert torch.equal(got, expected)
