"""Direction stages (lowmem.optim.parts.directions): Cautious against a written-out C-AdamW, its composition with a
projector, and its declarations."""
import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import DenseOptions, GaloreOptions
from lowmem.optim.registry import parse_optimizer_options
from stepping import random_gradients, stepped


def reference_cautious_adamw(weight, grads, lr, betas, eps, weight_decay):
    """C-AdamW as the Cautious Optimizers release writes it on torch's AdamW: the first moment masked where it
    disagrees with the gradient, the mask divided by its mean (floored at 1e-3)."""
    w = weight.clone().double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        w.mul_(1 - lr * weight_decay)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
        mask = (m * g > 0).double()
        mask.div_(mask.mean().clamp(min=1e-3))
        w.addcdiv_(m * mask, denom, value=-lr / (1 - b1 ** t))
    return w.float()


def gradients(shape, steps, seed=0):
    return [step[0] for step in random_gradients([shape], steps, seed)]


def step_all(options, weight, grads, projected=False):
    (param,), opt = stepped(lambda params: PipelineOptimizer(
        [{"params": params, "projected": projected, "names": ["w"]}], options), [weight], [[g] for g in grads])
    return param, opt


def test_cautious_on_the_dense_path_is_c_adamw():
    weight, grads = torch.randn(64, 32), gradients((64, 32), 32)
    options = DenseOptions(lr=1e-2, weight_decay=0.1, state_dtype="fp32", directions=["cautious"])
    ours, _ = step_all(options, weight, grads)
    expected = reference_cautious_adamw(weight, grads, 1e-2, (0.9, 0.999), 1e-8, 0.1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    plain, _ = step_all(DenseOptions(lr=1e-2, weight_decay=0.1, state_dtype="fp32"), weight, grads)
    assert (plain - ours).abs().max() > 1e-3  # the mask changed the run


def test_cautious_keeps_a_projected_update_whose_direction_agrees_with_its_gradient():
    """A constant gradient: the core's direction always has the sign of R, the mask is all ones, and the run is
    GaLore's; gradients drawn afresh each update: entries disagree and the run differs."""
    weight = torch.randn(48, 24)
    options = dict(rank=8, update_gap=100, lr=1e-2)
    constant = [gradients((48, 24), 1)[0]] * 12
    plain, _ = step_all(GaloreOptions(**options), weight, constant, projected=True)
    cautious, _ = step_all(GaloreOptions(**options, directions=["cautious"]), weight, constant, projected=True)
    torch.testing.assert_close(cautious, plain, atol=1e-6, rtol=1e-6)
    fresh = gradients((48, 24), 12, seed=1)
    plain, _ = step_all(GaloreOptions(**options), weight, fresh, projected=True)
    cautious, _ = step_all(GaloreOptions(**options, directions=["cautious"]), weight, fresh, projected=True)
    assert (plain - cautious).abs().max() > 1e-4


def test_cautious_is_a_matrix_rule_and_allows_projected_sync():
    _, opt = step_all(DenseOptions(state_dtype="fp32", directions=["cautious"]), torch.randn(8, 8), [])
    weight = opt.param_groups[0]["params"][0]
    assert not opt.is_elementwise(weight)  # the mask's mean spans the tensor
    assert GaloreOptions(rank=4, directions=["cautious"]).projected_sync_refusals() == []


def test_an_unknown_direction_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"optimizer.directions\[0\]: 'cautios'.*did you mean 'cautious'"):
        parse_optimizer_options({"name": "galore", "directions": ["cautios"]})


def test_a_direction_stage_is_not_skipped_by_a_kernel_that_steps_the_weight_itself():
    """int8 moments on CPU step in one pass of the C++ kernel under kernels auto; with a direction stage the
    weight must take the masked direction, as on the torch path."""
    weight, grads = torch.randn(128, 64), gradients((128, 64), 5)

    def run(kernels, directions):
        return step_all(DenseOptions(lr=1e-2, state_dtype="int8", kernels=kernels, directions=directions), weight,
                        grads)[0]

    torch.testing.assert_close(run("auto", ["cautious"]), run("torch", ["cautious"]), atol=1e-5, rtol=1e-5)
    assert (run("auto", ["cautious"]) - run("auto", [])).abs().max() > 1e-3
