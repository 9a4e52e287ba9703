"""The fused Adam kernels (lowmem.kernels.adam) under the Triton interpreter against the optimizer's own code.

Tolerances. fp32 math differs from the reference by rounding only (torch fuses some multiply-adds, the kernel
divides with div_rn and takes sqrt_rn): fp32 weights and moments agree to rtol 1e-5, bf16 ones to one bf16
unit in the last place (rtol 2^-7); moments also to that much of their largest value (absolute),
since the first moment cancels and a rounding difference carried from an earlier step stays at its old scale. Quantized moments: the codes are the reference's except where a value sits within a
rounding error of the midpoint between two map values; such a code may differ by one level. Measured here
10 steps on 2^20 elements with the states re-synchronized after each step: int8 9 codes of 20,971,520
(4e-7), int4 none. The tests allow a fraction of 1e-3, each off by one level, and the absmax to rtol 1e-5.
"""
import math

import pytest
import torch

from lowmem.kernels import adam as ka
from lowmem.optim.parts.cores import FIRST, SECOND
from lowmem.optim.state import quantization as q
from lowmem.optim.state.storage import BF16, FP32, QuantizedStorage, StoragePolicy

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

STORAGES = {"fp32": FP32, "bf16": BF16, "int8": QuantizedStorage("int8"), "int4": QuantizedStorage("int4")}
SHAPE = (61, 83)  # 5,063 elements: no multiple of any block, 2-3 programs per launch
BETAS = (0.9, 0.999)


def fresh_state(storage, shape, device="cpu"):
    state = {}
    storage.zeros(state, FIRST, torch.Size(shape), device, "signed")
    storage.zeros(state, SECOND, torch.Size(shape), device, "unsigned")
    return state


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


@pytest.mark.parametrize("state_dtype", list(STORAGES))
@pytest.mark.parametrize("weight_dtype, convention, contiguous", [
    (torch.float32, "galore", True), (torch.bfloat16, "torch", True), (torch.float32, "torch", False)])
def test_adam_update_matches_reference(state_dtype, weight_dtype, convention, contiguous):
    """Each storage with fp32 and bf16 weights, both eps / decay conventions, a transposed weight and gradient."""
    torch.manual_seed(0)
    storage = STORAGES[state_dtype]
    eps_scaled, decay_after = convention == "torch", convention == "galore"
    ours_state, ref_state = fresh_state(storage, SHAPE), fresh_state(storage, SHAPE)
    ours = (torch.randn(SHAPE) if contiguous else transposed(SHAPE)).to(weight_dtype)
    ref = ours.clone()
    for step in range(1, 4):
        grad = torch.randn(SHAPE) if contiguous else transposed(SHAPE, weight_dtype)
        ka.reference_adam_update(ref, grad, ref_state, storage, step, 1e-2, *BETAS, 1e-8, eps_scaled, 1e-3, decay_after)
        ka.adam_update(ours, grad, ours_state, storage, step, 1e-2, *BETAS, 1e-8, eps_scaled, 1e-3, decay_after)
    torch.testing.assert_close(ours.float(), ref.float(), **weight_tolerance(weight_dtype, storage, 1e-2))
    assert_states_close(ours_state, ref_state, storage, ours.numel())


@pytest.mark.parametrize("state_dtype", list(STORAGES))
@pytest.mark.parametrize("eps_scaled", [False, True])
def test_adam_direction_matches_reference(state_dtype, eps_scaled):
    """The projected core's update: moments and the bias-corrected direction of a core gradient."""
    torch.manual_seed(1)
    storage = STORAGES[state_dtype]
    shape = (24, 333)  # a rank-24 core of a 333-wide weight: 7,992 elements
    ours_state, ref_state = fresh_state(storage, shape), fresh_state(storage, shape)
    for step in range(1, 4):
        grad = torch.randn(shape) * 10.0 ** -step  # shrinking gradients: the moments' scales drift apart
        expected = ka.reference_adam_direction(grad, ref_state, storage, step, *BETAS, 1e-6, eps_scaled)
        got = ka.adam_direction(grad, ours_state, storage, step, *BETAS, 1e-6, eps_scaled)
        # quantized moments decode to values one level apart at a differing code: compare through the decoded state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert_states_close(ours_state, ref_state, storage, math.prod(shape))


