"""Try a checkpoint: python -m lowmem.generate CHECKPOINT_OR_RUN "prompt" [--max-new-tokens N] [--temperature T]

Loads the model and tokenizer a checkpoint saved (`model/`, plain Hugging Face files), or a run directory's
newest good checkpoint, and prints the prompt's continuation: greedy by default, sampled with --temperature > 0
(seeded by --seed). Errors are reported as one line, as train.py reports them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lowmem.errors import REPORTED, ConfigError, report
from lowmem.export import resolve_checkpoint
from lowmem.library_output import no_transformers_progress, quiet_accelerator_probe


def continuation(checkpoint: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> str:
    """The prompt and what the checkpoint's model writes after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_checkpoint(Path(checkpoint), "generating from") / "model"
    with no_transformers_progress():  # the weight-loading bar of one small read
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    torch.manual_seed(seed)
    sampled = temperature > 0
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampled,
                         temperature=temperature if sampled else None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.generate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, runs/NAME/checkpoints/step_XXXXXXXX, or a run "
                                           "directory runs/NAME (its newest good checkpoint)")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to write after the prompt (64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy decoding (the default); above 0: sampling at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (0)")
    args = parser.parse_args(argv)
    quiet_accelerator_probe()
    try:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
        print(continuation(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    except REPORTED as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
