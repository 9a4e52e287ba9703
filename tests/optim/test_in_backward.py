"""Update-in-backward with gradient accumulation equals accumulate-then-step."""
from __future__ import annotations

import copy

import pytest
import torch

from lowmem.optim import OptimizerOptions, build_optimizer
from lowmem.optim.in_backward import UpdateInBackward
from lowmem.optim.presets import FiraOptions, FrugalOptions, GaloreOptions, OSDOptions


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 12)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 12))
        self.norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 16, bias=False)

    def forward(self, tokens):
        return self.head(self.norm(self.mlp(self.embed(tokens))))


def micro_batches(update, accum=3):
    g = torch.Generator().manual_seed(update)
    return [torch.randint(0, 16, (4, 5), generator=g) for _ in range(accum)]


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1)) / 3


@pytest.mark.parametrize("options", [OptimizerOptions(lr=1e-2, weight_decay=0.1),
                                     GaloreOptions(rank=4, update_gap=2, weight_decay=0.1),
                                     FiraOptions(rank=4, update_gap=2, projector="random"),
                                     OSDOptions(rank=4, update_gap=2, weight_decay=0.1),
                                     FrugalOptions(update_gap=2, density=0.5, weight_decay=0.1)],
                         ids=["adamw", "galore", "fira-random", "osd", "frugal-blocks"])
def test_in_backward_with_accumulation_equals_step_after_accumulation(options):
    torch.manual_seed(0)
    reference = TinyNet()
    model = copy.deepcopy(reference)
    ref_opt = build_optimizer(reference, options)
    opt = build_optimizer(model, options)
    in_backward = UpdateInBackward(opt)
    for update in range(5):  # refreshes at updates 0, 2, 4
        batches = micro_batches(update)
        for tokens in batches:
            loss_of(reference, tokens).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for i, tokens in enumerate(batches):
            in_backward.arm(i == len(batches) - 1)
            loss_of(model, tokens).backward()
        assert all(p.grad is None for p in model.parameters())
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    in_backward.remove()
    loss_of(model, batches[0]).backward()
    assert all(p.grad is not None for p in model.parameters())


class SideNet(TinyNet):
    """TinyNet with a `side` layer that only some micro-batches use."""

    def __init__(self):
        super().__init__()
        self.side = torch.nn.Linear(12, 12)

    def forward(self, tokens, use_side=False):
        hidden = self.embed(tokens)
        return self.head(self.norm(self.mlp(self.side(hidden) if use_side else hidden)))


@pytest.mark.parametrize("options", [OptimizerOptions(lr=1e-2), GaloreOptions(rank=4, update_gap=2)],
                         ids=["adamw", "galore"])
def test_a_weight_only_earlier_micro_batches_reach_is_still_updated(options):
    """The last micro-batch's backward never reaches `side`, so its hook does not fire then: finish() steps it."""
    torch.manual_seed(0)
    reference = SideNet()
    model = copy.deepcopy(reference)
    ref_opt = build_optimizer(reference, options)
    in_backward = UpdateInBackward(build_optimizer(model, options))
    for update in range(3):
        batches = micro_batches(update)
        for i, tokens in enumerate(batches):
            logits = reference(tokens[:, :-1], use_side=i == 0)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for i, tokens in enumerate(batches):
            in_backward.arm(i == len(batches) - 1)
            logits = model(tokens[:, :-1], use_side=i == 0)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 16), tokens[:, 1:].reshape(-1)).backward()
        in_backward.finish()
        assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.side.weight, SideNet().side.weight)  # it moved
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_a_non_finite_gradient_is_not_applied_and_is_named():
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer(model, OptimizerOptions(lr=1e-2))
    in_backward = UpdateInBackward(opt)
    before = copy.deepcopy(model.state_dict())
    model.norm.weight.register_hook(lambda grad: grad * float("nan"))  # reached before the mlp in backward
    in_backward.arm(True)
    loss_of(model, micro_batches(0)[0]).backward()
    in_backward.finish()
    assert in_backward.non_finite == "norm.weight"
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
        if not name.startswith("head"):  # the head's gradient comes first, and is finite: it was applied
            assert torch.equal(value, before[name]), name
