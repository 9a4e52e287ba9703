"""Optimizer options that cannot work fail at config time, naming the key."""
from __future__ import annotations

import pytest

from lowmem.config import ConfigError
from lowmem.optim.registry import parse_optimizer_options

BAD = [
    ({"name": "microadam", "state_dtype": "int4"}, "optimizer.state_dtype: 'int4' cannot apply to the microadam core"),
    ({"name": "galore", "core": "microadam", "state_dtype": "int8"}, "optimizer.state_dtype: 'int8' cannot apply"),
    ({"name": "bnb_adamw8bit", "state_dtype": "int4"}, "unknown key 'optimizer.state_dtype'"),
    ({"name": "galore", "state_dtype": "in4"}, "optimizer.state_dtype: unknown value 'in4' (did you mean 'int4'?)"),
    ({"name": "adamw", "state_dtype": "fp8"}, "optimizer.state_dtype: unknown value 'fp8'"),
    ({"name": "microadam", "k_init": 0.0}, "optimizer.k_init: the kept fraction must be in (0, 1]"),
    ({"name": "microadam", "k_init": 1.5}, "optimizer.k_init"),
    ({"name": "microadam", "window": 0}, "optimizer.window: MicroAdam keeps at least 1 gradient"),
    ({"name": "microadam", "topk_block": 40000}, "optimizer.topk_block: must be in [1, 32768]"),
    ({"name": "adafactor", "lr": 0.01}, "optimizer.lr: Adafactor's relative_step computes the step size itself"),
    ({"name": "adafactor", "relative_step": False}, "optimizer.lr: required"),
    ({"name": "galore", "core": "adafactor", "warmup_init": True}, "optimizer.warmup_init: applies to Adafactor's"),
    ({"name": "adafactor", "decay_rate": 0.8}, "optimizer.decay_rate: must be negative"),
    ({"name": "galore", "core": "adafactor", "moments_on_refresh": "rotate"},
     "optimizer.moments_on_refresh: 'rotate' needs moments expressed in the basis"),
    ({"name": "galore", "int4_rank1": True}, "optimizer.int4_rank1: rank-1 normalization applies to state_dtype int4"),
    ({"name": "galore", "core": "adamm"}, "optimizer.core: unknown value 'adamm' (did you mean 'adam'?)"),
    ({"name": "frugal", "block_order": "descend"}, "optimizer.block_order: unknown value 'descend'"),
    ({"name": "adamw8bit", "residual": "fira"}, "optimizer.residual: 'fira' acts on what a projector leaves out"),
]


@pytest.mark.parametrize("tree, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_optimizer_options_name_the_key(tree, message):
    with pytest.raises(ConfigError) as info:
        parse_optimizer_options(tree)
    assert message in str(info.value)


def test_good_combinations_parse():
    for tree in ({"name": "fira", "core": "adafactor", "lr": 0.01}, {"name": "galore", "state_dtype": "int4",
                 "int4_rank1": True}, {"name": "adafactor", "lr": None}, {"name": "frugal", "block_order": "mirror"},
                 {"name": "adamw", "state_dtype": "int8"}):
        parse_optimizer_options(tree)


def test_target_lr_scale_moves_the_targeted_weights_at_a_fraction_of_the_lr():
    """AdamW with target_lr_scale 0.25 equals torch AdamW with the attention/MLP linears in a group at lr/4."""
    import torch

    from lowmem.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(6, 5), "embed": torch.nn.Embedding(7, 6)})
    reference = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    ours = build_optimizer(model, parse_optimizer_options({"name": "adamw", "lr": 0.01, "target_lr_scale": 0.25}))
    theirs = torch.optim.AdamW([{"params": [reference["mlp.weight"]], "lr": 0.0025},
                                {"params": [reference["embed.weight"]], "lr": 0.01},
                                {"params": [reference["mlp.bias"]], "lr": 0.01, "weight_decay": 0.0}],
                               lr=0.01, weight_decay=0.0)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g)
            reference[name].grad = p.grad.clone()
        ours.step()
        theirs.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), atol=1e-7, rtol=0)
    assert [g["lr"] for g in ours.param_groups][:1] == [0.0025]
    with pytest.raises(ConfigError, match="optimizer.target_lr_scale: must be positive"):
        parse_optimizer_options({"name": "galore", "target_lr_scale": 0})
