"""What a run says while it trains: a start header that lets a reader reproduce it, one plain line per
`train.log_every` updates (and one per eval) when no progress bar is drawn, and an end line.

The bar (tqdm) is drawn only when stderr is a terminal and `log.progress` is on; a batch job, whose stderr is a
file, gets the plain lines instead of carriage-return frames."""
from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


def draws_bar(progress: bool, is_main: bool) -> bool:
    """Whether this process draws the progress bar: asked for, on rank 0, with a terminal to draw on."""
    return progress and is_main and sys.stderr.isatty()


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def tokens(count: float) -> str:
    """12,345 / 1.23M / 4.56B: a token count for reading."""
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    return f"{count:,.0f}"


@dataclass
class LossWindow:
    """The train losses since the last logged update: the logged loss is their mean (as HF Trainer logs), the
    last batch's is kept beside it."""

    losses: list[float] = field(default_factory=list)

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def take(self) -> Optional[float]:
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses.clear()
        return mean


@dataclass
class RunClock:
    """Wall time since the run's first update in this process, and the updates it has taken."""

    start_step: int
    total_steps: int
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def cpu(self) -> float:
        return time.process_time() - self.cpu_started

    def remaining(self, step: int) -> float:
        done = step - self.start_step
        return self.elapsed() / done * (self.total_steps - step) if done > 0 else math.nan


def step_line(record: dict[str, Any], clock: RunClock) -> str:
    """`step 20/300  loss 3.4120  lr 1.00e-03  5,321 tok/s  0:01:12 elapsed, 0:16:40 left`."""
    left = clock.remaining(record["step"])
    return (f"step {record['step']}/{clock.total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s  {duration(clock.elapsed())} elapsed"
            + (f", {duration(left)} left" if math.isfinite(left) else ""))


def eval_line(record: dict[str, Any]) -> str:
    return (f"eval at step {record['step']}: loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f} "
            f"({tokens(record['eval_tokens'])} tokens)")


def effective_lr(options) -> str:
    """The lr the projected weights move at, where it differs from optimizer.lr (the update's scale, the
    target lr scale): what a reader compares across methods."""
    lr = getattr(options, "lr", None)
    if lr is None:
        return ""
    scale = getattr(options, "scale", 1.0) if getattr(options, "projects", False) else 1.0
    factor = scale * getattr(options, "target_lr_scale", 1.0)
    if factor == 1.0:
        return ""
    return f", target weights move at {lr:g} x {factor:g} = {lr * factor:.3g}"


def start_header(*, counts: dict[str, int], config, tokens_per_update: int, total_steps: int, device: torch.device,
                 state_dtype: str, state_line: str, distributed: Optional[str]) -> list[str]:
    """The lines that open a run: model, batch and budget, precision, optimizer, state."""
    opt, t = config.optimizer, config.train
    model = config.model.pretrained or config.model.preset
    share = counts["trainable"] / max(counts["total"], 1)
    params = (f"{counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
              f"{counts['trainable'] / 1e6:.2f}M trainable ({share:.1%})")
    if config.model.lora is not None:  # the adapters are the trainable share; full fine-tuning would train all
        from lowmem.memory.report import format_bytes

        params += (f"; LoRA adapters r={config.model.lora.r} (full fine-tuning AdamW would hold "
                   f"{format_bytes(8 * counts['total'])} of fp32 moments)")
    lines = [f"model: {model}, {params}",
             f"data: {tokens(tokens_per_update)} tokens per update, {total_steps} updates = "
             f"{tokens(tokens_per_update * total_steps)} tokens; precision {t.precision}, device {device}",
             *([f"distributed: {distributed}"] if distributed else []),
             f"optimizer: {opt.name}, lr {getattr(opt, 'lr', None)}{effective_lr(opt)}, weight decay "
             f"{opt.weight_decay}, moments {state_dtype}",
             state_line]
    return lines


def end_line(*, step: int, tokens_seen: int, clock: RunClock, final: dict[str, Any], state_bytes: int,
             peak: Optional[str]) -> str:
    from lowmem.memory.report import format_bytes

    trained = tokens_seen - final.get("tokens_at_start", 0)
    rate = trained / clock.elapsed() if clock.elapsed() > 0 else 0.0
    ppl = f", eval perplexity {final['eval_ppl']:.2f}" if "eval_ppl" in final else ""
    return (f"finished at step {step}: {tokens(tokens_seen)} tokens seen, {duration(clock.elapsed())} wall "
            f"({duration(clock.cpu())} CPU), {rate:,.0f} tok/s on average{ppl}; optimizer state "
            f"{format_bytes(state_bytes)}" + (f", {peak}" if peak else ""))
