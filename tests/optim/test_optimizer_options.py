"""Optimizer options that cannot work fail at config time, naming the key."""
from __future__ import annotations

from dataclasses import fields

import pytest

from lowmem.errors import ConfigError
from lowmem.optim.options import OptimizerOptions
from lowmem.optim.parts.cores import CORES
from lowmem.optim.parts.projectors import PROJECTORS
from lowmem.optim.parts.residuals import RESIDUALS
from lowmem.optim.parts.transforms import TRANSFORMS
from lowmem.optim.pipeline_options import PARTS, Part, PipelineOptions
from lowmem.optim.registry import OPTIMIZERS, parse_optimizer_options
from lowmem.optim.state.storage import STATE_DTYPES

BAD = [
    ({"name": "microadam", "state_dtype": "int4"}, "optimizer.state_dtype: 'int4' cannot apply to the microadam core"),
    ({"name": "galore", "core": "microadam", "state_dtype": "int8"}, "optimizer.state_dtype: 'int8' cannot apply"),
    ({"name": "bnb_adamw8bit", "state_dtype": "int4"}, "optimizer.state_dtype: not an option of 'bnb_adamw8bit'"),
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
    ({"name": "galore", "int4_rank1": True},
     "optimizer.int4_rank1: applies to state_dtype int4; this optimizer's state_dtype is auto"),
    ({"name": "galore", "core": "adamm"}, "optimizer.core: unknown value 'adamm' (did you mean 'adam'?)"),
    ({"name": "frugal", "block_order": "descend"}, "optimizer.block_order: unknown value 'descend'"),
    ({"name": "adamw8bit", "residual": "fira"},
     "optimizer.residual: applies to any projector but none; this optimizer's projector is none"),
    ({"name": "fira", "projector": "none"}, "optimizer.residual: 'fira' acts on what a projector leaves out"),
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


# A key the YAML sets that no chosen part reads: one per part family.
UNREAD = [
    ({"name": "galore", "window": 10}, "optimizer.window: applies to core microadam; this optimizer's core is adam"),
    ({"name": "microadam", "ef_alpha": 0.1, "core": "adam"},
     "optimizer.ef_alpha: applies to core microadam; this optimizer's core is adam"),
    ({"name": "galore", "lr_in_first_moment": True},
     "optimizer.lr_in_first_moment: applies to core adafactor; this optimizer's core is adam"),
    ({"name": "microadam", "decay_rate": -0.5},
     "optimizer.decay_rate: applies to core adafactor; this optimizer's core is microadam"),
    ({"name": "adafactor", "adam_convention": "torch"},
     "optimizer.adam_convention: applies to cores adam or microadam; this optimizer's core is adafactor"),
    ({"name": "galore", "block_order": "mirror"},
     "optimizer.block_order: applies to projector blocks; this optimizer's projector is svd"),
    ({"name": "frugal", "rank": 8}, "optimizer.rank: applies to projectors coordinates, dct, online_pca, random, "
                                    "randomized_svd or svd; this optimizer's projector is blocks"),
    ({"name": "adamw8bit", "update_gap": 100},
     "optimizer.update_gap: applies to any projector but none; this optimizer's projector is none"),
    ({"name": "galore", "fira_gamma": 1.05}, "optimizer.fira_gamma: applies to residual fira; this optimizer's "
                                             "residual is drop"),
    ({"name": "fira", "inactive_lr_scale": 0.5},
     "optimizer.inactive_lr_scale: applies to residuals sign_sgd or sgd; this optimizer's residual is fira"),
    ({"name": "adamw8bit", "int4_rank1": False},
     "optimizer.int4_rank1: applies to state_dtype int4; this optimizer's state_dtype is int8"),
    ({"name": "galore", "reset_interval": 100},
     "optimizer.reset_interval: applies to transform moment_reset (also in spam, stable_spam); this optimizer "
     "has no transforms"),
    ({"name": "spam", "gamma1": 0.5}, "optimizer.gamma1: applies to transforms adagn or grad_norm_stabilizer (also "
                                      "in stable_spam); this optimizer's transforms are moment_reset, spam_clip"),
    ({"name": "stable_spam", "spam_theta": 100.0},
     "optimizer.spam_theta: applies to transform spam_clip (also in spam); this optimizer's transforms are "
     "adaclip, adagn, moment_reset"),
    ({"name": "adamw8bit", "anneal_steps": 100},
     "optimizer.anneal_steps: applies to any transform; this optimizer has no transforms"),
]


@pytest.mark.parametrize("tree, message", UNREAD, ids=[m.split(":")[0] for _, m in UNREAD])
def test_a_key_no_chosen_part_reads_is_refused_naming_its_part(tree, message):
    with pytest.raises(ConfigError) as info:
        parse_optimizer_options(tree)
    assert str(info.value) == message


def test_a_key_its_part_reads_is_accepted_and_preset_defaults_never_count():
    for tree in ({"name": "galore", "core": "microadam", "window": 4}, {"name": "frugal", "block_order": "mirror"},
                 {"name": "galore", "projector": "blocks", "block_order": "ascending"},
                 {"name": "galore", "residual": "sgd", "inactive_lr_scale": 0.5},
                 {"name": "adamw8bit", "transforms": ["adagn"], "gamma1": 0.5, "anneal_steps": 10},
                 {"name": "stable_spam", "reset_interval": 100, "gamma3": 0.99},
                 {"name": "spam", "spam_theta": 100.0}, {"name": "adamw4bit", "int4_rank1": True},
                 {"name": "adafactor"}, {"name": "spam"}, {"name": "fira"}, {"name": "frugal"},
                 {"name": "galore", "lr": 0.02, "seed": 3, "kernels": "torch", "weight_decay": 0.1}):
        parse_optimizer_options(tree)


def test_options_built_in_code_are_checked_by_what_differs_from_the_preset():
    from lowmem.optim.presets import FrugalOptions, GaloreOptions, MicroAdamOptions

    with pytest.raises(ConfigError, match="optimizer.window: applies to core microadam; this optimizer's core is adam"):
        GaloreOptions(window=4).validate()
    with pytest.raises(ConfigError, match="optimizer.rank: applies to projectors .*; this optimizer's projector is "
                                          "blocks"):
        FrugalOptions(rank=8).validate()
    GaloreOptions(window=10, core="microadam").validate()
    MicroAdamOptions(window=4).validate()
    assert GaloreOptions().reads("rank") and not FrugalOptions().reads("rank")
    assert not MicroAdamOptions().reads("update_gap") and not GaloreOptions().reads("no_such_key")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_recorded_config_loads_back(name):
    """runs/NAME/config.yaml (Config.record) holds only the optimizer keys its parts read: it parses again."""
    from lowmem.train.config import Config

    config = Config()
    config.optimizer = parse_optimizer_options({"name": name})
    recorded = config.record()["optimizer"]
    assert parse_optimizer_options(recorded) == config.optimizer
    assert set(recorded) <= set(config.to_dict()["optimizer"])
    if name == "galore":
        assert "rank" in recorded and "window" not in recorded


def test_every_pipeline_option_is_common_or_declares_its_part():
    """A new option must say which part reads it (field(metadata=part(...)) or EVERY_PIPELINE)."""
    common = {f.name for f in fields(OptimizerOptions)}
    undeclared = [f.name for f in fields(PipelineOptions) if f.name not in common and "part" not in f.metadata]
    assert not undeclared
    known = {"projector": PROJECTORS, "core": CORES, "residual": RESIDUALS, "state_dtype": STATE_DTYPES,
             "transforms": TRANSFORMS}
    for name, owner in PARTS.items():
        if owner is not None:  # a part the pipeline knows, by choices its selector accepts
            assert isinstance(owner, Part) and set(owner.choices) <= set(known[owner.selector]), name
    for entry in OPTIMIZERS.values():  # a preset redeclares defaults only: no option of its own
        if issubclass(entry.options, PipelineOptions):
            assert {f.name for f in fields(entry.options)} == {f.name for f in fields(PipelineOptions)}


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


def test_create_optimizer_is_validated_like_the_yaml_and_groups_like_training():
    from torch import nn

    from lowmem.optim import create_optimizer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(32, 32, bias=False)})
            self.norm = nn.LayerNorm(32)

    model = Block()
    opt = create_optimizer(model, "galore", rank=4, state_dtype="int8", weight_decay=0.1)
    projected = [g for g in opt.param_groups if g["projected"]]
    assert [p for g in projected for p in g["params"]] == [model.self_attn.q_proj.weight]
    assert opt.options.rank == 4 and opt.options.state_dtype == "int8"
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.rnak' \(did you mean 'rank'\?\)"):
        create_optimizer(model, "galore", rnak=4)
    with pytest.raises(ConfigError, match="optimizer.window"):
        create_optimizer(model, "galore", window=10)  # a key no chosen part reads
