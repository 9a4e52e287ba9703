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

import yaml
from typing import TYPE_CHECKING

from lowmem.console import log
from lowmem.distributed import launch
from lowmem.errors import REPORTED, TrainingDiverged, report_line
from lowmem.train.config import load_config

if TYPE_CHECKING:
    from lowmem.train.trainer import Trainer


EXAMPLES = """examples:
  python train.py configs/quickstart.yaml                           the embedded default, no download
  python train.py configs/quickstart.yaml optimizer.name=galore optimizer.rank=64
  python train.py configs/c4_pretrain.yaml configs/optimizers/fira.yaml model.preset=llama_130m
  python train.py configs/quickstart.yaml --dry-run                 check a config, plan its memory, train nothing
  torchrun --nproc_per_node 2 train.py configs/quickstart.yaml      the same YAML on two ranks"""


def _epilog() -> str:
    from dataclasses import fields

    from lowmem.optim import OPTIMIZERS
    from lowmem.train.config import Config

    sections = ", ".join(f.name for f in fields(Config))
    return (f"config sections: {sections} (each key as dotted.key=value; README and configs/ say more)\n"
            f"optimizers (optimizer.name; --list-optimizers describes them): {', '.join(sorted(OPTIMIZERS))}\n\n"
            + EXAMPLES)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Pretrain or fine-tune a LLaMA-style model from "
                                     "YAML configs and dotted overrides.", epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    parser.add_argument("more", nargs="*", metavar="ARG",
                        help="more YAML files merged in order (e.g. configs/optimizers/galore.yaml), then "
                             "dotted.key=value overrides (e.g. optimizer.lr=0.01)")
    parser.add_argument("--list-optimizers", action="store_true",
                        help="list every registered optimizer with its parts and preset lr, and stop")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (what the run directory's config.yaml records) and stop")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and validate the config, build the model on the meta device, print the run's "
                             "header, its data and its memory plan, and stop: nothing is trained or written")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser


def main(argv: list[str] | None = None) -> int:
    command = parser()
    args, unknown = command.parse_known_args(argv)
    if unknown:
        log.warning(f"config error: {_unknown_flag(unknown)}")
        return 2
    if args.list_optimizers:
        for line in optimizer_lines():
            print(line)
        return 0
    if args.config is None:
        command.error("a config file is needed (e.g. configs/quickstart.yaml)")
    with launch.leave_together() as outcome:
        outcome.status = _run(args)
    return outcome.status


def _unknown_flag(unknown: list[str]) -> str:
    """What to write instead of an option train.py does not take: `--max_steps 10` -> train.max_steps=10."""
    from lowmem.config import flatten, to_dict
    from lowmem.errors import closest
    from lowmem.train.config import Config

    flag = next((u for u in unknown if u.startswith("-")), unknown[0])
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    value = flag.split("=", 1)[1] if "=" in flag else (unknown[unknown.index(flag) + 1]
                                                        if unknown.index(flag) + 1 < len(unknown) else "...")
    keys = sorted(flatten(to_dict(Config())))
    matches = [key for key in keys if key.rsplit(".", 1)[-1] == name]
    if matches:
        return f"unknown option '{flag}': train.py takes settings as dotted overrides; did you mean {matches[0]}={value}?"
    return (f"unknown option '{flag}'{closest(name, [k.rsplit('.', 1)[-1] for k in keys])}; settings are dotted "
            "overrides such as train.max_steps=10 (train.py --help lists the sections)")


def optimizer_lines() -> list[str]:
    """One line per registered optimizer: its name, preset lr, and the parts it composes."""
    from lowmem.optim import OPTIMIZERS

    lines = []
    for name in sorted(OPTIMIZERS):
        options = OPTIMIZERS[name].options()
        parts = [f"{key} {getattr(options, key)}" for key in ("projector", "core", "residual", "state_dtype")
                 if hasattr(options, key)]
        transforms = getattr(options, "transforms", [])
        parts += [f"transforms {'+'.join(transforms)}"] if transforms else []
        lr = getattr(options, "lr", None)
        if not hasattr(options, "projector"):  # a baseline outside the pipeline: which library's optimizer
            parts = ["bitsandbytes AdamW8bit" if name.startswith("bnb_") else "torch.optim.AdamW"] + parts
        lines.append(f"{name:22s} lr {lr if lr is not None else 'relative step':<8}  " + ", ".join(parts))
    return lines


def _run(args: argparse.Namespace) -> int:
    files = [args.config] + [a for a in args.more if "=" not in a]
    overrides = [a for a in args.more if "=" in a]
    trainer = None
    try:
        config = load_config(files, overrides)
        if args.print_config:
            print(yaml.safe_dump(config.record(), sort_keys=False), end="")
            return 0
        if args.dry_run:
            return dry_run(config, files, overrides)
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


def dry_run(config, files: list[str], overrides: list[str]) -> int:
    """What a run would be, without training: the header on the meta-device model, the data, the memory plan."""
    from lowmem.data.sources import data_source
    from lowmem.distributed.deepspeed_settings import grad_accum_for
    from lowmem.memory import planner
    from lowmem.memory.report import state_dtype_of, state_versus_adamw
    from lowmem.model.build import build_meta_model, count_parameters, prepare_for_training
    from lowmem.optim import build_optimizer
    from lowmem.train.progress import start_header

    world = launch.launcher_world()[2]
    vocab = planner.vocab_size(config, [])  # as the planner sizes it: no tokenizer is fitted or downloaded
    model = prepare_for_training(build_meta_model(config.model, vocab), config.model)
    optimizer = build_optimizer(model, config.optimizer)
    state_line, _ = state_versus_adamw(model, optimizer, config.optimizer)
    tokens_per_update = config.train.batch_size * grad_accum_for(config, world) * world * config.data.seq_len
    steps = config.train.max_steps if config.train.max_tokens is None else -(-config.train.max_tokens // tokens_per_update)
    for line in start_header(counts=count_parameters(model), config=config, tokens_per_update=tokens_per_update,
                             total_steps=steps, device=config.train.device,
                             state_dtype=state_dtype_of(model, optimizer), state_line=state_line, distributed=None):
        print(line)
    print(f"data: {data_source(config.data).describe()}, sequences of {config.data.seq_len} tokens"
          + (", instruction rows" if config.data.instruct is not None else ""))
    print("dry run: nothing trained or written; the memory plan:")
    return planner.main([*files, *overrides])
