"""Blockwise 8-bit and 4-bit state quantization: maps, round-trip error bounds, packing, the zero-point case."""
from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.state import quantization as q
from lowmem.optim.state.storage import QuantizedStorage, StoragePolicy


def slow_round_trip(x: torch.Tensor, values: torch.Tensor, block: int) -> torch.Tensor:
    """Written out: per block, scale by the absmax, pick the nearest map value by exhaustive search."""
    out = torch.empty_like(x)
    for start in range(0, x.numel(), block):
        chunk = x[start:start + block]
        scale = chunk.abs().max()
        normalized = chunk / scale if scale > 0 else chunk
        nearest = (normalized[:, None] - values[None, :]).abs().argmin(dim=1)
        out[start:start + block] = values[nearest] * scale
    return out


def worst_rounding_error(values: torch.Tensor, low: float, high: float) -> float:
    """The worst nearest-value error of a normalized value in [low, high]: half the largest gap between
    neighbouring map values, or the whole distance from an end of the range to the map value nearest it
    (below the zero-free map's 1/16 there is no smaller value to round to)."""
    inside = values[(values >= low) & (values <= high)].unique()
    half_gaps = float((inside[1:] - inside[:-1]).max()) / 2
    return max(half_gaps, float(inside[0]) - low, high - float(inside[-1]))


def test_maps_are_bitsandbytes_dynamic_maps_and_the_4bit_second_moment_map_has_no_zero():
    import bitsandbytes.functional as F

    for signed in (True, False):
        assert torch.equal(q.state_map(8, "signed" if signed else "unsigned").values,
                           F.create_dynamic_map(signed=signed, max_exponent_bits=7, total_bits=8))
    ours = q.state_map(4, "signed").values
    theirs = F.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    assert torch.equal(ours.unique(), theirs.unique())  # bnb pads the 4-bit table to 256 entries with zeros
    assert len(ours) == 16 and ours.min() < 0
    v = q.state_map(4, "unsigned").values
    assert len(v) == 16 and float(v.min()) == 1 / 16 and float(v.max()) == 1.0 and not (v == 0).any()


@pytest.mark.parametrize("bits, kind, block", [(8, "signed", 256), (8, "unsigned", 256), (4, "signed", 128),
                                               (4, "unsigned", 128)])
@pytest.mark.parametrize("numel", [4096, 1000, 257])
def test_round_trip_matches_the_slow_reference_within_the_maps_error(bits, kind, block, numel):
    g = torch.Generator().manual_seed(numel + bits)
    x = torch.randn(numel, generator=g) * torch.logspace(-4, 0, numel)[torch.randperm(numel, generator=g)]
    if kind == "unsigned":
        x = x.abs()
    qmap = q.state_map(bits, kind)
    absmax = q.block_absmax(x, block)
    assert absmax.numel() == math.ceil(numel / block)  # a short last block has its own scale
    scales = q.expand_blocks(absmax, block, numel)
    codes = q.quantize(x, qmap, scales)
    assert codes.dtype == torch.uint8 and codes.numel() == q.code_bytes(numel, bits)
    back = q.dequantize(codes, qmap, scales, numel)
    reference = slow_round_trip(x, qmap.values, block)
    torch.testing.assert_close(back, reference, atol=1e-7, rtol=1e-6)
    low = 0.0 if kind == "unsigned" else -1.0
    bound = worst_rounding_error(qmap.values, low, 1.0)
    assert ((back - x).abs() <= bound * scales * (1 + 1e-5)).all()
    # a block whose largest magnitude is positive keeps it exactly (1.0 is a map value, -1.0 is not)
    for start in range(0, numel, block):
        i = int(x[start:start + block].abs().argmax()) + start
        if x[i] > 0:
            assert back[i] == pytest.approx(float(x[i]), rel=1e-6)


def test_nibble_packing_round_trips_odd_lengths():
    codes = torch.randint(0, 16, (11,), dtype=torch.uint8)
    packed = q.pack_nibbles(codes)
    assert packed.numel() == 6
    assert torch.equal(q.unpack_nibbles(packed, 11), codes)
    assert int(packed[0]) == int(codes[0]) | (int(codes[1]) << 4)


def adam_update(m, v, eps=1e-8):
    return m / (v.sqrt() + eps)


def test_zero_free_map_keeps_tiny_second_moments_from_blowing_up_the_update():
    """One block: a large second moment (1e-2) beside tiny ones (1e-12) whose first moments are consistent
    with them (1e-6). A map containing 0 sends the tiny v to 0 and m / sqrt(v) to m / eps = 100; the
    zero-free map sends them to absmax / 16, so every update stays finite and at most the fp32 one."""
    v = torch.full((128,), 1e-12)
    v[5] = 1e-2
    m = torch.full((128,), 1e-6)
    m[5] = 0.1
    exact = adam_update(m, v)
    storage = QuantizedStorage("int4")
    state: dict = {}
    storage.zeros(state, "v", v.shape, v.device, "unsigned")
    storage.write(state, "v", v, "unsigned")
    storage.zeros(state, "m", m.shape, m.device, "signed")
    storage.write(state, "m", m, "signed")
    quantized = adam_update(storage.read(state, "m", m.shape, "signed"), storage.read(state, "v", v.shape, "unsigned"))
    assert torch.isfinite(quantized).all()
    assert (quantized.abs() <= exact.abs() * (1 + 1e-6)).all()
    assert quantized[5] == pytest.approx(float(exact[5]), rel=1e-5)  # the block's absmax is exact
    with_zero = q.dynamic_map(signed=False, max_exponent_bits=3, total_bits=4)
    nearest = torch.bucketize(v / v.max(), (with_zero[1:] + with_zero[:-1]) / 2)  # plain round-to-nearest
    assert adam_update(m, with_zero[nearest] * v.max()).max() > 50  # what the zero-free map prevents


