"""A lowmem optimizer in transformers.Trainer (`optimizers=(optimizer, scheduler)`): it trains, and a run resumed
from Trainer's own checkpoint ends with the weights of the uninterrupted run, bit for bit."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lowmem.optim import create_optimizer

OPTIONS = {"galore": dict(rank=4, update_gap=2), "adamw8bit": {}, "fira": dict(rank=4, update_gap=2)}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=32))


def rows() -> list[dict]:
    """A learnable pattern (each row a shifted counting sequence), so six updates visibly lower the loss."""
    return [{"input_ids": (ids := (torch.arange(16) + i) % 64), "labels": ids} for i in range(24)]


def train(out, name, max_steps, resume=None):
    model = tiny_llama()
    optimizer = create_optimizer(model, name, lr=0.01, **OPTIONS[name])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=3,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows(), optimizers=(optimizer, schedule))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_a_lowmem_optimizer_trains_and_resumes_exactly_in_hf_trainer(tmp_path, name):
    full, trainer = train(tmp_path / "full", name, 6)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    train(tmp_path / "cut", name, 3)
    resumed, _ = train(tmp_path / "cut", name, 6, resume=str(tmp_path / "cut" / "checkpoint-3"))
    for (key, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), key
