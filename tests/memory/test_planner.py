"""The memory planner: predicted bytes equal the counted ones for parameters, gradients and optimizer state of
every registered optimizer, and the activation estimate is within 15% of the activations measured on CPU
(the bytes of every tensor a real forward saves for backward, counted once per storage by a saved-tensors
hook, the model's own weights excluded)."""
from __future__ import annotations

import json

import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.memory.planner import main, measure_one_update, parse_gpu_size, plan_memory
from lowmem.optim import OPTIMIZERS

VARIANTS = [[f"optimizer.name={name}"] + (["optimizer.lr=null"] if name == "adafactor" else ["optimizer.lr=0.001"])
            for name in sorted(OPTIMIZERS)] + [
    ["optimizer.name=galore", "optimizer.state_dtype=int4"], ["optimizer.name=fira", "optimizer.core=adafactor"],
    ["optimizer.name=adamw", "train.precision=bf16"], ["optimizer.name=galore", "train.precision=bf16_autocast"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_prediction_equals_one_counted_update(tmp_path, corpus, make_config, overrides):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "train.batch_size=4", "data.seq_len=32",
                         *overrides)
    plan = plan_memory(config)
    counted = measure_one_update(config)
    rows = plan.per_rank()
    assert rows["parameters"] == counted["params_bytes"]
    assert rows["gradients"] == counted["grads_bytes"]
    assert rows["optimizer state"] == counted["optimizer_state_bytes"]
    assert abs(rows["activations"] - counted["activations_bytes"]) <= 0.15 * counted["activations_bytes"]


def test_update_in_backward_holds_one_gradient_and_checkpointing_fewer_activations(tmp_path, corpus, make_config):
    base = make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore")
    plan = plan_memory(base)
    hooked = plan_memory(make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore",
                                     "optimizer.update_in_backward=true", "train.grad_clip=0"))
    largest = 300 * 32 * 4  # the embedding (and the head): vocab 300 x hidden 32, fp32
    assert hooked.gradients == largest < plan.gradients
    checkpointed = plan_memory(make_config(tmp_path, corpus, "model.vocab_size=300",
                                           "model.activation_checkpointing=true"))
    assert checkpointed.activations < plan.activations


def test_update_in_backward_with_accumulation_keeps_every_gradient(tmp_path, corpus, make_config):
    """Accumulated micro-batches sum into every weight's gradient before the last backward steps them: with
    grad_accum > 1 updating in backward frees nothing, so the planner counts them all."""
    args = ("model.vocab_size=300", "optimizer.update_in_backward=true", "train.grad_clip=0")
    one = plan_memory(make_config(tmp_path, corpus, *args))
    accumulated = plan_memory(make_config(tmp_path, corpus, *args, "train.grad_accum=2"))
    assert accumulated.gradients == accumulated.parameters > one.gradients
    assert any("every gradient exists at once" in note for note in accumulated.notes)


def test_zero_stages_divide_what_they_shard(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore")
    one = plan_memory(config)
    for stage in (1, 2, 3):
        plan = plan_memory(config, world_size=4, zero_stage=stage)
        rows, base = plan.per_rank(), one.per_rank()
        assert 0 < plan.largest_weight_state < one.optimizer
        assert rows["optimizer state"] == min(-(-one.optimizer // 4) + plan.largest_weight_state, one.optimizer)
        assert rows["gradients"] == (base["gradients"] if stage < 2 else -(-base["gradients"] // 4))
        assert rows["parameters"] == (base["parameters"] if stage < 3 else -(-base["parameters"] // 4))
        assert rows["activations"] == base["activations"]


def test_gpu_sizes_parse_and_bad_ones_are_named():
    assert parse_gpu_size("24GB") == 24 * 2**30 and parse_gpu_size("80GiB") == 80 * 2**30
    assert parse_gpu_size("40") == 40 * 2**30 and parse_gpu_size("512MB") == 512 * 2**20
    with pytest.raises(ConfigError, match="--gpu: cannot read '24 gigs'"):
        parse_gpu_size("24 gigs")


def test_cli_json_and_errors(tmp_path, corpus, make_config, capsys):
    make_config(tmp_path, corpus)  # writes tmp_path/config.yaml
    path = str(tmp_path / "config.yaml")
    assert main([path, "model.vocab_size=300", "--gpu", "1MB,24GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] == {"1MB": False, "24GB": True}
    assert out["total_per_rank"] == sum(out["per_rank"].values())
    assert main([path, "--gpu", "lots"]) == 2
    assert "config error: --gpu: cannot read 'lots'" in capsys.readouterr().err
    assert main([path, "optimizer.nmae=galore"]) == 2
    assert "unknown key 'optimizer.nmae'" in capsys.readouterr().err


def test_a_model_with_fake_quantized_linears_is_planned_and_measured(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "train.batch_size=2", "data.seq_len=32",
                         "model.quant.weights=int4", "model.quant.activations=int4", "model.quant.group_size=16")
    rows = plan_memory(config).per_rank()
    counted = measure_one_update(config)
    assert rows["parameters"] == counted["params_bytes"]
    assert abs(rows["activations"] - counted["activations_bytes"]) <= 0.15 * counted["activations_bytes"]
