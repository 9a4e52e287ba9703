"""The CPU quantized-Adam kernel (lowmem.kernels.cpu_adam) against the pure-torch path it replaces: the same
codes and scales bit for bit, weights to float rounding (torch's CPU sqrt is not always correctly rounded, the
kernel's is), for int8 and int4, whole blocks and a short last block, both Adam conventions, the direct weight
update (dense weights) and the direction (a projected core)."""
from __future__ import annotations

import pytest
import torch

from lowmem.kernels import cpu_adam
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import AdamW4bitOptions, AdamW8bitOptions, GaloreOptions

pytestmark = pytest.mark.skipif(not cpu_adam.available(), reason="the CPU kernel cannot be built here")

# 64 x 100: whole blocks (int8 and int4); 33 x 129: a short last block; (10,): below the quantization threshold
SHAPES = [(64, 100), (33, 129), (10,)]


def run(options, kernels, steps=8, shapes=SHAPES, projected=False):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    group = {"params": params, "projected": projected}
    opt = PipelineOptimizer([group], type(options)(**{**options.__dict__, "kernels": kernels}))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.1
        opt.step()
    return params, opt


def assert_same_run(options, **kwargs):
    ours, ours_opt = run(options, "auto", **kwargs)
    theirs, their_opt = run(options, "torch", **kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        mine, reference = ours_opt.state[a], their_opt.state[b]
        assert mine.keys() == reference.keys()
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), key  # codes and scales bit for bit
            else:
                assert mine[key] == value


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = cpu_adam._run

    def counted(*args, **kwargs):
        calls.append(args[-1])  # what the kernel writes: a direction or a weight
        return original(*args, **kwargs)

    monkeypatch.setattr(cpu_adam, "_run", counted)
    return calls


@pytest.mark.parametrize("options", [
    AdamW8bitOptions(lr=1e-2, weight_decay=0.1),
    AdamW4bitOptions(lr=1e-2, weight_decay=0.1),
    AdamW8bitOptions(lr=1e-2, weight_decay=0.1, adam_convention="galore"),
    AdamW4bitOptions(lr=1e-2, adam_convention="galore", eps=1e-6),
], ids=["int8", "int4", "int8-galore", "int4-galore"])
def test_the_kernel_updates_dense_weights_as_the_torch_path_does(options, kernel_calls):
    assert_same_run(options)
    assert kernel_calls and cpu_adam.DIRECTION not in kernel_calls


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_the_kernel_steps_projected_cores_as_the_torch_path_does(state_dtype, kernel_calls):
    """A rank-96 core of a 96 x 200 weight (19200 elements: quantized): the kernel writes the direction."""
    assert_same_run(GaloreOptions(rank=96, update_gap=4, state_dtype=state_dtype), shapes=[(96, 200), (300, 96)],
                    projected=True)
    assert cpu_adam.DIRECTION in kernel_calls


def test_kernels_torch_keeps_the_torch_path(kernel_calls):
    run(AdamW8bitOptions(), "torch", steps=2)
    assert not kernel_calls
