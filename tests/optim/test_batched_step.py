"""The reference path's batched step (lowmem.optim.batched) against the same optimizer stepped weight by weight
(`step_param`, update_weight's per-weight rule): the same updates up to rounding."""
import dataclasses

import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.optim import batched
from lowmem.optim.parts.cores import FIRST, SECOND, AdamCore, CoreContext
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import AdamW4bitOptions, AdamW8bitOptions, FiraOptions, FrugalOptions, GaloreOptions, OSDOptions
from lowmem.optim.registry import parse_optimizer_options
from lowmem.optim.state.storage import StoragePolicy
from stepping import update


def params():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in ((24, 40), (40, 24), (24, 40), (30, 30))]
    dense = [torch.nn.Parameter(torch.randn(50, 24, generator=gen) * 0.1), torch.nn.Parameter(torch.ones(24))]
    return mats, dense


def run(options, batched_step: bool, steps: int = 5):
    mats, dense = params()
    opt = PipelineOptimizer([{"params": mats, "projected": True, "weight_decay": 0.1},
                             {"params": dense, "weight_decay": 0.05}], options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in mats + dense:
            p.grad = torch.randn(p.shape, generator=gen)
        update(opt, mats + dense, per_weight=not batched_step)
    return opt, mats + dense


@pytest.mark.parametrize("options", [
    GaloreOptions(rank=6, update_gap=3),
    GaloreOptions(rank=6, update_gap=3, adam_convention="torch", projector="random"),
    GaloreOptions(rank=6, update_gap=2, moments_on_refresh="rotate"),
    FiraOptions(rank=6, update_gap=3),
    FiraOptions(rank=6, fira_variant="paper", projector="dct"),
    FrugalOptions(density=0.5, update_gap=2),
    FrugalOptions(projector="coordinates", rank=6, update_gap=2),
    FrugalOptions(projector="svd", rank=6, residual="sgd"),
    OSDOptions(rank=6),
], ids=["galore", "galore-random-torch", "galore-rotate", "fira", "fira-paper-dct", "frugal", "frugal-coordinates",
        "frugal-svd-sgd", "osd"])
def test_batched_step_matches_the_per_weight_rule(options, monkeypatch):
    taken = []
    original = batched.BatchedStep.finish
    monkeypatch.setattr(batched.BatchedStep, "finish", lambda self: taken.append(1) or original(self))
    ours = run(options, True)
    theirs = run(options, False)
    assert len(taken) == 5
    for p, q in zip(ours[1], theirs[1]):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    for p, q in zip(ours[1], theirs[1]):
        a, b = ours[0].state[p], theirs[0].state[q]
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(a[key], value, atol=1e-6, rtol=1e-5)
            else:
                assert a[key] == value


def test_quantized_states_and_transforms_step_weight_by_weight(monkeypatch):
    monkeypatch.setattr(batched.BatchedStep, "add", lambda *a: pytest.fail("batched"))
    run(AdamW8bitOptions(), True, steps=1)
    run(GaloreOptions(rank=6, transforms=["stable_spam"]), True, steps=1)


def test_implementation_per_weight_never_batches_and_batched_equals_it(monkeypatch):
    options = GaloreOptions(rank=6, update_gap=3)
    _, batched_weights = run(dataclasses.replace(options, implementation="batched"), True)
    with monkeypatch.context() as patch:
        patch.setattr(batched.BatchedStep, "add", lambda *a: pytest.fail("batched"))
        _, per_weight = run(dataclasses.replace(options, implementation="per_weight"), True)
    for a, b in zip(batched_weights, per_weight):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tree, reason", [
    ({"name": "galore", "transforms": ["spam"]}, "has transforms"),
    ({"name": "galore", "directions": ["cautious"]}, "has direction stages"),
    ({"name": "adafactor"}, "core is adafactor"),
])
def test_batched_is_refused_where_it_cannot_step_the_configuration(tree, reason):
    with pytest.raises(ConfigError, match=f"optimizer.implementation: batched .*{reason}"):
        parse_optimizer_options(dict(tree, implementation="batched"))


def test_batched_quantized_moments_off_the_kernels_are_refused_naming_the_path():
    with pytest.raises(ConfigError, match="batched steps int8 moments only on the Triton kernels"):
        run(AdamW8bitOptions(implementation="batched", kernels="torch"), True, steps=1)


def test_foreach_direction_is_adam_math():
    """The batched form of the Adam core's direction gives exactly the core's own step (the torch path)."""
    torch.manual_seed(7)
    shapes, steps = [(7, 9), (100,), (3, 4)], [1, 5, 2]
    for convention in ("galore", "torch"):
        core = AdamCore(GaloreOptions(adam_convention=convention), StoragePolicy("fp32"))
        grads = [torch.randn(s) for s in shapes]
        theirs = [{FIRST: torch.randn(s), SECOND: torch.rand(s), "adam_step": step - 1}
                  for s, step in zip(shapes, steps)]
        ours = [{FIRST: t[FIRST].clone(), SECOND: t[SECOND].clone()} for t in theirs]
        got = batched.foreach_adam_direction(grads, [s[FIRST] for s in ours], [s[SECOND] for s in ours], steps,
                                             0.9, 0.999, 1e-8, convention == "torch")
        for g, state, d, mine in zip(grads, theirs, got, ours):
            expected = core.step(g, state, {"betas": (0.9, 0.999), "eps": 1e-8}, CoreContext(g)).direction
            assert torch.equal(d, expected)
            assert torch.equal(mine[FIRST], state[FIRST]) and torch.equal(mine[SECOND], state[SECOND])


