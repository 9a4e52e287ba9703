import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowmem import checkpoint as ckpt


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=30))


def test_save_load_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        model = tiny_model(step)
        ckpt.save_checkpoint(tmp_path, step, model, None, {"trainer": {"step": step}, "t": torch.arange(step)},
                             keep_last=2)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000002", "step_00000003"]
    state = ckpt.load_state(found[-1])  # weights_only=True inside
    assert state["trainer"]["step"] == 3 and torch.equal(state["t"], torch.arange(3))
    restored = tiny_model(99)
    ckpt.load_model_weights(restored, found[-1])
    for a, b in zip(restored.state_dict().values(), tiny_model(3).state_dict().values()):
        assert torch.equal(a, b)
    # The model directory is a plain Hugging Face checkpoint.
    plain = AutoModelForCausalLM.from_pretrained(found[-1] / "model")
    assert torch.equal(plain.model.embed_tokens.weight, tiny_model(3).model.embed_tokens.weight)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 5, tiny_model(5), None, {"trainer": {"step": 5}}, keep_last=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 6, tiny_model(6), None, {"trainer": {"step": 6}}, keep_last=1)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000005"
    assert ckpt.load_state(latest)["trainer"]["step"] == 5
    restored = tiny_model(0)
    ckpt.load_model_weights(restored, latest)
    assert torch.equal(restored.lm_head.weight, tiny_model(5).lm_head.weight)
    # The next successful save cleans the half-written directory and rotates normally.
    ckpt.save_checkpoint(tmp_path, 6, tiny_model(6), None, {"trainer": {"step": 6}}, keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000006"]


def test_incomplete_checkpoint_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="state.pt"):
        ckpt.load_state(tmp_path / "empty")
