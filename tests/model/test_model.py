import pytest
import torch
from transformers import AutoModelForCausalLM

from lowmem.model.build import build_meta_model, build_model, count_parameters, llama_config
from lowmem.model.config import ModelConfig
from lowmem.model.presets import MODEL_PRESETS

# Totals from the reference table (vocab 32000, untied head): name -> (total params, attn+MLP linear params).
REFERENCE_COUNTS = {"llama_60m": (58.1e6, 25.3e6), "llama_130m": (134.1e6, 84.9e6),
                    "llama_350m": (368.0e6, 302.4e6), "llama_1b": (1339.1e6, 1207.9e6),
                    "llama_7b": (6738.4e6, 6476.0e6)}


@pytest.mark.parametrize("preset", sorted(REFERENCE_COUNTS))
def test_preset_parameter_counts_match_the_reference(preset):
    model = build_meta_model(ModelConfig(preset=preset), vocab_size=32000)
    total = count_parameters(model)["total"]
    linears = sum(p.numel() for n, p in model.named_parameters() if ("self_attn" in n or "mlp" in n))
    expected_total, expected_linears = REFERENCE_COUNTS[preset]
    assert total == pytest.approx(expected_total, rel=1e-3)
    assert linears == pytest.approx(expected_linears, rel=1e-3)


def test_every_preset_builds_its_shape():
    for name, shape in MODEL_PRESETS.items():
        config = llama_config(ModelConfig(preset=name), 32000)
        for key, value in shape.items():
            assert getattr(config, key) == value, (name, key)
        assert config.tie_word_embeddings is False


def test_overrides_and_pretrained_round_trip(tmp_path):
    cfg = ModelConfig(preset="llama_9m", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, extra={"rms_norm_eps": 1e-5})
    model = build_model(cfg, vocab_size=50)
    assert model.config.hidden_size == 32 and model.config.rms_norm_eps == 1e-5
    assert model.config.vocab_size == 50
    model.save_pretrained(tmp_path / "m")
    loaded = build_model(ModelConfig(preset=None, pretrained=str(tmp_path / "m")))
    x = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(preset="llama_9m", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2)
    torch.manual_seed(0)
    plain = build_model(cfg, vocab_size=40)
    checkpointed = build_model(ModelConfig(**{**cfg.__dict__, "activation_checkpointing": True}), vocab_size=40)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.is_activation_checkpointing
    x = torch.randint(0, 40, (2, 9))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=x, labels=x).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