def kernel_params():
    """Projected matrices with quantized cores at rank 32 (wide, tall, one bf16, one of no tile's multiple) and
    dense weights of every kind: quantized fp32 and bf16 matrices, a vector and a small matrix with fp32 moments."""
    gen = torch.Generator().manual_seed(2)

    def make(shape, dtype=torch.float32):
        return torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(dtype))

    mats = [make((64, 160)), make((160, 64)), make((45, 150)), make((64, 160), torch.bfloat16)]
    dense = [make((80, 64)), make((70, 70), torch.bfloat16), make((64,)), make((30, 30)), make((4097,))]
    return mats, dense


def run_groups(options, per_weight, steps=3):
    """Three groups (their own lr and decay); on the second update two weights have no gradient, so the
    moments' update counts differ between weights."""
    mats, dense = kernel_params()
    opt = PipelineOptimizer([{"params": mats, "projected": True, "weight_decay": 0.1},
                             {"params": dense[:2], "lr": 0.02, "weight_decay": 0.05},
                             {"params": dense[2:], "lr": 0.005, "weight_decay": 0.0}], options)
    gen = torch.Generator().manual_seed(3)
    params = mats + dense
    for number in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = None if number == 1 and i in (1, 5) else grad
        update(opt, params, per_weight)
    return opt, params


def assert_same_states(ours, theirs, exact=False):
    """Weights and states of two runs: equal (exact), or within the kernels' tolerance of the torch path
    (test_kernels_adam: rtol 1e-5 on fp32, one bf16 unit on bf16, codes one level apart at rare ties)."""
    for p, q in zip(ours[1], theirs[1]):
        if exact:
            assert torch.equal(p, q)
        elif p.dtype == torch.bfloat16:
            torch.testing.assert_close(p.float(), q.float(), rtol=2 ** -7, atol=1e-4)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        a, b = ours[0].state[p], theirs[0].state[q]
        assert a.keys() == b.keys()
        for key, value in b.items():
            if not isinstance(value, torch.Tensor):
                assert a[key] == value
            elif exact or not value.is_floating_point() and value.dtype != torch.uint8:
                assert torch.equal(a[key], value), key
            elif value.dtype == torch.uint8:
                assert ((a[key].int() - value.int()).abs() > 0).float().mean() <= 1e-3, key
            else:
                rtol = 2 ** -7 if value.dtype == torch.bfloat16 else 1e-5
                scale = float(value.float().abs().max())
                torch.testing.assert_close(a[key].float(), value.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("options", [
    GaloreOptions(rank=32, state_dtype="int8"),
    GaloreOptions(rank=32, state_dtype="int4", adam_convention="torch"),
    GaloreOptions(rank=32, state_dtype="int4", int4_rank1=True),
    FiraOptions(rank=32),
    FiraOptions(rank=32, fira_variant="paper", state_dtype="bf16"),
    FrugalOptions(density=0.5, update_gap=2, state_dtype="int8"),
    FrugalOptions(projector="coordinates", rank=32, update_gap=2, state_dtype="int8"),
    AdamW8bitOptions(weight_decay=0.1),
    AdamW4bitOptions(),
], ids=["galore-int8", "galore-int4-torch", "galore-int4-rank1", "fira", "fira-paper-bf16", "frugal-blocks",
        "frugal-coordinates", "adamw8bit", "adamw4bit"])
def test_batched_kernels_match_the_per_weight_rule(options, monkeypatch):
    """step() on the kernels (multi-tensor Adam launches, then each weight's epilogue) against the per-weight
    rule: on the torch path within the kernels' tolerance, on the kernels bit for bit."""
    from lowmem.kernels import adam

    launches = {"adam_update_multi": 0, "adam_direction_multi": 0}
    for name in launches:
        def counted(*args, name=name, original=getattr(adam, name), **kwargs):
            launches[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(adam, name, counted)
    ours = run_groups(with_kernels(options, "triton"), per_weight=False)
    # one launch per update for all dense weights (3 groups, one kind each), one for the cores the kernels
    # batch (rank-1 int4 cores are stepped alone)
    batched_cores = options.projects and not options.int4_rank1
    assert launches == {"adam_update_multi": 3, "adam_direction_multi": 3 if batched_cores else 0}
    per_weight = run_groups(with_kernels(options, "triton"), per_weight=True)
    reference = run_groups(with_kernels(options, "torch"), per_weight=True)
    assert_same_states(ours, reference)
    assert_same_states(ours, per_weight, exact=True)


def with_kernels(options, kernels):
    return type(options)(**{**options.__dict__, "kernels": kernels})


def test_a_transposed_weight_steps_as_the_per_weight_rule_steps():
    """torch's fused AdamW kernel walks each tensor as one contiguous array whatever its strides: a transposed
    (non-contiguous) weight with a contiguous gradient takes the foreach ops instead, beside a contiguous one."""
    def stepped(per_weight: bool):
        gen = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(24, 50, generator=gen).T),
                   torch.nn.Parameter(torch.randn(50, 24, generator=gen))]
        opt = PipelineOptimizer([{"params": weights, "weight_decay": 0.1}], GaloreOptions(rank=6))
        for _ in range(3):
            for p in weights:
                p.grad = torch.randn(p.shape, generator=gen)  # contiguous, unlike the first weight
            update(opt, weights, per_weight)
        return weights

    assert not stepped(False)[0].is_contiguous()
    for a, b in zip(stepped(False), stepped(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
