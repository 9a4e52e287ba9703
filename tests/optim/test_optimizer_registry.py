"""One sweep over every registered optimizer x every state storage it accepts x every projector (and the
per-part variants below), on square, tall, wide and tiny weights: the state-size formula equal to the bytes it
holds after every update (and predicted before the first), and a bit-exact resume through a weights-only
checkpoint. An optimizer, projector or storage added to the registries is covered here without a new test."""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn

from lowmem.errors import ConfigError
from lowmem.optim import OPTIMIZERS, build_optimizer, optimizer_state_bytes
from lowmem.optim.parts.projectors import PROJECTORS
from lowmem.optim.registry import parse_optimizer_options

STATE_DTYPES = ("fp32", "bf16", "int8", "int4")
# Per-core variants of the projection presets beyond their defaults (new combinations come free).
EXTRA = [{"name": "galore", "core": "adafactor"}, {"name": "fira", "core": "adafactor"},
         {"name": "galore", "core": "microadam"}, {"name": "galore", "projector": "random", "state_dtype": "int4"},
         {"name": "galore", "moments_on_refresh": "rotate", "state_dtype": "int8"},
         {"name": "adamw4bit", "int4_rank1": True}, {"name": "frugal", "block_order": "mirror", "state_dtype": "int8"},
         {"name": "adafactor", "betas": [0.9, 0.999], "state_dtype": "int8"},
         # transforms with a moment reset inside the resumed stretch (updates 4 and 6)
         {"name": "stable_spam", "reset_interval": 2, "state_dtype": "int4"},
         {"name": "stable_spam", "reset_interval": 2, "reset_with_old_moments": True, "anneal_steps": 5},
         {"name": "spam", "reset_interval": 2, "spam_clip_delay": 1, "reset_warmup": 2},
         {"name": "galore", "transforms": ["stable_spam"], "reset_interval": 2, "state_dtype": "int8"},
         {"name": "adafactor", "transforms": ["spam"], "reset_interval": 2, "spam_clip_delay": 1},
         # a direction stage on the dense path, under a projector with a residual, and on quantized moments
         {"name": "adamw8bit", "directions": ["cautious"]}, {"name": "fira", "directions": ["cautious"]},
         {"name": "galore", "directions": ["cautious"], "state_dtype": "int4"},
         # every projector, with the moment policies and residuals it is used with
         {"name": "galore", "rank": 3},  # rank = the smaller side of the tiny weight
         {"name": "galore", "projector": "randomized_svd", "moments_on_refresh": "rotate"},
         {"name": "galore", "projector": "random", "residual": "fira", "stagger": True},
         {"name": "galore", "projector": "dct", "moments_on_refresh": "rotate"},
         {"name": "frugal", "density": 0.5},
         {"name": "frugal", "projector": "coordinates", "residual": "sgd", "moments_on_refresh": "rotate"},
         {"name": "frugal", "projector": "random"},
         {"name": "osd", "state_dtype": "bf16"}]


def _accepts(tree: dict) -> bool:
    try:
        parse_optimizer_options(tree)
    except ConfigError:
        return False
    return True


def short_gap(tree: dict) -> dict:
    """`tree` refreshing its projector every 2 updates where it has one (a key no part reads is refused)."""
    return dict(tree, update_gap=2) if _accepts(tree) and parse_optimizer_options(tree).reads("update_gap") else tree


def variants() -> list[dict]:
    """Every registered optimizer with small-model settings, in each state storage it accepts."""
    found = []
    for name, entry in sorted(OPTIMIZERS.items()):
        fields = {f.name for f in dataclasses.fields(entry.options)}
        base = short_gap({"name": name})
        found.append(base)
        if "state_dtype" in fields:
            found += [dict(base, state_dtype=d) for d in STATE_DTYPES if _accepts(dict(base, state_dtype=d))]
    found += [short_gap(tree) for tree in EXTRA]
    return [tree for tree in found if _accepts(tree)]


def variant_id(tree: dict) -> str:
    return "-".join(str(v) for k, v in tree.items() if k != "update_gap")


class TinyLM(nn.Module):
    """Embedding, attention and MLP linears (one large enough to be quantized, one shaped by the test), a
    norm and a head, named as the optimizers' default target_modules expect."""

    def __init__(self, shape=(64, 80)):
        super().__init__()
        self.embed = nn.Embedding(40, 24)
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(24, 24, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(24, 200, bias=False), "down_proj": nn.Linear(200, 24),
                                  "extra": nn.Linear(shape[1], shape[0], bias=False)})
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 40, bias=False)


def feed(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * (1 + step % 3)


def make(tree: dict, shape=(64, 80), seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyLM(shape)
    return model, build_optimizer(model, parse_optimizer_options(tree))


SHAPES = {"square": (64, 64), "tall": (96, 48), "wide": (48, 96), "tiny": (6, 3)}


@pytest.mark.parametrize("tree", variants(), ids=variant_id)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_state_bytes_formula_and_bit_exact_resume(tree, shape):
    k, total = 3, 6  # refreshes at updates 0, 2, 4: one before and one after the save
    model, opt = make(tree, shape)
    assert opt.expected_state_bytes() == optimizer_state_bytes(opt) == 0
    predicted = opt.predicted_state_bytes()
    for step in range(total):
        if step == k:
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buffer)
        feed(model, step)
        opt.step()
        assert opt.expected_state_bytes() == optimizer_state_bytes(opt), f"after update {step + 1}"
        if step == 0:
            assert predicted == optimizer_state_bytes(opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, resumed = make(tree, shape, seed=1)
    model2.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    for step in range(k, total):
        feed(model2, step)
        resumed.step()
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name
    assert resumed.expected_state_bytes() == optimizer_state_bytes(resumed)


def test_every_registered_optimizer_is_covered():
    assert all(_accepts(short_gap(tree)) for tree in EXTRA), [t for t in EXTRA if not _accepts(short_gap(t))]
    names = {tree["name"] for tree in variants()}
    assert names == set(OPTIMIZERS)
    covered = {(t["name"], t.get("state_dtype")) for t in variants()}
    for name in ("galore", "fira", "frugal", "osd", "adamw", "adamw8bit", "adafactor"):
        assert {(name, d) for d in STATE_DTYPES} <= covered, name
    projectors = {parse_optimizer_options(tree).projector for tree in variants()
                  if hasattr(parse_optimizer_options(tree), "projector")}
    assert projectors >= set(PROJECTORS), set(PROJECTORS) - projectors
