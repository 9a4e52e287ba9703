"""The fused Adam kernels (lowmem.kernels.adam) under the Triton interpreter against the optimizer's torch path:
the same optimizer or Adam core with kernels on and off, stepped on the same gradients.

Tolerances. fp32 math differs from the torch path by rounding only (torch fuses some multiply-adds, the kernel
divides with div_rn and takes sqrt_rn): fp32 weights and moments agree to rtol 1e-5, bf16 ones to one bf16
unit in the last place (rtol 2^-7); moments also to that much of their largest value (absolute), since the
first moment cancels and a rounding difference carried from an earlier step stays at its old scale.
Quantized moments: the codes are the torch path's except where a value sits within a rounding error of the
midpoint between two map values; such a code may differ by one level. Measured here
10 steps on 2^20 elements with the states re-synchronized after each step: int8 9 codes of 20,971,520
(4e-7), int4 none. The tests allow a fraction of 1e-3, each off by one level, and the absmax to rtol 1e-5.
"""
import math

import pytest
import torch

from lowmem.kernels import adam as ka
from lowmem.optim.parts.cores import FIRST, SECOND, AdamCore, CoreContext, kernel_map
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import AdamW8bitOptions, GaloreOptions
from lowmem.optim.state import quantization as q
from lowmem.optim.state.storage import BF16, QuantizedStorage, StoragePolicy

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

STATE_DTYPES = ["fp32", "bf16", "int8", "int4"]
SHAPE = (61, 83)  # 5,063 elements: no multiple of any block, 2-3 programs per launch
BETAS = (0.9, 0.999)


def codes(state, key, storage, numel):
    if storage.bits == 4:
        return q.unpack_nibbles(state[key], numel).int()
    return state[key].int()


def assert_states_close(kernel, reference, storage, numel):
    for key in (FIRST, SECOND):
        if isinstance(storage, QuantizedStorage):
            ours, theirs = codes(kernel, key, storage, numel), codes(reference, key, storage, numel)
            differ = ours != theirs
            assert differ.float().mean() <= 1e-3, f"{key}: {int(differ.sum())} of {numel} codes differ"
            assert (ours - theirs).abs().max() <= 1
            torch.testing.assert_close(kernel[key + "_absmax"], reference[key + "_absmax"], rtol=1e-5, atol=0)
        else:  # the first moment cancels: a rounding difference carried from an earlier step is relative to its scale
            scale = float(reference[key].abs().max())
            rtol = 2 ** -7 if storage is BF16 else 1e-5
            torch.testing.assert_close(kernel[key].float(), reference[key].float(), rtol=rtol, atol=rtol * scale)


def weight_tolerance(dtype, storage, lr):
    """bf16 weights: one unit in the last place. bf16 moments: a moment one bf16 unit off moves the direction
    (about 1 in size) by 2^-8, so the weight by lr 2^-8 per step."""
    atol = 3 * lr * 2 ** -8 if storage is BF16 else 1e-7
    return dict(rtol=2 ** -7, atol=max(atol, 1e-6)) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=atol)


def transposed(shape, dtype=torch.float32, scale=1.0):
    """A non-contiguous tensor of `shape`: the transpose of a contiguous one."""
    return (torch.randn(shape[::-1]) * scale).to(dtype).T


def adam_core(state_dtype, convention="torch", rank1=False):
    """The pipeline's Adam core on its own (eps_scaled: the torch convention)."""
    return AdamCore(GaloreOptions(adam_convention=convention), StoragePolicy(state_dtype, rank1))


def core_directions(core, grad, states, eps):
    """The core's direction of `grad` on the torch path (states[0]) and on the kernels (states[1])."""
    group = {"betas": BETAS, "eps": eps}
    return [core.step(grad, state, group, CoreContext(grad, fused=fused)).direction
            for state, fused in zip(states, (False, True))]


def dense_optimizers(weight, per_weight=True, **options):
    """The same dense weight stepped by AdamW options on the kernels and on the torch path: a function taking
    the gradient, and the two (optimizer, parameter) pairs."""
    pairs = []
    for kernels in ("triton", "torch"):
        p = torch.nn.Parameter(weight.clone())
        pairs.append((PipelineOptimizer([p], AdamW8bitOptions(**options, kernels=kernels)), p))

    def step(grad):
        for opt, p in pairs:
            p.grad = grad  # read, never written
            if per_weight or opt.options.kernels == "torch":  # the torch path: the per-weight rule
                opt.begin_update()
                opt.step_param(p)
            else:
                opt.step()
    return step, pairs


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("weight_dtype, convention, contiguous", [
    (torch.float32, "galore", True), (torch.bfloat16, "torch", True), (torch.float32, "torch", False)])
