"""The projected update's fused epilogue (lowmem.kernels.residual, driven by PipelineOptimizer._fused_epilogue)
under the Triton interpreter against the pipeline's torch path after the core step (_back_projected and the
convention's apply_update, on an fp32 copy of the weight): back-projection with scale, Fira's scaled and
limited residual (both variants, over several updates so the limiter engages), FRUGAL's sign and SGD steps,
an empty subspace, weight decay in both conventions, wide and tall weights, non-contiguous gradients, fp32
and bf16 weights.

Tolerance: fp32 weights rtol 1e-5 / atol 1e-6 (summation order of matmuls and norms); bf16 weights one bf16
unit in the last place (rtol 2^-7)."""
import pytest
import torch

from lowmem.kernels import residual as kr
from lowmem.optim.parts.projectors import canonical
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import GaloreOptions

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter

RANK = 8
CORRECTION, LR, DECAY = 0.8, 1e-2, 1e-3  # the core's bias correction, the step's lr, lr * weight_decay


def optimizer(name, variant="paper", decay_after=True):
    """A pipeline optimizer with the residual policy `name` (scale 0.25; FRUGAL's steps at half that)."""
    options = dict(residual=name, scale=0.25, adam_convention="galore" if decay_after else "torch")
    if name == "fira":
        options.update(fira_gamma=1.01, fira_variant=variant)
    if name in ("sign_sgd", "sgd"):
        options.update(inactive_lr_scale=0.5)
    return PipelineOptimizer([torch.nn.Parameter(torch.zeros(2, 2))], GaloreOptions(**options))


def torch_rule(opt, weight, grad, basis, core_grad, direction, state, correction, lr, decay):
    """update_weight's projected path after the core step on the torch path, on an fp32 copy of the weight."""
    fp32 = weight.float()
    direction = direction.clone() if direction is not None else None  # _back_projected may overwrite it
    update_c = opt._back_projected(canonical(grad.float()), core_grad, direction, correction, state, basis)
    opt.convention.apply_update(canonical(fp32), update_c, lr, decay)
    if fp32 is not weight:
        weight.copy_(fp32)


def inputs(shape, step, contiguous=True, empty=False):
    """A gradient, an orthonormal basis of its smaller side, the core gradient and a direction for it."""
    gen = torch.Generator().manual_seed(100 + step)
    grad = torch.randn(shape, generator=gen) * (1.0 + step)  # growing: the Fira limiter engages
    if not contiguous:
        grad = torch.randn(shape[::-1], generator=gen).T * (1.0 + step)
    if empty:
        return grad, None, None, None
    b = min(shape)
    basis = torch.linalg.qr(torch.randn(b, RANK, generator=gen)).Q
    core_grad = basis.T @ canonical(grad)
    direction = core_grad / (core_grad.abs() + 0.1)  # an Adam-like direction, O(1)
    return grad, basis, core_grad, direction


def run(shape, name, variant="paper", weight_dtype=torch.float32, decay_after=True, contiguous=True,
        empty=False, steps=3):
    torch.manual_seed(0)
    weight = torch.randn(shape).to(weight_dtype)
    ours, ref = weight.clone(), weight.clone()
    ours_state, ref_state = {}, {}
    opt = optimizer(name, variant, decay_after)
    for step in range(1, steps + 1):
        grad, basis, core_grad, direction = inputs(shape, step, contiguous, empty)
        torch_rule(opt, ref, grad, basis, core_grad, direction, ref_state, CORRECTION, LR, DECAY)
        opt._fused_epilogue(ours, grad, basis, core_grad, direction, CORRECTION, ours_state, LR, DECAY)
    if weight_dtype == torch.bfloat16:
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours_state.keys() == ref_state.keys()
    if "fira_norm" in ref_state:
        torch.testing.assert_close(ours_state["fira_norm"], ref_state["fira_norm"], rtol=1e-5, atol=0)
    return ours, ref


@pytest.mark.parametrize("name, variant", [("drop", "paper"), ("fira", "paper"), ("fira", "code"),
                                           ("sign_sgd", "paper"), ("sgd", "paper")])
@pytest.mark.parametrize("shape", [(40, 72), (72, 40)])
def test_projected_update_matches_pipeline(name, variant, shape):
    run(shape, name, variant)


@pytest.mark.parametrize("name", ["drop", "fira", "sign_sgd"])
def test_bf16_weight_decay_first_and_transposed_gradient(name):
    run((72, 40), name, "code", weight_dtype=torch.bfloat16, decay_after=False, contiguous=False)


@pytest.mark.parametrize("name", ["drop", "fira", "sign_sgd", "sgd"])
def test_empty_subspace(name):
    """An inactive FRUGAL block: no core; the residual policy acts on the whole gradient, or only decay."""
    run((40, 72), name, empty=True, steps=2)


def test_fira_limiter_engages():
    """Growing gradients: the limiter must have cut the residual (else the comparison proves little)."""
    opt = optimizer("fira")
    state = {}
    norms = []
    for step in (1, 2):
        grad, basis, core_grad, direction = inputs((40, 72), step)
        opt._fused_epilogue(torch.zeros(40, 72), grad, basis, core_grad, direction, CORRECTION, state, LR, 0.0)
        norms.append(float(state["fira_norm"]))
    assert norms[1] == pytest.approx(norms[0] * 1.01, rel=1e-5)


def test_stochastic_rounding_of_bf16_weights():
    """The epilogue kernel with sign_sgd's terms on a bf16 weight, rounded stochastically, against the torch
    path's fp32 result."""
    torch.manual_seed(1)
    weight = torch.randn(72, 40).bfloat16()
    grad, basis, core_grad, direction = inputs((72, 40), 1)
    exact = weight.float()
    torch_rule(optimizer("sign_sgd", decay_after=False), exact, grad, basis, core_grad, direction, {}, CORRECTION,
               1e-3, 0.0)
    ours = weight.clone()
    k = torch.full((1,), 0.25 * 0.5)
    kr.epilogue(canonical(ours), canonical(grad), 1e-3, 0.0, False, basis @ direction, 0.25, k, basis @ core_grad,
                sign=True, stochastic_rounding=True, seed=3)
    toward_zero = (exact.view(torch.int32) & -65536).view(torch.float32)
    away = (toward_zero.view(torch.int32) + 65536).view(torch.float32)
    got = ours.float()
    # the kernel's fp32 value may differ from the torch path's in the last bits: allow its own neighbours too
    near = (got - exact).abs() <= (away - toward_zero).abs() * (1 + 1e-3)
    assert bool(near.all())
    assert bool(((got == toward_zero) | (got == away)).float().mean() > 0.99)
    assert not torch.equal(ours, exact.bfloat16())  # some elements rounded the other way than to nearest
