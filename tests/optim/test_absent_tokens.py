"""Every registered optimizer in every quantized state dtype: an embedding row whose token is in the first batch
with a tiny gradient (a rare token: its second moment is far below its block's absmax) and absent afterwards must
not be moved by m / eps. Adam's bias-corrected step is bounded by about lr (Kingma & Ba, Sec. 2.1: at most
lr (1 - b1) / sqrt(1 - b2) ~ 3.2 lr for the default betas); a stored second moment of 0 beside a non-zero first
moment moves such an element hundreds of times lr."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.optim import build_optimizer
from lowmem.optim.registry import parse_optimizer_options
from test_optimizer_registry import variants, variant_id

QUANTIZED = [tree for tree in variants() if tree.get("state_dtype") in ("int8", "int4")]
VOCAB, WIDTH, RARE = 256, 32, range(200, 256)
BOUND = 10.0  # x lr: a small multiple of Adam's bound, far below the m / eps failure


class SmallLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)  # 8192 elements: a quantized state
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(WIDTH, WIDTH, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(WIDTH, 160, bias=False),
                                  "down_proj": nn.Linear(160, WIDTH, bias=False)})
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)


def feed(model: SmallLM, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    grad = model.embed.weight.grad
    absent = torch.arange(VOCAB) % 3 == step % 3  # a third of the tokens miss each batch
    grad[absent] = 0.0
    rare = torch.zeros(VOCAB, dtype=torch.bool)
    rare[list(RARE)] = True
    grad[rare] = 1e-5 * grad[rare] if step == 0 else 0.0  # in the first batch only, with a tiny gradient


@pytest.mark.parametrize("updates", [2, 10])
@pytest.mark.parametrize("tree", QUANTIZED, ids=variant_id)
def test_no_element_moves_more_than_a_small_multiple_of_lr(tree, updates):
    torch.manual_seed(0)
    model = SmallLM()
    opt = build_optimizer(model, parse_optimizer_options(dict(tree, weight_decay=0.0)))
    lr = max(group["lr"] for group in opt.param_groups)
    for step in range(updates):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        feed(model, step)
        opt.step()
        for name, p in model.named_parameters():
            moved = float((p.detach() - before[name]).abs().max())
            assert moved <= BOUND * lr, f"{name} moved {moved / lr:.1f} x lr at update {step + 1}"
