"""The batches a run trains and evaluates on: plain-text sequences (lowmem.data.batches) or instruction rows
(lowmem.data.instruct), as `data.instruct` says."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowmem.data.batches import (
    MapStyleBatches,
    StreamingBatches,
    TrainBatches,
    eval_hint,
    iter_eval_sequences,
    iter_split_sequences,
    make_batch,
    take_rows,
)
from lowmem.data.instruct import InstructBatches, instruct_eval_batches
from lowmem.data.sources import data_source
from lowmem.errors import DataError

if TYPE_CHECKING:
    from lowmem.data.config import DataConfig


def build_train_batches(cfg: DataConfig, tokenizer, batch_size: int, seed: int, rank: int = 0,
                        world_size: int = 1) -> TrainBatches:
    """The training batches of `cfg` for one rank of `world_size`."""
    if cfg.instruct is not None:
        return InstructBatches.build(cfg, tokenizer, batch_size, seed, rank, world_size)
    if cfg.streaming and data_source(cfg).streams:
        return StreamingBatches(cfg, tokenizer, batch_size, seed, rank, world_size)
    blocks = list(iter_split_sequences(cfg, tokenizer, "train"))
    return MapStyleBatches(blocks, cfg.seq_len, batch_size, seed, rank, world_size)


def eval_batches(cfg: DataConfig, tokenizer, batch_size: int, max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """A fixed held-out set: the first rows of the eval split holding ~`max_tokens` target tokens, in
    batches of `batch_size` (the last one may be smaller). Deterministic."""
    if cfg.instruct is not None:
        return instruct_eval_batches(cfg, tokenizer, batch_size, max_tokens)
    ids, lengths = take_rows(iter_eval_sequences(cfg, tokenizer), max_tokens)
    if len(ids) == 0:
        raise DataError(f"the eval split has no documents: {eval_hint(cfg)}")
    return [make_batch(ids[i:i + batch_size], lengths[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
