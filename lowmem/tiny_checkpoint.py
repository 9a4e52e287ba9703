"""A tiny local Hugging Face checkpoint and instruction data, to try the fine-tuning configs with no download.

    python -m lowmem.tiny_checkpoint OUT_DIR [--arch llama|gpt2] [--rows 400] [--seed 0]

Writes OUT_DIR/model (a randomly initialised causal LM of a few hundred thousand parameters, saved with
`save_pretrained`, and its byte-level BPE tokenizer with a chat template), OUT_DIR/prompt_response.jsonl
and OUT_DIR/chat.jsonl (the same made-up tasks: reverse, repeat or sort a few words). The fine-tuning configs
`configs/finetune_*.yaml` read `tiny_finetune/` by default:

    python -m lowmem.tiny_checkpoint tiny_finetune && python train.py configs/finetune_lora.yaml
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

EOS, PAD = "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each message as <|role|>content<|end|> and a newline; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("apple river stone cloud green seven music paper light table house north quiet smile bread window "
         "garden yellow silver ocean").split()
TASKS: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse": lambda words: words[::-1],
    "repeat": lambda words: words + words,
    "sort": sorted,
}


def make_examples(rows: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the made-up tasks."""
    rng = random.Random(seed)
    examples = []
    for _ in range(rows):
        task = rng.choice(sorted(TASKS))
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        examples.append((f"{task}: {' '.join(words)}", " ".join(TASKS[task](words))))
    return examples


def make_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted on `texts`, with eos, pad, the chat role tokens and CHAT_TEMPLATE."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS, PAD, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def make_model(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of the architecture, sized to the tokenizer."""
    import torch

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return ARCHITECTURES[arch](len(tokenizer), ids)


ARCHITECTURES: dict[str, Callable[[int, dict], PreTrainedModel]] = {
    "llama": lambda vocab, ids: LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **ids)),
    "gpt2": lambda vocab, ids: GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_tiny_finetune(out_dir: str | Path, arch: str = "llama", rows: int = 400, seed: int = 0) -> Path:
    """Write OUT_DIR/model, OUT_DIR/prompt_response.jsonl and OUT_DIR/chat.jsonl; returns OUT_DIR."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = make_examples(rows, seed)
    tokenizer = make_tokenizer([f"{p}\n{r}" for p, r in examples])
    model = make_model(arch, tokenizer, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_jsonl(out / "prompt_response.jsonl", [{"prompt": p + "\n", "response": r} for p, r in examples])
    write_jsonl(out / "chat.jsonl", [{"messages": [{"role": "user", "content": p},
                                                   {"role": "assistant", "content": r}]} for p, r in examples])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.tiny_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_finetune(args.out_dir, args.arch, args.rows, args.seed)
    print(f"wrote {out}/model ({args.arch}), {out}/prompt_response.jsonl and {out}/chat.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
