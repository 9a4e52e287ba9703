"""Fine-tuning Hugging Face checkpoints: instruction data with response-only loss, per-document packing,
GaLore/AdamW/LoRA on LLaMA and GPT-2 checkpoints, plain-transformers reloads and exports, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowmem.data import instruct
from lowmem.data.config import DataConfig, InstructConfig
from lowmem.errors import ConfigError, DataError
from lowmem.export import export
from lowmem.train.checkpoint import latest_checkpoint
from lowmem.train.config import load_config
from lowmem.train.metrics import read_metrics
from lowmem.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def finetune_config(tmp_path, tiny: Path, *overrides, base: str = "configs/finetune_adamw.yaml"):
    return load_config(ROOT / base, [
        f"run.out_dir={tmp_path / 'runs'}", f"model.pretrained={tiny / 'model'}",
        f"data.files=[{tiny / 'chat.jsonl'}]", "data.seq_len=64", "train.batch_size=4", "train.max_steps=8",
        "train.warmup_steps=1", "train.eval_every=0", "train.eval_tokens=256", "train.log_every=1",
        "log.progress=false", "checkpoint.every=4", *overrides])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------------------
# Masking


def test_prompt_response_targets_are_the_response_and_eos(tiny_finetune, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_finetune["llama"] / "model")
    row = {"prompt": "reverse: apple stone\n", "response": "stone apple"}
    ids, targets = instruct.encode_prompt_response(row, "row 1", tokenizer, InstructConfig())
    prompt = tokenizer("reverse: apple stone\n", add_special_tokens=False)["input_ids"]
    response = tokenizer("stone apple", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + response
    assert targets == [False] * len(prompt) + [True] * len(response)
    # through the rows: labels are the ids on the response, -100 on the prompt (and the padding)
    _, labels, positions = instruct.build_rows([(ids, targets)], 32, tokenizer.pad_token_id, packing=False)
    assert labels[0].tolist() == [-100] * len(prompt) + response + [-100] * (32 - len(ids))
    assert positions[0, : len(ids)].tolist() == list(range(len(ids)))


def test_chat_targets_are_each_assistant_turn_with_its_end_marker(tiny_finetune):
    tokenizer = AutoTokenizer.from_pretrained(tiny_finetune["gpt2"] / "model")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: stone apple"},
                {"role": "assistant", "content": "apple stone"}, {"role": "user", "content": "repeat: cloud"},
                {"role": "assistant", "content": "cloud cloud"}]
    ids, targets = instruct.encode_chat({"messages": messages}, "row 1", tokenizer, InstructConfig(format="chat"))
    pieces = [("<|system|>be brief<|end|>\n<|user|>sort: stone apple<|end|>\n<|assistant|>", False),
              ("apple stone<|end|>\n", True), ("<|user|>repeat: cloud<|end|>\n<|assistant|>", False),
              ("cloud cloud<|end|>\n", True)]
    expected_ids, expected_targets = [], []
    for text, target in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += piece
        expected_targets += [target] * len(piece)
    assert ids == expected_ids
    assert targets == expected_targets


def test_packed_rows_restart_positions_and_never_target_a_first_token():
    docs = [([5, 6, 7], [True, True, True]), ([8, 9], [False, True]), ([1, 2, 3, 4], [False, False, True, True])]
    cut = [(ids, [False] + t[1:]) for ids, t in docs]  # what iter_documents does to every document
    ids, labels, positions = instruct.build_rows(cut, 6, pad_id=0, packing=True)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7, -100, 9, -100], [-100, -100, 3, 4, -100, -100]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_row_gives_each_token_the_loss_of_its_document_alone(tiny_finetune, arch):
    tiny = tiny_finetune[arch]
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    cfg = DataConfig(source="files", files=[str(tiny / "chat.jsonl")], seq_len=64,
                     instruct=InstructConfig(format="chat"))
    docs = [doc for doc, _ in zip(instruct.iter_documents(cfg, tokenizer, "train"), range(8))]
    ids, labels, positions = instruct.build_rows(docs, 64, tokenizer.pad_token_id, packing=True)
    assert len(ids) < len(docs)  # several documents share a row
    batch = instruct.collate(ids, labels, positions)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    packed_losses = torch.nn.functional.cross_entropy(packed[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                      reduction="none")
    got = packed_losses[batch["labels"][:, 1:] != -100]
    alone = []
    for doc_ids, targets in docs:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([doc_ids])).logits[0, :-1]
        labels_alone = torch.tensor([i if t else -100 for i, t in zip(doc_ids, targets)])[1:]
        losses_alone = torch.nn.functional.cross_entropy(logits, labels_alone, reduction="none")
        alone.append(losses_alone[labels_alone != -100])
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Training, reloading, exporting


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_finetune_trains_and_reloads_with_plain_transformers(tiny_finetune, tmp_path, arch, optimizer):
    base = f"configs/finetune_{optimizer}.yaml"
    config = finetune_config(tmp_path, tiny_finetune[arch], "train.max_steps=10", "checkpoint.every=0",
                             "optimizer.lr=0.01", base=base)
    trainer = Trainer(config)
    final = trainer.fit()
    got = losses(config.run_dir)
    assert sum(got[s] for s in (9, 10)) < 0.85 * sum(got[s] for s in (1, 2)), got
    assert final["eval_tokens"] > 0
    ids = next(iter(trainer.train_batches))["input_ids"]
    expected = logits_of(trainer.model, ids)
    checkpoint = latest_checkpoint(config.run_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    torch.testing.assert_close(logits_of(reloaded, ids), expected)
    exported = export(checkpoint, tmp_path / "export")
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(exported), ids), expected)
    assert AutoTokenizer.from_pretrained(exported).chat_template is not None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_instruction_run_resumes_exactly(tiny_finetune, tmp_path, method):
    base = "configs/finetune_lora.yaml" if method == "lora" else "configs/finetune_adamw.yaml"
    tiny = tiny_finetune["llama"]
    extra = ["model.lora.dropout=0.1"] if method == "lora" else []  # the dropout RNG is resumed too
    whole = finetune_config(tmp_path / "a", tiny, *extra, base=base)
    Trainer(whole).fit()
    split = finetune_config(tmp_path / "b", tiny, *extra, base=base)
    Trainer(split).fit(stop_at_step=5)
    resumed = Trainer(finetune_config(tmp_path / "b", tiny, *extra, "checkpoint.resume=auto", base=base))
    assert resumed.step == 4
    resumed.fit()
    assert losses(split.run_dir) == losses(whole.run_dir)


def test_lora_trains_adapters_only_and_its_checkpoint_is_the_merged_model(tiny_finetune, tmp_path):
    from peft import PeftModel

    tiny = tiny_finetune["gpt2"]  # Conv1D weights: peft's fan_in_fan_out path
    config = finetune_config(tmp_path, tiny, "checkpoint.every=0", base="configs/finetune_lora.yaml")
    trainer = Trainer(config)
    trainer.fit()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(trainer.optimizer.state) == {p for p in trainer.model.parameters() if p.requires_grad}
    got = losses(config.run_dir)
    assert got[8] < got[1]
    checkpoint = latest_checkpoint(config.run_dir)
    ids = next(iter(trainer.train_batches))["input_ids"]
    expected = logits_of(trainer.model, ids)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, ids), expected)
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"),
                                        checkpoint / "adapter").merge_and_unload()
    torch.testing.assert_close(logits_of(by_peft, ids), expected)
    exported = export(checkpoint, tmp_path / "export")
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(exported), ids), expected)


@pytest.mark.parametrize("overrides", [["model.lora.r=4"], ["model.freeze=[model.embed_tokens*, lm_head*]"],
                                       ["optimizer.name=galore", "optimizer.rank=8", "model.freeze=['*layers.0.*']"]],
                         ids=["lora", "freeze", "galore-freeze"])
def test_planner_counts_lora_and_frozen_weights(tiny_finetune, tmp_path, overrides):
    from lowmem.memory.planner import measure_one_update, plan_memory

    config = finetune_config(tmp_path, tiny_finetune["llama"], *overrides)
    plan, counted = plan_memory(config).per_rank(), measure_one_update(config)
    assert plan["parameters"] == counted["params_bytes"]
    assert plan["gradients"] == counted["grads_bytes"] < counted["params_bytes"]
    assert plan["optimizer state"] == counted["optimizer_state_bytes"]


# ---------------------------------------------------------------------------------------------------------
# Bad input


def run_error(config) -> str:
    with pytest.raises(ConfigError) as info:
        Trainer(config)
    return str(info.value)


def test_a_row_without_its_response_is_named_with_its_line_and_file(tiny_finetune, tmp_path):
    data = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "b"}] * 2 + [{"prompt": "c"}])
    config = finetune_config(tmp_path, tiny_finetune["llama"], f"data.files=[{data}]",
                             "data.instruct.format=prompt_response", "data.eval_fraction=0.001")
    message = run_error(config)
    assert "data.instruct.response_field" in message and f"line 3 of '{data}'" in message
    assert "'response'" in message


def test_chat_rows_without_messages_are_named(tiny_finetune, tmp_path):
    data = tiny_finetune["llama"] / "prompt_response.jsonl"
    message = run_error(finetune_config(tmp_path, tiny_finetune["llama"], f"data.files=[{data}]"))
    assert "data.instruct.messages_field" in message and f"line 1 of '{data}'" in message
    assert "format=prompt_response" in message


def test_a_tokenizer_without_chat_template_is_refused_for_messages(tiny_finetune, tmp_path):
    model = tmp_path / "no_template"
    AutoModelForCausalLM.from_pretrained(tiny_finetune["llama"] / "model").save_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_finetune["llama"] / "model")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    message = run_error(finetune_config(tmp_path, tiny_finetune["llama"], f"model.pretrained={model}"))
    assert "no chat template" in message and "data.instruct.format" in message


@pytest.mark.parametrize("override, words", [
    ("model.dtype=fp64", ["model.dtype", "'fp64'", "bf16"]),
    ("model.freeze=[decoder.*]", ["model.freeze", "'decoder.*'", "model.layers.N.self_attn.q_proj.weight"]),
    ("model.lora.target_modules=[attention]", ["model.lora.target_modules", "model.layers.N.mlp.up_proj"]),
    ("model.lora.r=0", ["model.lora.r"]),
])
def test_bad_finetune_settings_are_named(tiny_finetune, tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        Trainer(finetune_config(tmp_path, tiny_finetune["llama"], override, base="configs/finetune_lora.yaml"))
    assert all(word in str(info.value) for word in words), str(info.value)


def test_model_dtype_sets_the_weights_dtype(tiny_finetune, tmp_path):
    from lowmem.model.build import weight_dtype

    config = finetune_config(tmp_path, tiny_finetune["llama"], "model.dtype=bf16")
    assert weight_dtype(config.model, config.train.precision) == torch.bfloat16
    config = finetune_config(tmp_path, tiny_finetune["llama"], "model.dtype=auto")
    assert weight_dtype(config.model, config.train.precision) == torch.float32  # the checkpoint's own


def test_instruction_data_needs_the_models_tokenizer(tmp_path, tiny_finetune):
    with pytest.raises(ConfigError, match="data.instruct: needs the tokenizer"):
        load_config(ROOT / "configs/finetune_adamw.yaml", [
            "model.pretrained=null", "model.preset=llama_9m", f"data.files=[{tiny_finetune['llama'] / 'chat.jsonl'}]"])


def test_eval_rows_are_the_held_out_ones(tiny_finetune):
    tiny = tiny_finetune["llama"]
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    cfg = DataConfig(source="files", files=[str(tiny / "prompt_response.jsonl")], seq_len=64, eval_fraction=0.2,
                     instruct=InstructConfig())
    train = {json.dumps(r) for r, _ in instruct.iter_split(cfg, "train")}
    held = {json.dumps(r) for r, _ in instruct.iter_split(cfg, "eval")}
    assert held and train and not (train & held)
    with pytest.raises(DataError, match="eval split"):
        instruct.instruct_eval_batches(DataConfig(**{**cfg.__dict__, "eval_fraction": 1e-9}), tokenizer, 4, 100)


def test_fine_tuning_prints_what_it_reads_and_one_example_with_its_loss_mask(tmp_path, tiny_finetune, capsys):
    config = finetune_config(tmp_path, tiny_finetune["llama"], "data.seq_len=12")
    trainer = Trainer(config)
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("data: ") and "instruction rows" in line)
    read, dropped = (int(summary.split()[1]), int(summary.split(", ")[1].split()[0]))
    rows = trainer.train_batches
    documents = list(instruct.iter_documents(config.data, trainer.tokenizer, "train"))
    assert read - dropped == len(documents) > 0 and "training rows of 12 tokens" in summary
    shown = float(summary.split("; ")[1].split("%")[0]) / 100
    (ids, labels, _), = rows.blocks  # the share printed is the share of the trained tokens the loss covers
    tokens = sum(len(doc) for doc, _ in documents)
    assert shown == pytest.approx(int((labels != -100).sum()) / tokens, abs=0.001)
    assert len(ids) == int(summary.split("dropped")[1].split(", ")[1].split()[0])
    example = next(line for line in out.splitlines() if line.startswith("example (the loss covers"))
    shown_text = example.split("]]): ", 1)[1]  # after the legend
    assert shown_text.count("[[") == shown_text.count("]]") >= 1 and "<|assistant|>" in shown_text.split("[[")[0]
    trainer.close()