@pytest.mark.parametrize("per_weight", [True, False], ids=["per-weight", "batched"])
def test_adam_update_matches_the_torch_path(state_dtype, weight_dtype, convention, contiguous, per_weight):
    """Each storage with fp32 and bf16 weights, both eps / decay conventions, a transposed weight and gradient;
    weight by weight (adam_update) and batched by step() (adam_update_multi, which writes bf16 weights itself;
    the transposed weight steps alone)."""
    torch.manual_seed(0)
    weight = (torch.randn(SHAPE) if contiguous else transposed(SHAPE)).to(weight_dtype)
    step, ((ours_opt, ours), (ref_opt, ref)) = dense_optimizers(
        weight, per_weight, state_dtype=state_dtype, adam_convention=convention, lr=1e-2, eps=1e-8,
        weight_decay=0.1)
    for _ in range(3):
        step(torch.randn(SHAPE).to(weight_dtype) if contiguous else transposed(SHAPE, weight_dtype))
    storage = ref_opt.policy.for_shape(SHAPE)
    torch.testing.assert_close(ours.float(), ref.float(), **weight_tolerance(weight_dtype, storage, 1e-2))
    assert_states_close(ours_opt.state[ours], ref_opt.state[ref], storage, ours.numel())


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("convention", ["galore", "torch"])
def test_adam_direction_matches_the_torch_path(state_dtype, convention):
    """The projected core's update: moments and the bias-corrected direction of a core gradient."""
    torch.manual_seed(1)
    core = adam_core(state_dtype, convention)
    shape = (24, 333)  # a rank-24 core of a 333-wide weight: 7,992 elements
    states = {}, {}
    for step in range(1, 4):
        grad = torch.randn(shape) * 10.0 ** -step  # shrinking gradients: the moments' scales drift apart
        expected, got = core_directions(core, grad, states, 1e-6)
        # quantized moments decode to values one level apart at a differing code: compare through the decoded state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert_states_close(states[1], states[0], core.policy.for_shape(shape), math.prod(shape))


def test_vector_with_strided_gradient():
    """1-D weights (norms, biases) and a gradient read with a stride."""
    torch.manual_seed(2)
    step, ((ours_opt, ours), (ref_opt, ref)) = dense_optimizers(torch.randn(5000), lr=1e-3, eps=1e-8)
    step(torch.randn(2 * 5000)[::2])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert_states_close(ours_opt.state[ours], ref_opt.state[ref], ref_opt.policy.storage, 5000)


def test_code_ties_are_rare():
    """A longer run with heavy-tailed gradients (many small moments, where the dynamic map is finest)."""
    torch.manual_seed(3)
    for name in ("int8", "int4"):
        core = adam_core(name)
        numel = 2 ** 15
        states = {}, {}
        for _ in range(2):
            core_directions(core, torch.randn(numel) * torch.rand(numel) ** 4, states, 1e-8)
        assert_states_close(states[1], states[0], core.policy.storage, numel)


def test_rank1_int4_is_left_to_the_torch_path():
    core = adam_core("int4", rank1=True)
    assert not core.fusable(torch.Size((64, 128)))
    assert core.fusable(torch.Size((8192,)))
    expected, got = core_directions(core, torch.randn(64, 128), ({}, {}), 1e-8)
    assert torch.equal(got, expected)


def test_stochastic_rounding_brackets_and_is_unbiased():
    """bf16 weights with stochastic rounding: each lands on one of the two bf16 neighbours of the fp32 result
    of the torch path, rounding up in magnitude as often as the dropped fraction says, and the seed decides
    which."""
    torch.manual_seed(6)
    numel = 1 << 14
    weight = torch.full((numel,), 1.0 + 2 ** -7).bfloat16()  # grid spacing 2^-7 near 1
    grad = torch.randn(numel)
    exact = torch.nn.Parameter(weight.float())  # the torch path's fp32 result
    exact.grad = grad
    PipelineOptimizer([exact], AdamW8bitOptions(state_dtype="fp32", lr=1e-3, kernels="torch")).step()
    exact = exact.detach()
    runs = []
    for seed in (11, 11, 12):
        w = weight.clone()
        ka.adam_update(w, grad, ka.Moments(torch.zeros(numel), torch.zeros(numel)), 1, 1e-3, *BETAS, 1e-8, True,
                       stochastic_rounding=True, seed=seed)
        runs.append(w)
    toward_zero = (exact.view(torch.int32) & -65536).view(torch.float32)  # bf16 neighbours: drop 16 bits...
    away = (toward_zero.view(torch.int32) + 65536).view(torch.float32)  # ...or carry one into the kept ones
    got = runs[0].float()
    assert bool(((got == toward_zero) | (got == away)).all())
    fraction = ((exact.view(torch.int32) & 0xFFFF).double() / 65536)
    rounded_up = (got == away).double()
    sigma = math.sqrt(float((fraction * (1 - fraction)).sum())) / numel
    assert abs(float(rounded_up.mean() - fraction.mean())) < 5 * sigma
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("bits, kind", [(8, "signed"), (8, "unsigned"), (4, "signed"), (4, "unsigned")])
def test_encoding_matches_bucketize_at_exact_midpoints(bits, kind):
    """The kernels' code search on every map value, every midpoint (an exact tie) and random values."""
    import triton
    import triton.language as tl

    @triton.jit
    def encode(x_ptr, out_ptr, mid_ptr, n, BITS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + offs, ka._encode(x, mid_ptr, BITS), mask=offs < n)

    qmap = q.state_map(bits, kind)
    low = -1.0 if kind == "signed" else 0.0
    x = torch.cat([qmap.values, qmap.midpoints, torch.rand(500) * (1 - low) + low, torch.tensor([low, 1.0])])
    out = torch.empty(x.numel(), dtype=torch.int32)
    encode[(1,)](x, out, kernel_map(bits, kind, "cpu")[1], x.numel(), BITS=bits, BLOCK=1024)
    assert torch.equal(out, qmap.encode(x).int())
