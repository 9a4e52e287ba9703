"""Command line: `python train.py CONFIG.yaml [dotted.key=value ...]`."""
from __future__ import annotations

import argparse
import sys

from lowmem.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Pretrain or fine-tune a LLaMA-style model.")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("more", nargs="*", metavar="ARG",
                        help="more YAML files merged in order (e.g. configs/optimizers/galore.yaml), then "
                             "dotted.key=value overrides (e.g. optimizer.lr=0.01)")
    args = parser.parse_args(argv)
    files = [args.config] + [a for a in args.more if "=" not in a]
    overrides = [a for a in args.more if "=" in a]
    try:
        config = load_config(files, overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from lowmem.checkpoint import latest_checkpoint
    from lowmem.trainer import Trainer, TrainingDiverged

    try:
        trainer = Trainer(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        final = trainer.fit()
    except TrainingDiverged as err:
        last = latest_checkpoint(trainer.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written"
        print(f"training stopped: {err}; {kept}", file=sys.stderr)
        return 1
    if "eval_ppl" in final:
        print(f"done: step {final['step']}, eval loss {final['eval_loss']:.4f}, eval perplexity "
              f"{final['eval_ppl']:.2f}; run directory {trainer.run_dir}")
    return 0
