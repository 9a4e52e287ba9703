"""The reference path's batched step (lowmem.optim.batched) against the same optimizer stepped weight by weight
(`step_param`, update_weight's per-weight rule): the same updates up to rounding."""
import pytest
import torch

from lowmem.optim import batched
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import AdamW8bitOptions, FiraOptions, FrugalOptions, GaloreOptions, OSDOptions


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
        if batched_step:
            opt.step()
        else:
            opt.begin_update()
            for p in mats + dense:
                opt.step_param(p)
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


def test_a_transposed_weight_steps_as_the_per_weight_rule_steps():
    """torch's fused AdamW kernel walks each tensor as one contiguous array whatever its strides: a transposed
    (non-contiguous) weight with a contiguous gradient takes the foreach ops instead, beside a contiguous one."""
    def stepped(batched_step: bool):
        gen = torch.Generator().manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(24, 50, generator=gen).T), torch.nn.Parameter(torch.randn(50, 24, generator=gen))]
        opt = PipelineOptimizer([{"params": weights, "weight_decay": 0.1}], GaloreOptions(rank=6))
        for _ in range(3):
            for p in weights:
                p.grad = torch.randn(p.shape, generator=gen)  # contiguous, unlike the first weight
            if batched_step:
                opt.step()
            else:
                opt.begin_update()
                for p in weights:
                    opt.step_param(p)
        return weights

    assert not stepped(True)[0].is_contiguous()
    for a, b in zip(stepped(True), stepped(False)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
