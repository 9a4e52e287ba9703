"""Optimizers on causal LMs other than LLaMA: per-family default targets, GPT-2's Conv1D weights."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lowmem.optim import build_optimizer
from lowmem.optim.groups import param_groups
from lowmem.optim.registry import parse_optimizer_options


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return MistralForCausalLM(MistralConfig(**common))


def projected_names(model):
    groups = param_groups(model, parse_optimizer_options({"name": "galore"}))
    return {n for g in groups if g["projected"] for n in g["names"]}


def test_gpt2_targets_its_conv1d_attention_and_mlp_weights():
    names = projected_names(tiny("gpt2"))
    assert names == {f"transformer.h.{i}.{m}.weight" for i in (0, 1)
                     for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_llama_like_families_target_their_projections(family):
    names = projected_names(tiny(family))
    assert names == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_galore_trains_other_families(family):
    model = tiny(family)
    opt = build_optimizer(model, parse_optimizer_options({"name": "galore", "rank": 4, "update_gap": 5}))
    data = torch.tensor([[(5 * i + 1) % 64 for i in range(32)]] * 4)
    first = model(input_ids=data, labels=data).loss.item()
    for _ in range(20):
        model(input_ids=data, labels=data).loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(input_ids=data, labels=data).loss.item() < 0.7 * first
    conv = model.transformer.h[0].attn.c_attn.weight if family == "gpt2" else None
    if conv is not None:  # a Conv1D weight is in x out: its core is rank x the larger side all the same
        assert opt.state[conv]["exp_avg"].shape == (4, 96)
