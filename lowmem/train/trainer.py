"""The training loop: accumulation, clipping, schedule, precision, evaluation, checkpoints, metrics.

Read top to bottom: `Trainer.__init__` locks the run directory and builds every component from the config (or
restores them from a checkpoint), `fit` runs updates until the token/step budget is spent or a signal asks it
to stop.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from tqdm.auto import tqdm

from lowmem import console, library_output
from lowmem.console import log
from lowmem.config.schema import flatten
from lowmem.data.batches import eval_hint
from lowmem.data.loaders import build_train_batches, eval_batches
from lowmem.data.sources import data_source, holds_tokenizer
from lowmem.data.tokenizer import build_tokenizer, load_saved_tokenizer
from lowmem.distributed import launch
from lowmem.distributed.runtime import RUNTIMES
from lowmem.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, TrainingInterrupted
from lowmem.memory.report import (format_memory_table, format_rank_table, memory_report, state_dtype_of,
                                  state_versus_adamw, zero_formula)
from lowmem.model.build import build_meta_model, build_model, count_parameters, prepare_for_training, weight_dtype
from lowmem.optim import build_optimizer
from lowmem.optim.groups import check_options_against_model
from lowmem.optim.in_backward import UpdateInBackward
from lowmem.train import checkpoint as ckpt
from lowmem.train import progress as progress_lines
from lowmem.train.config import Config, config_changes
from lowmem.train.metrics import MetricsLog
from lowmem.train.rundir import RunLock, StopOnSignal
from lowmem.train.schedule import build_scheduler

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted"]

# Keys a resumed run may change; any other difference from the checkpoint's config is refused. The run's name
# and directory say where it is, not what it trains: a copied run directory resumes under its new name.
RESUMABLE_CHANGES = ("run.name", "run.out_dir", "checkpoint.", "log.", "train.max_steps", "train.max_tokens",
                     "train.eval_every", "train.eval_tokens", "train.eval_batch_size", "train.log_every",
                     "train.device", "distributed.")


def check_resume_config(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume with a different model, data, optimizer or schedule than the checkpoint was made with:
    the restored state would silently override it (or fail to load)."""
    old, new = flatten(saved), flatten(current)
    changed = [key for key in config_changes(saved, current) if not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed)
        raise ConfigError(f"checkpoint.resume: {path} was made with a different config ({details}); resume with "
                          f"the original values, or start a new run (another run.name)")


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss: labels are shifted by one inside the model, and -100 is ignored."""
    return int((batch["labels"][:, 1:] != -100).sum())


class Trainer:
    """One run in one run directory, which it locks from construction until `fit` returns (or `close`).

    Under a launcher (torchrun, deepspeed, accelerate launch) every rank builds a Trainer: each reads its own
    shard of the data, the backend (lowmem.distributed.runtime) averages the gradients, and only rank 0 locks
    the run directory, prints, logs metrics and writes checkpoints."""

    def __init__(self, config: Config):
        self.config = config
        self.run_dir = config.run_dir
        library_output.quiet_accelerator_probe()
        library_output.set_library_progress(config.log.progress)
        _, local_rank, _ = launch.launcher_world()
        self.device = launch.pick_device(launch.device_for(config.train.device, local_rank))
        self.dist = launch.init(config.distributed.backend, config.distributed.timeout_s, self.device)
        console.configure(self.dist.is_main)  # only rank 0 speaks; every rank's warnings and errors reach stderr
        self.runtime = RUNTIMES[self.dist.backend](self.dist, config)
        self._lock = RunLock(self.run_dir)
        if self.dist.is_main:
            self._lock.acquire()  # first: a busy or unusable run directory fails before any work
        try:
            self._build()
        except BaseException:
            self._lock.release(discard=True)
            raise

    def _build(self) -> None:
        cfg = self.config
        # The state is held only until restored below: it holds a full copy of the optimizer state.
        self.resume_from, resume_state = self._find_resume_checkpoint() or (None, None)
        torch.manual_seed(cfg.run.seed)

        embedding_rows = self._check_against_model()
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.data,
                                         saved_dir=self.resume_from / "model" if self.resume_from else None)
        self._check_vocabulary(embedding_rows)
        vocab_size = cfg.model.vocab_size or len(self.tokenizer)

        model = build_model(cfg.model, vocab_size, self.device, weight_dtype(cfg.model, cfg.train.precision),
                            tokenizer=self.tokenizer)
        if cfg.optimizer.update_in_backward and self.dist.distributed:
            raise ConfigError(f"optimizer.update_in_backward: steps each weight during backward, before the "
                              f"{self.dist.backend} backend has averaged its gradient over {self.dist.world_size} "
                              f"ranks; set it to false to train on several ranks")
        # Weights before the backend copies them (DeepSpeed's fp32 partitions). A LoRA run continues from the
        # base weights of model.pretrained, which it never changes, and the checkpoint's adapter.
        lora = cfg.model.lora is not None
        if self.resume_from is not None and not lora:
            ckpt.load_model_weights(model, self.resume_from)
        model = prepare_for_training(model, cfg.model)
        if self.resume_from is not None and lora:
            from lowmem.model.lora import load_adapter

            load_adapter(model, self.resume_from)
        self.grad_accum = self.runtime.grad_accum()
        self.runtime.prepare(model, build_optimizer(model, cfg.optimizer))
        self.model, self.optimizer = self.runtime.module, self.runtime.optimizer
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg.train.schedule, cfg.train.warmup_steps,
                                         self.total_steps, cfg.train.min_lr_ratio)
        self.in_backward = UpdateInBackward(self.optimizer) if cfg.optimizer.update_in_backward else None

        self.train_batches = build_train_batches(cfg.data, self.tokenizer, cfg.train.batch_size, cfg.run.seed,
                                                 self.dist.rank, self.dist.world_size)
        every_rank = eval_batches(cfg.data, self.tokenizer, cfg.train.eval_batch_size or cfg.train.batch_size,
                                  cfg.train.eval_tokens)
        self.eval_set = every_rank[self.dist.rank::self.dist.world_size]  # the ranks sum their parts
        self.step = 0
        self.tokens_seen = 0
        self.parts = self._parts()
        if self.resume_from is not None:
            self._restore(self.resume_from, resume_state)
            del resume_state
            if self.dist.is_main:  # once: the other ranks wait at the barrier, then see the same directory
                moved = ckpt.set_aside_newer(self.run_dir, self.step)
                if moved is not None:
                    log.info(f"moved the checkpoints after step {self.step} (a run this one replaces, or ones that "
                          f"cannot be loaded) to {moved}")
            self.runtime.barrier()

        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.record(), sort_keys=False))
        self.metrics = MetricsLog(self.run_dir, cfg.log.tensorboard and self.dist.is_main,
                                  resume_step=self.step if self.resume_from else None, enabled=self.dist.is_main)

    # -- construction helpers ------------------------------------------------------------------------------

    def _find_resume_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its state, or None for a fresh run. `auto` takes the newest
        checkpoint that loads, warning about each newer one that does not."""
        if self.dist.is_main:  # the lock holder finishes what a killed save left, before anything is listed
            for path in ckpt.recover_interrupted_saves(self.run_dir):
                log.info(f"restored the checkpoint {path}, which a save killed while replacing it had set aside")
        self.runtime.barrier()
        resume = self.config.checkpoint.resume
        if resume is None:
            if ckpt.list_checkpoints(self.run_dir):
                raise ConfigError(f"run.name: '{self.run_dir}' already holds checkpoints of another run; set "
                                  "checkpoint.resume=auto to continue it, or choose another run.name")
            return None
        if resume != "auto":
            try:
                return Path(resume), self._load_resume_state(Path(resume))
            except CheckpointError as err:
                raise CheckpointError(f"checkpoint.resume: {err}") from err
        candidates = ckpt.list_checkpoints(self.run_dir)
        for path in reversed(candidates):
            try:
                return path, self._load_resume_state(path)
            except CheckpointError as err:
                then = "falling back to the checkpoint before it" if path != candidates[0] else "no older one left"
                log.warning(f"warning: {err}; {then}")
        if candidates:
            raise CheckpointError(f"checkpoint.resume: none of the {len(candidates)} checkpoints in "
                                  f"{ckpt.checkpoint_dir(self.run_dir)} can be loaded (see the warnings above); "
                                  "move them aside to start the run afresh")
        return None  # nothing to resume: start fresh

    def _load_resume_state(self, path: Path) -> dict[str, Any]:
        """A checkpoint's state, once its config matches and its weights and tokenizer load (CheckpointError
        naming it otherwise); the weights are read again when restored."""
        state = ckpt.load_state(path)
        check_resume_config(state["config"], self.config.to_dict(), path)
        ckpt.check_weights(path)
        if holds_tokenizer(path / "model"):
            load_saved_tokenizer(path / "model")
        return state

    def _check_against_model(self) -> int | None:
        """Fail on impossible values (rank > a matrix side, sequences longer than the model's positions) before
        the tokenizer or any weight is built. The projected weights' shapes do not depend on the vocabulary,
        so a placeholder size serves. Returns a pretrained model's embedding rows."""
        meta = build_meta_model(self.config.model, self.config.model.vocab_size or 32000)
        meta = prepare_for_training(meta, self.config.model)  # freeze / LoRA errors first
        check_options_against_model(meta, self.config.optimizer)
        max_positions = meta.config.max_position_embeddings
        if self.config.data.seq_len > max_positions:
            raise ConfigError(f"data.seq_len: {self.config.data.seq_len} exceeds the model's "
                              f"max_position_embeddings {max_positions}")
        return meta.get_input_embeddings().num_embeddings if self.config.model.pretrained else None

    def _check_vocabulary(self, embedding_rows: int | None) -> None:
        """Every token id must index a row of the embedding (an id past it crashes the first forward, with a
        device assert on CUDA)."""
        cfg, size = self.config, len(self.tokenizer)
        if embedding_rows is not None and size > embedding_rows:
            source = data_source(cfg.data).describe_tokenizer() or f"tokenizer.name '{cfg.tokenizer.name}'"
            raise ConfigError(f"tokenizer: {source} has {size} tokens but the pretrained model "
                              f"'{cfg.model.pretrained}' has {embedding_rows} embedding rows; leave tokenizer.name "
                              "unset to use the model's own tokenizer, or name one that fits")
        if cfg.model.vocab_size is not None and cfg.model.vocab_size < size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {size} "
                              f"tokens; leave model.vocab_size unset (the tokenizer's size) or set it to at "
                              f"least {size}")

    @property
    def global_batch(self) -> int:
        """Sequences per update over every rank."""
        return self.config.train.batch_size * self.grad_accum * self.dist.world_size

    def _total_steps(self) -> int:
        t, d = self.config.train, self.config.data
        if t.max_tokens is None:
            return t.max_steps
        return max(1, math.ceil(t.max_tokens / (self.global_batch * d.seq_len)))

    @property
    def progress(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size}

    def _set_progress(self, saved: dict[str, int]) -> None:
        self.step, self.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])

    def _parts(self) -> dict[str, ckpt.Stateful]:
        """Everything a checkpoint holds besides the weights, by name: the one list that saving and restoring
        walk. The optimizer state is keyed by parameter name (it loads on any number of ranks); the data
        position is every rank's, gathered on rank 0."""
        return {
            "optimizer": ckpt.StateOf(self.runtime.optimizer_state, self.runtime.load_optimizer_state),
            "scheduler": self.scheduler,
            "data_ranks": ckpt.StateOf(lambda: self.runtime.gather(self.train_batches.state_dict()),
                                       self.train_batches.restore),
            "rng": ckpt.StateOf(ckpt.rng_state, ckpt.set_rng_state),
            "trainer": ckpt.StateOf(lambda: self.progress, self._set_progress),
            "config": ckpt.StateOf(self.config.to_dict),  # recorded; compared before resuming (check_resume_config)
        }

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """Everything but the weights (loaded before the backend wrapped the model)."""
        ckpt.restore_parts(self.parts, state, path)
        log.info(f"resumed from {path} at step {self.step}")

    def training_state(self) -> dict[str, Any] | None:
        """Everything but the weights, on rank 0 (None elsewhere); every rank must call it (the optimizer state
        and the data positions are gathered)."""
        state = ckpt.save_parts(self.parts)
        return state if self.dist.is_main else None

    def save(self) -> Path:
        """Write a checkpoint of this step, unless a weight or an optimizer state tensor is not finite (on any
        rank): then raise TrainingDiverged, so a checkpoint on disk is always one a run can continue from."""
        bad = ckpt.non_finite(list(self.model.named_parameters()) + self.runtime.state_tensors())
        if self.runtime.any(bool(bad)):
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "another rank"
            raise TrainingDiverged(f"non-finite values in {shown}", self.step)
        state = self.training_state()
        final = ckpt.checkpoint_dir(self.run_dir) / f"{ckpt.CHECKPOINT_PREFIX}{self.step:08d}"
        with self.runtime.full_weights():
            if self.dist.is_main:
                final = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, state,
                                             self.config.checkpoint.keep_last)
        self.runtime.barrier()  # no rank goes on (or stops) before the checkpoint exists
        return final

    def close(self) -> None:
        """End the run's hold on its directory (fit does this when it returns)."""
        self.metrics.close()
        self._lock.release()

    # -- one update ----------------------------------------------------------------------------------------

    def _autocast(self):
        if self.config.train.precision == "bf16_autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer update from `grad_accum` micro-batches on every rank; the loss is the mean over all
        target tokens of the global window (token-weighted, not a mean of micro-batch or rank means)."""
        self.runtime.model.train()
        window_tokens = int(self.runtime.sum(sum(target_tokens(b) for b in batches))[0])
        num_items = torch.tensor(window_tokens, device=self.device)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if self.in_backward is not None:
                self.in_backward.arm(last)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.runtime.micro_batch(last):
                with self._autocast():
                    loss = self.runtime.model(**batch, num_items_in_batch=num_items, use_cache=False).loss
                self.runtime.backward(loss)
            loss_sum += loss.item()
        loss_sum = self.runtime.sum(loss_sum)[0]
        if self.in_backward is not None:
            self.in_backward.finish()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum}", self.step + 1)

        grad_norm = None
        if self.in_backward is not None:
            if self.in_backward.non_finite is not None:  # it was not applied
                raise TrainingDiverged(f"the gradient of {self.in_backward.non_finite} became non-finite",
                                       self.step + 1)
        else:
            grad_norm = self.runtime.step(self.config.train.grad_clip)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise TrainingDiverged(f"gradient norm became {grad_norm}", self.step + 1)
        if self.step == 0 and self.resume_from is None:
            self._log_memory()  # optimizer state exists only after the first update; gradients still held
        self.runtime.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += window_tokens
        return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm}

    # -- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss over the fixed held-out set: total loss of every target token / their count."""
        self.runtime.model.eval()
        total, count = 0.0, 0
        one = torch.tensor(1, device=self.device)
        for batch in self.eval_set:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                total += float(self.runtime.model(**batch, num_items_in_batch=one, use_cache=False).loss)
            count += target_tokens(batch)
        total, count = self.runtime.sum(total, count)
        if count == 0:
            raise DataError(f"train.eval_tokens: the held-out set has no target tokens; {eval_hint(self.config.data)}")
        loss = total / count
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}

    # -- the loop ------------------------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to the configured budget (or until `stop_at_step`, to simulate an interruption).

        On SIGINT or SIGTERM the current update is finished, a checkpoint written and TrainingInterrupted
        raised; a second signal raises KeyboardInterrupt at once. The run directory is unlocked on return."""
        if self.dist.is_main:
            self._lock.acquire()  # a second fit() of this trainer takes it again
        try:
            return self._fit(stop_at_step)
        finally:
            self.close()

    def _fit(self, stop_at_step: int | None) -> dict[str, Any]:
        cfg = self.config
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        counts = count_parameters(self.model)
        state_line, saves_nothing = state_versus_adamw(self.model, self.runtime.rules, cfg.optimizer)
        distributed = (f"{self.dist.backend} on {self.dist.world_size} ranks, global batch {self.global_batch} "
                       f"sequences = {cfg.train.batch_size} x {self.grad_accum} accumulation x "
                       f"{self.dist.world_size} ranks") if self.dist.distributed else None
        header = progress_lines.start_header(
            counts=counts, config=cfg, tokens_per_update=self.global_batch * cfg.data.seq_len,
            total_steps=self.total_steps, device=self.device, state_dtype=state_dtype_of(self.model, self.optimizer),
            state_line=("warning: " if saves_nothing else "") + state_line, distributed=distributed)
        for line in header[:-1]:
            log.info(line)
        (log.warning if saves_nothing else log.info)(header[-1])
        if self.step >= end:
            log.info(f"already at step {self.step} of {self.total_steps}: nothing to train, evaluating")
            return {"step": self.step, "tokens": self.tokens_seen, **self.evaluate()}
        batches = iter(self.train_batches)
        bar = progress_lines.draws_bar(cfg.log.progress, self.dist.is_main)
        progress = tqdm(total=end, initial=self.step, disable=not bar, dynamic_ncols=True)
        clock = progress_lines.RunClock(self.step, end)
        losses = progress_lines.LossWindow()
        start_tokens, peak = self.tokens_seen, 0
        last: dict[str, Any] = {}
        window_start, window_tokens = time.perf_counter(), 0
        with StopOnSignal() as stop:
            try:
                while self.step < end:
                    record = self.train_step(self._next_batches(batches))
                    losses.add(record["loss"])
                    window_tokens += self.global_batch * cfg.data.seq_len
                    evaluate_now = ((cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                                    or self.step == self.total_steps)
                    log_now = self.step % cfg.train.log_every == 0 or self.step == end or evaluate_now
                    if log_now:
                        record.update(step=self.step, tokens=self.tokens_seen, loss_last=record["loss"],
                                      loss=losses.take(),
                                      tokens_per_s=window_tokens / (time.perf_counter() - window_start))
                        if not bar:
                            log.info(progress_lines.step_line(record, clock))
                        if evaluate_now:
                            record.update(self.evaluate())
                            log.info(progress_lines.eval_line(record))
                        if self.device.type == "cuda":  # the peak of this logging window, eval included
                            record["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
                            torch.cuda.reset_peak_memory_stats(self.device)
                            peak = max(peak, record["cuda_peak_allocated_bytes"])
                        self.metrics.log(record)
                        last = record
                        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                             tok_s=f"{record['tokens_per_s']:.0f}")
                    progress.update(1)
                    saved = None
                    if ((cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                            or self.step == self.total_steps):
                        saved = self.save()
                    if self.runtime.any(stop.signum is not None) and self.step < self.total_steps:
                        signum = stop.signum or signal.SIGTERM  # another rank received it
                        raise TrainingInterrupted(signum, self.step, saved or self.save())
                    if log_now:  # the next timing window starts after this step's eval and save
                        window_start, window_tokens = time.perf_counter(), 0
            finally:
                progress.close()
        log.info(progress_lines.end_line(step=self.step, tokens_seen=self.tokens_seen, clock=clock,
                                         final=dict(last, tokens_at_start=start_tokens),
                                         state_bytes=self.runtime.optimizer_state_bytes(), peak=self._peak_memory(peak)))
        return last

    def _peak_memory(self, logged_peak: int) -> str | None:
        """The CUDA peak over the run (the logging windows reset torch's counter), or None off CUDA."""
        if self.device.type != "cuda":
            return None
        from lowmem.memory.report import format_bytes

        return f"CUDA peak allocated {format_bytes(max(logged_peak, torch.cuda.max_memory_allocated(self.device)))}"

    def _next_batches(self, batches: Iterator[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        try:
            return [next(batches) for _ in range(self.grad_accum)]
        except DataError as err:  # each rank reads its own share of the data: only this one met the fault
            err.rank_local = True
            raise

    def _log_memory(self) -> None:
        report = memory_report(self.model, self.optimizer)
        report["optimizer_state_bytes"] = self.runtime.optimizer_state_bytes()
        report.update(self.runtime.memory_extra())
        reports = self.runtime.gather(report)
        if not self.dist.is_main:
            return
        # what a study's table names beside the bytes: the moments' storage and the model's size
        described = {"state_dtype": state_dtype_of(self.model, self.optimizer), "parameters": count_parameters(self.model)["total"]}
        if len(reports) == 1:
            log.info("memory (tensor bytes after the first update):\n" + format_memory_table(report))
            self.metrics.log({"step": self.step, "event": "memory", **described, **report})
            return
        stage = getattr(self.runtime, "stage", 0)  # DDP keeps everything on every rank, as stage 0
        state = sum(r["optimizer_state_bytes"] for r in reports) if stage >= 1 else report["optimizer_state_bytes"]
        formula = zero_formula(self.model, state, self.dist.world_size, stage)
        log.info(f"memory per rank (tensor bytes after the first update, {self.dist.backend}):\n" + format_rank_table(reports, {f"ZeRO-{stage} formula": formula}))
        self.metrics.log({"step": self.step, "event": "memory", **described, **report, "ranks": reports,
                          "zero_formula": formula})
