"""A low-memory optimizer that would save no memory is refused or reported at start, never silent."""
from __future__ import annotations

import dataclasses

import pytest

from lowmem.errors import ConfigError
from lowmem.memory.report import adamw_state_bytes, state_versus_adamw
from lowmem.model.build import build_meta_model
from lowmem.model.config import ModelConfig
from lowmem.optim import OPTIMIZERS, build_optimizer
from lowmem.optim.registry import parse_optimizer_options
from lowmem.train.trainer import Trainer


def quickstart_model():
    """The quickstart's llama_9m shapes (hidden 128) and its BPE vocabulary, on the meta device."""
    return build_meta_model(ModelConfig(preset="llama_9m"), vocab_size=4096)


@pytest.mark.parametrize("name", ["galore", "fira", "osd", "frugal", "adamw8bit", "adamw4bit", "adafactor",
                                  "microadam"])
def test_default_presets_save_memory_on_the_quickstart_model(name):
    model = quickstart_model()
    options = parse_optimizer_options({"name": name})
    line, saves_nothing = state_versus_adamw(model, build_optimizer(model, options), options)
    assert not saves_nothing, line
    assert f"{name} " in line and "x AdamW's" in line


def test_a_full_rank_projection_is_reported_with_a_rank_that_saves():
    """Rank 128 on a hidden size of 128 is full rank: GaLore then holds more than AdamW. The message says so
    and names a rank that, by the same formula, holds less."""
    model = quickstart_model()
    options = parse_optimizer_options({"name": "galore", "rank": 128})
    optimizer = build_optimizer(model, options)
    assert optimizer.predicted_state_bytes() > adamw_state_bytes(model)
    line, saves_nothing = state_versus_adamw(model, optimizer, options)
    assert saves_nothing and "saves no memory over AdamW" in line
    rank = int(line.split("optimizer.rank=")[1].split(" ")[0])
    smaller = dataclasses.replace(options, rank=rank)
    assert build_optimizer(model, smaller).predicted_state_bytes() < adamw_state_bytes(model)


def test_target_modules_matching_nothing_fail_listing_the_linear_modules():
    model = quickstart_model()
    options = parse_optimizer_options({"name": "galore", "target_modules": ["attention", "feed_forward"]})
    with pytest.raises(ConfigError) as info:
        build_optimizer(model, options)
    message = str(info.value)
    assert message.startswith("optimizer.target_modules: ['attention', 'feed_forward'] match no weight matrix")
    assert message.endswith("its linear modules are: model.layers.N.self_attn.q_proj, model.layers.N.self_attn.k_proj, "
                            "model.layers.N.self_attn.v_proj, model.layers.N.self_attn.o_proj, "
                            "model.layers.N.mlp.gate_proj, model.layers.N.mlp.up_proj, model.layers.N.mlp.down_proj, "
                            "lm_head")
    # a dense optimizer does not project, so its target_modules do not matter
    build_optimizer(model, parse_optimizer_options({"name": "adamw8bit", "target_modules": ["nothing"]}))


def test_the_trainer_refuses_such_targets_before_building_anything(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "optimizer.name=galore", "optimizer.target_modules=[attention]")
    with pytest.raises(ConfigError, match="optimizer.target_modules: \\['attention'\\] match no weight matrix"):
        Trainer(config)
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


def test_the_trainer_warns_when_the_optimizer_saves_nothing(tmp_path, corpus, make_config, capsys):
    config = make_config(tmp_path, corpus, "optimizer.name=galore", "optimizer.rank=32", "train.max_steps=1",
                         "checkpoint.every=0")
    Trainer(config).fit()
    err = capsys.readouterr().err
    assert "warning: optimizer state: galore" in err and "saves no memory over AdamW" in err


def test_every_registered_optimizer_can_state_its_prediction_on_a_meta_model():
    model = quickstart_model()
    for name in OPTIMIZERS:
        options = parse_optimizer_options({"name": name})
        assert build_optimizer(model, options).predicted_state_bytes() > 0, name
