"""Trainer throughput against a bare PyTorch loop on the same model, batch and data, in one process.

    python benchmarks/bench_trainer.py [CONFIG.yaml] [dotted.key=value ...] [--steps N] [--rounds R]

Both loops run the same number of updates from the same data iterator type, alternating rounds so machine
noise hits both alike; prints tokens/s of each and the ratio trainer / bare (target >= 0.9).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lowmem.data.loaders import build_train_batches
from lowmem.model.build import build_model
from lowmem.train.config import load_config
from lowmem.train.trainer import Trainer

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def bare_loop(config, tokenizer, steps: int) -> float:
    """The minimal loop: forward, backward, clip, AdamW step, scheduler step. Returns tokens/s."""
    t = config.train
    model = build_model(config.model, len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                            eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, t.warmup_steps)))
    batches = iter(build_train_batches(config.data, tokenizer, t.batch_size, config.run.seed))
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(t.grad_accum):
            batch = next(batches)
            (model(**batch).loss / t.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps * t.grad_accum * t.batch_size * config.data.seq_len / (time.perf_counter() - start)


def trainer_loop(config, steps: int) -> float:
    """The trainer's own fit loop (logging, metrics, progress) for `steps` updates, no eval or checkpoint."""
    trainer = Trainer(config)
    start = time.perf_counter()
    trainer.fit(stop_at_step=steps)
    return steps * config.train.grad_accum * config.train.batch_size * config.data.seq_len / (
        time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    overrides = [f"train.max_steps={args.steps + 1}", "train.eval_every=0", "checkpoint.every=0",
                 "log.progress=false", "run.name=bench_trainer", "run.out_dir=/tmp/lowmem-bench", *args.overrides]
    config = load_config(args.config, overrides)
    torch.manual_seed(0)
    tokenizer = Trainer(config).tokenizer  # fits the BPE once; later Trainers rebuild it the same way
    trainer_speeds, bare_speeds = [], []
    for round_index in range(args.rounds):
        bare_speeds.append(bare_loop(config, tokenizer, args.steps))
        trainer_speeds.append(trainer_loop(config, args.steps))
        print(f"round {round_index + 1}: bare {bare_speeds[-1]:,.0f} tok/s, trainer {trainer_speeds[-1]:,.0f} tok/s")
    bare, ours = statistics.median(bare_speeds), statistics.median(trainer_speeds)
    print(f"median tokens/s: bare loop {bare:,.0f}, trainer {ours:,.0f}; trainer / bare = {ours / bare:.3f} "
          f"({args.steps} updates x {args.rounds} rounds, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
