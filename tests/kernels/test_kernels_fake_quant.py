"""lowmem.kernels.fake_quant (interpreted) against lowmem.model.quant.fake's reference: every format, row-crossing groups
and a padded tail, outliers, bf16; the fake-quantized linear's forward and backward on the kernels; dispatch."""
import pytest
import torch

from lowmem.kernels import fake_quant as fused
from lowmem.model.config import QuantConfig
from lowmem.model.quant import fake as ref
from lowmem.model.quant.linear import FakeQuantLinear

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

REFERENCES = {
    ("weight", "int4"): lambda x, gs, keep: ref.int4_weight(x, gs),
    ("activation", "int4"): ref.int4_activation,
    ("weight", "fp4"): ref.fp4_e1m2,
    ("activation", "fp4"): ref.fp4_e1m2,
}


@pytest.mark.parametrize("kind,fmt", list(REFERENCES))
@pytest.mark.parametrize("shape,group_size,keep", [
    ((6, 40), 8, 2),  # groups within rows
    ((5, 36), 16, 2),  # row-crossing groups, a tail of 4 padded with the last value
    ((3, 7, 24), 24, 1),  # activations (batch, seq, features)
    ((37,), 10, 3),
    ((4, 48), 48, 0),  # a non-power-of-2 group, no outliers
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_reference(kind, fmt, shape, group_size, keep, dtype):
    gen = torch.Generator().manual_seed(group_size)
    x = (torch.randn(shape, generator=gen) * 3)
    x.view(-1)[5] = 40.0  # an outlier
    x.view(-1)[-1] = -25.0  # the padded tail's value is the largest of its group
    x = x.to(dtype)
    ours = fused.fake_quantize(x, kind, fmt, group_size, keep)
    theirs = REFERENCES[(kind, fmt)](x, group_size, keep)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_constant_and_zero_groups():
    x = torch.zeros(4, 16)
    x[1] = 2.5
    for kind, fmt in REFERENCES:
        torch.testing.assert_close(fused.fake_quantize(x, kind, fmt, 8, 2), REFERENCES[(kind, fmt)](x, 8, 2),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("weights,activations", [("int4", "int4"), ("fp4", "fp4"), ("int4", "none")])
def test_linear_forward_and_backward_on_the_kernels(weights, activations, monkeypatch):
    calls = []
    original = fused.fake_quantize
    monkeypatch.setattr(fused, "fake_quantize", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    x = torch.randn(3, 5, 40, generator=gen)
    outs, grads = [], []
    for kernels in ("triton", "torch"):
        quant = QuantConfig(weights=weights, activations=activations, group_size=8, kernels=kernels)
        layer = FakeQuantLinear.from_linear(linear, quant)
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append((xi.grad, linear.weight.grad.clone(), linear.bias.grad.clone()))
    # forward: activations and weights; backward: the weights again (recomputed, not saved)
    assert calls == [k for k, f in (("activation", activations), ("weight", weights), ("weight", weights))
                     if f != "none"]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_stochastic_rounding_stays_on_the_reference(monkeypatch):
    monkeypatch.setattr(fused, "fake_quantize", lambda *a, **k: pytest.fail("kernel for stochastic rounding"))
    layer = FakeQuantLinear.from_linear(torch.nn.Linear(16, 4),
                                        QuantConfig(weights="int4", activations="int4", group_size=8,
                                                    stochastic_rounding=True, kernels="triton"))
    layer.train()(torch.randn(2, 16))