def test_vector_with_strided_gradient():
    """1-D weights (norms, biases) and a gradient read with a stride."""
    torch.manual_seed(2)
    storage = STORAGES["int8"]
    base = torch.randn(2 * 5000)
    grad = base[::2]
    ours = torch.randn(5000)
    ref = ours.clone()
    ours_state, ref_state = fresh_state(storage, (5000,)), fresh_state(storage, (5000,))
    ka.reference_adam_update(ref, grad, ref_state, storage, 1, 1e-3, *BETAS, 1e-8, True, 0.0)
    ka.adam_update(ours, grad, ours_state, storage, 1, 1e-3, *BETAS, 1e-8, True, 0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert_states_close(ours_state, ref_state, storage, 5000)


def test_code_ties_are_rare():
    """A longer run with heavy-tailed gradients (many small moments, where the dynamic map is finest)."""
    torch.manual_seed(3)
    for name in ("int8", "int4"):
        storage = STORAGES[name]
        numel = 2 ** 15
        ours_state, ref_state = fresh_state(storage, (numel,)), fresh_state(storage, (numel,))
        for step in range(1, 3):
            grad = torch.randn(numel) * torch.rand(numel) ** 4
            ka.reference_adam_direction(grad, ref_state, storage, step, *BETAS, 1e-8, True)
            ka.adam_direction(grad, ours_state, storage, step, *BETAS, 1e-8, True)
        assert_states_close(ours_state, ref_state, storage, numel)


def test_rank1_int4_is_left_to_the_reference():
    storage = QuantizedStorage("int4", rank1_second_moment=True)
    assert not ka.handles(storage, (64, 128))
    assert ka.handles(storage, (8192,))
    with pytest.raises(ValueError, match="rank-1"):
        ka.adam_direction(torch.randn(64, 128), {}, storage, 1, *BETAS, 1e-8, True)


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "bf16"])
def test_multi_tensor_launch_matches_per_tensor_reference(state_dtype):
    """Weights of mixed sizes (under 4096 elements the policy keeps fp32 moments: a second kind), dtypes (a
    third), step counts, lr and decay, in one call."""
    torch.manual_seed(4)
    policy = StoragePolicy(state_dtype)
    shapes = [(61, 83), (64,), (70, 70), (33, 129), (4097,), (3, 5), (5000,)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32]
    storages = [policy.for_shape(s) for s in shapes]
    weights = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    refs = [w.clone() for w in weights]
    ours_states = [fresh_state(st, s) for st, s in zip(storages, shapes)]
    ref_states = [fresh_state(st, s) for st, s in zip(storages, shapes)]
    lrs = [1e-2 * (i + 1) for i in range(len(shapes))]
    decays = [0.0 if i % 2 else 1e-3 for i in range(len(shapes))]
    for update in range(2):
        steps = [update + 1 + i % 3 for i in range(len(shapes))]  # weights whose moments restarted at other times
        grads = [torch.randn(s) for s in shapes]
        ka.adam_update_multi(weights, grads, ours_states, storages, steps, lrs, decays, *BETAS, 1e-8, True)
        for w, g, st, s, storage, lr, decay in zip(refs, grads, ref_states, steps, storages, lrs, decays):
            ka.reference_adam_update(w, g, st, storage, s, lr, *BETAS, 1e-8, True, decay)
    for ours, ref, s1, s2, storage, lr in zip(weights, refs, ours_states, ref_states, storages, lrs):
        torch.testing.assert_close(ours.float(), ref.float(), **weight_tolerance(ours.dtype, storage, lr))
        assert_states_close(s1, s2, storage, ours.numel())


def test_multi_tensor_directions():
    torch.manual_seed(5)
    policy = StoragePolicy("int4")
    shapes = [(16, 512), (8, 100), (32, 300)]
    storages = [policy.for_shape(s) for s in shapes]
    ours_states = [fresh_state(st, s) for st, s in zip(storages, shapes)]
    ref_states = [fresh_state(st, s) for st, s in zip(storages, shapes)]
    for step in (1, 2):
        grads = [torch.randn(s) for s in shapes]
        got = ka.adam_direction_multi(grads, ours_states, storages, [step] * 3, *BETAS, 1e-6, False)
        for g, st, storage, d in zip(grads, ref_states, storages, got):
            torch.testing.assert_close(d, ka.reference_adam_direction(g, st, storage, step, *BETAS, 1e-6, False),
                                       rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_brackets_and_is_unbiased():
    """bf16 weights with stochastic rounding: each lands on one of the two bf16 neighbours of the fp32 result,
    rounding up in magnitude as often as the dropped fraction says, and the seed decides which."""
    torch.manual_seed(6)
    numel = 1 << 14
    weight = torch.full((numel,), 1.0 + 2 ** -7).bfloat16()  # grid spacing 2^-7 near 1
    grad = torch.randn(numel)
    exact = weight.float()
    ka.reference_adam_update(exact, grad, fresh_state(FP32, (numel,)), FP32, 1, 1e-3, *BETAS, 1e-8, True)
    runs = []
    for seed in (11, 11, 12):
        w = weight.clone()
        ka.adam_update(w, grad, fresh_state(FP32, (numel,)), FP32, 1, 1e-3, *BETAS, 1e-8, True,
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


def test_foreach_reference_is_adam_math():
    """The reference path's batched form gives exactly the per-tensor reference."""
    torch.manual_seed(7)
    shapes = [(7, 9), (100,), (3, 4)]
    for eps_scaled in (False, True):
        grads = [torch.randn(s) for s in shapes]
        states = [fresh_state(FP32, s) for s in shapes]
        refs = [fresh_state(FP32, s) for s in shapes]
        steps = [1, 5, 2]
        got = ka.foreach_adam_direction(grads, [s[FIRST] for s in states], [s[SECOND] for s in states], steps,
                                        *BETAS, 1e-8, eps_scaled)
        for g, st, step, d, ours in zip(grads, refs, steps, got, states):
            assert torch.equal(d, ka.reference_adam_direction(g, st, FP32, step, *BETAS, 1e-8, eps_scaled))
            assert torch.equal(ours[FIRST], st[FIRST]) and torch.equal(ours[SECOND], st[SECOND])


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
    encode[(1,)](x, out, ka._map_tables(bits, kind, "cpu")[1], x.numel(), BITS=bits, BLOCK=1024)
    assert torch.equal(out, qmap.encode(x).int())
