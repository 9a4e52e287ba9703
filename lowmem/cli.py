"""Command line: `python train.py CONFIG.yaml [dotted.key=value ...]`, also under `torchrun`, `deepspeed` and
`accelerate launch` (the rank and world size come from the launcher's environment).

An input or environment problem ends with one line on stderr, `<kind> error: <message>` naming the key, file,
row or value, and a non-zero exit (2 for config, data, checkpoint and environment errors such as a full disk,
1 for a diverged run, 128 + the signal's number for SIGINT/SIGTERM); only an unexpected internal error shows a
traceback. On many ranks the line is printed once (by rank 0, or by the one rank that alone met the fault),
and every rank exits with its status right away (lowmem.distributed.launch): a failure on one rank ends the
others too.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lowmem.console import log
from lowmem.distributed import launch
from lowmem.errors import REPORTED, TrainingDiverged, report_line
from lowmem.train.config import load_config

if TYPE_CHECKING:
    from lowmem.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Pretrain or fine-tune a LLaMA-style model.")
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("more", nargs="*", metavar="ARG",
                        help="more YAML files merged in order (e.g. configs/optimizers/galore.yaml), then "
                             "dotted.key=value overrides (e.g. optimizer.lr=0.01)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    with launch.leave_together() as outcome:
        outcome.status = _run(args)
    return outcome.status


def _run(args: argparse.Namespace) -> int:
    files = [args.config] + [a for a in args.more if "=" not in a]
    overrides = [a for a in args.more if "=" in a]
    trainer = None
    try:
        config = load_config(files, overrides)
        from lowmem.train.trainer import Trainer

        trainer = Trainer(config)
        final = trainer.fit()
    except REPORTED as err:
        line, status = report_line(err)
        if isinstance(err, TrainingDiverged):
            line += f"; {_last_good(trainer)}"
        elif isinstance(err, KeyboardInterrupt):  # Ctrl-C before training began, or a second signal during it
            when = f"after step {trainer.step}" if trainer is not None else "before training began"
            line += f" {when}, stopped at once" + (f"; {_last_good(trainer)}" if trainer is not None else "")
        if launch.reports_here(err):  # on many ranks, once
            log.warning(line)
        else:
            launch.wait_for_the_reporter()
        return status
    if "eval_ppl" in final:
        log.info(f"done: step {final['step']}, eval loss {final['eval_loss']:.4f}, eval perplexity "
              f"{final['eval_ppl']:.2f}; run directory {trainer.run_dir}")
    return 0


def _last_good(trainer: Trainer | None) -> str:
    """Which checkpoint a user can continue from: only one that loads and holds finite weights is named."""
    from lowmem.train.checkpoint import last_good_checkpoint

    found = last_good_checkpoint(trainer.run_dir) if trainer is not None else None
    return f"the last good checkpoint is {found}" if found else "there is no good checkpoint to resume from"