@pytest.mark.parametrize("bits", [8, 4])
def test_a_positive_second_moment_never_encodes_to_zero(bits):
    """The unsigned 8-bit map has 0 as its smallest code: round-to-nearest would store v below about 1.6e-7 x
    the block's absmax as 0, and the next update beside a non-zero m would be m / eps. Every positive value gets a
    positive code (at least the smallest positive map value), an exact 0 stays 0, on both encoders (the CPU
    prefix table and bucketize)."""
    qmap = q.state_map(bits, "unsigned")
    smallest = float(qmap.values[qmap.values > 0].min())
    x = torch.tensor([0.0, 1e-30, 1e-12, 1e-9, smallest / 4, smallest / 2, smallest, 0.5, 1.0])
    for codes in (qmap.encode(x), torch.bucketize(x, qmap.midpoints, out_int32=True).to(torch.uint8)):
        decoded = qmap.decode(codes)
        assert decoded[0] == float(qmap.values[0])  # 0 where the map has it (int8); the zero-free int4 map has none
        assert (decoded[1:] >= smallest).all()
    v = torch.full((256,), 1e-14)
    v[0], v[1] = 1.0, 0.0
    m = torch.full((256,), 1e-7)
    m[1] = 0.0
    storage = QuantizedStorage("int8")
    state: dict = {}
    storage.zeros(state, "v", v.shape, v.device, "unsigned")
    storage.write(state, "v", v, "unsigned")
    back = storage.read(state, "v", v.shape, "unsigned")
    assert back[1] == 0 and (back[2:] > 0).all()
    assert adam_update(m, back).abs().max() <= 1.0 + 1e-6  # bounded by the bias-free step's |m| / sqrt(v) <= 1


def test_rank1_normalization_scales_each_entry_by_its_row_and_column_max():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(96, 80, generator=g) ** 4
    storage = StoragePolicy("int4", rank1_second_moment=True).storage
    state: dict = {}
    storage.zeros(state, "v", v.shape, v.device, "unsigned")
    storage.write(state, "v", v, "unsigned")
    assert set(state) == {"v", "v_row", "v_col"}
    torch.testing.assert_close(state["v_row"], v.max(dim=1).values)
    torch.testing.assert_close(state["v_col"], v.max(dim=0).values)
    back = storage.read(state, "v", v.shape, "unsigned")
    scale = torch.minimum(v.max(dim=1).values[:, None], v.max(dim=0).values[None, :])
    # half a step of the 16-level linear map, or up to 1/16 for entries below its smallest value
    assert ((back - v).abs() <= torch.where(v < scale / 16, scale / 16, scale / 32) * (1 + 1e-6)).all()
    assert storage.nbytes((96, 80), "unsigned") == 96 * 80 // 2 + 4 * (96 + 80)
    assert storage.nbytes((96, 80), "signed") == 96 * 80 // 2 + 4 * (96 * 80 // 128)


def test_small_tensors_stay_fp32():
    policy = StoragePolicy("int8")
    assert policy.for_shape((63, 65)).name == "fp32"  # 4095 elements
    assert policy.for_shape((64, 64)).name == "int8"


@pytest.mark.parametrize("bits, kind", [(8, "signed"), (8, "unsigned"), (4, "signed"), (4, "unsigned")])
def test_cpu_encode_gives_the_nearest_code_as_a_plain_search_does(bits, kind):
    from lowmem.optim.state.quantization import state_map

    qmap = state_map(bits, kind)
    mids = qmap.midpoints
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    x = torch.cat([torch.randn(50_000).clamp(-1, 1) * s for s in (1.0, 1e-3, 1e-7)]
                  + [mids, up, down, qmap.values, torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    if kind == "unsigned":
        x = x.abs()
    slow = torch.bucketize(x, mids, out_int32=True)  # the definition: midpoints strictly below each value
    assert torch.equal(qmap.encode(x).long(), slow.long())
    random = x[:150_000]  # and away from the rounded midpoints, it is the nearest value
    nearest = (random[:, None] - qmap.values[None, :]).abs().min(1).values
    distance = (qmap.values[qmap.encode(random).long()] - random).abs()
    positive_to_zero = (random > 0) & (qmap.values[qmap.encode(random).long()] == 0)
    assert kind == "signed" or not positive_to_zero.any()  # a tiny first moment may be 0; a second moment not
    # nearest, except that a positive value below half the smallest positive code takes that code, not 0
    smallest = float(qmap.values[qmap.values > 0].min())
    lifted = (random > 0) & (random < smallest / 2) & (kind == "unsigned") & (qmap.values[0] == 0)
    assert (distance[~lifted] <= nearest[~lifted] + 1e-7).all()
    assert (distance[lifted] <= smallest).all()


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
@pytest.mark.parametrize("rank1", [False, True])
def test_fresh_moments_are_what_quantizing_zeros_stores(state_dtype, rank1):
    """zeros() writes the codes and scales directly; they equal the stored form of a zero tensor (an odd int4
    tail, a short last block, the rank-1 second moment)."""
    storage = QuantizedStorage(state_dtype, rank1)
    for shape in [(64, 100), (33, 129), (4097,)]:
        for kind in ("signed", "unsigned"):
            fresh, stored = {}, {}
            storage.zeros(fresh, "m", torch.Size(shape), torch.device("cpu"), kind)
            storage._store(stored, "m", torch.zeros(math.prod(shape)), torch.Size(shape), kind)
            assert fresh.keys() == stored.keys()
            for key, value in stored.items():
                assert torch.equal(fresh[key], value) and fresh[key].dtype == value.dtype, (shape, kind, key)
