"""Training and evaluation data: documents from a source, tokenized into fixed-length sequences, served as
endless, resumable, rank-sharded batches.

Sequences are rows of `seq_len` token ids. Packed (default): the documents, each followed by eos, are
concatenated and cut into rows. Padded (`packing: false`, the papers' mode): each document is truncated to
`seq_len - 1` tokens, followed by eos and padded. Labels are the input ids with the padded positions set to
-100 (the model shifts labels itself); masking by position, not by id, keeps eos a target when pad == eos.

Map-style sources (embedded, files, prepared, hub without streaming) are tokenized once and shuffled per
epoch with a permutation from `seed + epoch`. Streaming sources are read on the fly through a shuffle buffer
whose content is part of the state, so resuming is exact (the `datasets` shuffle buffer is not restored by
its `state_dict`).
"""
from __future__ import annotations

import abc
import logging
import zlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from lowmem.data.sources import data_source, document_text, load_source, naming_source, source_names
from lowmem.errors import DataError

if TYPE_CHECKING:
    from lowmem.data.config import DataConfig

Split = Literal["train", "eval"]
TOKENIZE_CHUNK_DOCS = 512  # documents per tokenizer call: large enough for the fast tokenizer's threads


# ---------------------------------------------------------------------------------------------------------
# Documents


def is_held_out(text: str, eval_fraction: float) -> bool:
    """Whether a document belongs to the held-out eval set: a stable hash of its text, not its position."""
    return zlib.crc32(text.encode("utf-8")) < eval_fraction * 2**32


def iter_documents(cfg: DataConfig, split: Split) -> Iterator[str]:
    """The non-empty text documents of a split, in source order.

    The eval split is `cfg.eval_split` when set, else the documents picked by `is_held_out`, which the
    train split then never yields. `cfg.max_docs` caps the train split only.
    """
    source = data_source(cfg)
    if cfg.eval_split is not None and not source.named_splits:
        raise DataError(f"data.eval_split: only {source_names('named_splits')} datasets have named splits; leave it "
                        "unset to hold out data.eval_fraction of the documents")
    named_eval = cfg.eval_split is not None
    split_name = cfg.eval_split if (split == "eval" and named_eval) else cfg.split
    count = 0
    for text in source.documents(split_name):
        if not text.strip():
            continue
        if not named_eval and is_held_out(text, cfg.eval_fraction) != (split == "eval"):
            continue
        if split == "train" and cfg.max_docs is not None and count >= cfg.max_docs:
            return
        count += 1
        yield text


# ---------------------------------------------------------------------------------------------------------
# Tokenized documents -> fixed-length sequences


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (the sequence builder adds eos)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a `tokenizers` tokenizer: its batch call without offsets is ~30% faster
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    # verbose=False: documents longer than the tokenizer's model_max_length are expected here.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


class SequenceBuilder:
    """Turns tokenized documents into rows of `seq_len` ids: packed, or one padded row per document."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, packing: bool):
        self.seq_len, self.eos_id, self.pad_id, self.packing = seq_len, eos_id, pad_id, packing
        self.tokens: list[int] = []  # ids added and not yet taken
        self.doc_lengths: list[int] = []  # padded mode: the length of each pending document in `tokens`

    def add(self, documents: Iterable[list[int]]) -> None:
        for ids in documents:
            if not self.packing:
                ids = ids[: self.seq_len - 1]
                self.doc_lengths.append(len(ids) + 1)
            self.tokens.extend(ids)
            self.tokens.append(self.eos_id)

    def num_ready(self) -> int:
        """Complete rows available."""
        return len(self.tokens) // self.seq_len if self.packing else len(self.doc_lengths)

    def take(self, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `num_rows` ready rows (fewer when fewer are ready) as (ids int32 [n, seq_len],
        lengths int32 [n])."""
        ready = min(num_rows, self.num_ready())
        if self.packing:
            lengths = np.full(ready, self.seq_len, dtype=np.int32)
            ids = np.array(self.tokens[: ready * self.seq_len], dtype=np.int32).reshape(ready, self.seq_len)
            del self.tokens[: ready * self.seq_len]
            return ids, lengths
        lengths = np.array(self.doc_lengths[:ready], dtype=np.int32)
        ids = np.full((ready, self.seq_len), self.pad_id, dtype=np.int32)
        flat = np.array(self.tokens[: int(lengths.sum())], dtype=np.int32)
        ids[np.arange(self.seq_len)[None, :] < lengths[:, None]] = flat  # row-major fill = document order
        del self.tokens[: len(flat)], self.doc_lengths[:ready]
        return ids, lengths

    def take_all(self, pad_tail: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every ready row; with `pad_tail` also the packed tail shorter than a row, padded (the end of a
        fixed eval set), else the tail stays for later documents."""
        tail = len(self.tokens) % self.seq_len if (self.packing and pad_tail) else 0
        if tail:
            self.tokens += [self.pad_id] * (self.seq_len - tail)
        ids, lengths = self.take(self.num_ready())
        if tail:
            lengths[-1] = tail
        return ids, lengths

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens": torch.tensor(self.tokens, dtype=torch.long),
                "doc_lengths": torch.tensor(self.doc_lengths, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens = state["tokens"].tolist()
        self.doc_lengths = state["doc_lengths"].tolist()


def sequence_builder(cfg: DataConfig, tokenizer) -> SequenceBuilder:
    return SequenceBuilder(cfg.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.packing)


def iter_sequences(cfg: DataConfig, tokenizer, documents: Iterable[str],
                   pad_tail: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, lengths) row blocks of the documents, tokenized a chunk at a time. Without `pad_tail` the
    packed tail shorter than a row is dropped."""
    builder = sequence_builder(cfg, tokenizer)
    chunk: list[str] = []
    for text in documents:
        chunk.append(text)
        if len(chunk) == TOKENIZE_CHUNK_DOCS:
            builder.add(tokenize(tokenizer, chunk))
            chunk = []
            yield builder.take_all()
    builder.add(tokenize(tokenizer, chunk))
    yield builder.take_all(pad_tail=pad_tail)


def iter_split_sequences(cfg: DataConfig, tokenizer, split: Split) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(ids, lengths) row blocks of a split: a token-row source's own, else its documents tokenized (the eval
    split's packed tail padded, the train split's dropped)."""
    source = data_source(cfg)
    if source.holds_tokens:
        return source.token_blocks(tokenizer, split)
    return iter_sequences(cfg, tokenizer, iter_documents(cfg, split), pad_tail=split == "eval")


def make_batch(ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[1])
    labels[positions[None, :] >= torch.from_numpy(np.asarray(lengths, dtype=np.int64))[:, None]] = -100
    return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------------------
# Training batches


class TrainBatches(abc.ABC):
    """Endless training batches `{"input_ids", "labels"}` of shape [batch_size, seq_len] (int64).

    It is its own iterator: `next(batches)` gives the next batch, and `state_dict()` is the position after the
    last batch given, so a new object with that state loaded continues exactly there.
    """

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size = batch_size
        self.seq_len = seq_len

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def num_sequences(self) -> int | None:
        """Sequences per epoch (all ranks); None for a stream."""
        return None

    def __iter__(self) -> TrainBatches:
        return self

    @abc.abstractmethod
    def __next__(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def restore(self, states: list[dict[str, Any]]) -> None:
        """Continue from the states of every rank of a run that may have had another number of ranks (states[i]
        is rank i's)."""
        if len(states) != self.world_size:
            raise DataError(f"data.streaming: a streamed dataset continues only on the number of ranks it was "
                            f"saved with ({len(states)}), now {self.world_size}; resume on {len(states)} ranks")
        self.load_state_dict(states[self.rank])


class MapStyleBatches(TrainBatches):
    """Batches from sequences held in (ids, lengths) blocks (in memory or memory-mapped shards).

    Every epoch is a permutation of all sequences from `seed + epoch`; the epochs form one endless stream of
    which rank r takes positions r, r + world_size, ... (so ranks never overlap within an epoch)."""

    def __init__(self, blocks: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seq_len)
        self.blocks = [block for block in blocks if len(block[0])]  # tuples of arrays with rows on axis 0
        self.block_starts = np.cumsum([0] + [len(block[0]) for block in self.blocks])
        if self.block_starts[-1] == 0:
            raise DataError("no training sequences: the training documents are empty or shorter than one "
                            "sequence (lower data.seq_len or add documents)")
        if self.block_starts[-1] < batch_size * world_size:  # every batch would repeat sequences
            raise DataError(f"only {self.block_starts[-1]} training sequences of data.seq_len {seq_len}, fewer "
                            f"than one batch needs (train.batch_size {batch_size} x {world_size} ranks); add "
                            f"documents, or lower train.batch_size or data.seq_len")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.position = rank  # next stream position of this rank within `epoch`
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    @property
    def num_sequences(self) -> int:
        return int(self.block_starts[-1])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order_epoch, self._order = epoch, torch.randperm(self.num_sequences, generator=generator)
        return self._order

    def _row(self, index: int) -> tuple[np.ndarray, ...]:
        """Row `index` of every array of its block."""
        block = int(np.searchsorted(self.block_starts, index, side="right")) - 1
        row = index - int(self.block_starts[block])
        return tuple(array[row] for array in self.blocks[block])

    def collate(self, rows: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
        """The batch of `rows` (here: token ids and the length that carries a loss)."""
        return make_batch(np.stack([r[0] for r in rows]), np.array([int(r[1]) for r in rows]))

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            while self.position >= self.num_sequences:
                self.epoch += 1
                self.position -= self.num_sequences
            rows.append(self._row(int(self.epoch_order(self.epoch)[self.position])))
            self.position += self.world_size
        return self.collate(rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_sequences": self.num_sequences,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_sequences", "seed", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"data state: saved with {key}={int(state[key])}, now {getattr(self, key)}; "
                                f"the training data or run setup changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def restore(self, states: list[dict[str, int]]) -> None:
        """Any number of ranks: rank 0's next position is the count of sequences every rank has taken in its
        epoch, so rank r continues at that count + r."""
        state = states[0]
        for key in ("num_sequences", "seed"):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"data state: saved with {key}={int(state[key])}, now {getattr(self, key)}; "
                                f"the training data or run setup changed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"]) + self.rank


class _EmptyShuffleBufferWarningFilter(logging.Filter):
    """Drops datasets' warning that a resumed shuffle buffer lost its content: ours (size 1) is always empty
    between examples; the real buffer is StreamingBatches' own and is restored."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


logging.getLogger("datasets.iterable_dataset").addFilter(_EmptyShuffleBufferWarningFilter())


class StreamingBatches(TrainBatches):
    """Batches from a streaming dataset, tokenized and packed on the fly.

    Each epoch reads the (rank's share of the) stream with the shard order shuffled from `seed + epoch`,
    through a shuffle buffer of `shuffle_buffer` documents. The state is the dataset's position plus the
    buffer's documents, its random generator and the packer's leftover tokens: resuming is exact."""

    def __init__(self, cfg: DataConfig, tokenizer, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__(batch_size, cfg.seq_len)
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        stream = load_source(cfg, cfg.split)
        if cfg.eval_split is None:
            stream = stream.filter(lambda example: not is_held_out(document_text(example, cfg), cfg.eval_fraction))
        self.rank, self.world_size = rank, world_size
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        self.builder = sequence_builder(cfg, tokenizer)
        self.epoch = 0
        self.epoch_read = False  # every document of `epoch` is in the buffer or consumed
        self.shuffle_buffer: list[str] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._dataset: datasets.IterableDataset | None = None
        self._examples: Iterator[dict] | None = None
        self._dataset_state: dict | None = None  # to load into the next epoch's dataset (a resumed run)

    def _read_document(self) -> str | None:
        """The next document of the epoch's stream; None at its end."""
        if self._examples is None:
            self._dataset = self.stream.shuffle(seed=self.seed + self.epoch, buffer_size=1)  # shard order only
            if self._dataset_state is not None:
                self._dataset.load_state_dict(self._dataset_state)
            self._examples = iter(self._dataset)
        with naming_source(self.cfg):
            for example in self._examples:
                text = document_text(example, self.cfg)
                if text.strip():
                    return text
        return None

    def _next_document(self) -> str:
        for _ in range(2):  # when this epoch is used up, the next one must yield a document
            while not self.epoch_read and len(self.shuffle_buffer) < self.cfg.shuffle_buffer:
                text = self._read_document()
                if text is None:
                    self.epoch_read = True
                else:
                    self.shuffle_buffer.append(text)
            if self.shuffle_buffer:
                index = int(torch.randint(len(self.shuffle_buffer), (1,), generator=self.generator))
                last = self.shuffle_buffer.pop()
                if index == len(self.shuffle_buffer):
                    return last
                text, self.shuffle_buffer[index] = self.shuffle_buffer[index], last
                return text
            self.epoch += 1
            self.generator.manual_seed(self.seed + self.epoch)
            self.epoch_read, self._examples, self._dataset_state = False, None, None
        raise DataError(f"no training documents in {data_source(self.cfg).describe()}")

    def __next__(self) -> dict[str, torch.Tensor]:
        while self.builder.num_ready() < self.batch_size:
            self.builder.add(tokenize(self.tokenizer, [self._next_document()]))
        return make_batch(*self.builder.take(self.batch_size))

    def state_dict(self) -> dict[str, Any]:
        live = self._examples is not None
        return {
            "epoch": self.epoch,
            "epoch_read": self.epoch_read,
            "dataset": self._dataset.state_dict() if live else self._dataset_state,
            "shuffle_buffer": list(self.shuffle_buffer),
            "generator": self.generator.get_state(),
            "builder": self.builder.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.epoch_read = int(state["epoch"]), bool(state["epoch_read"])
        self._dataset_state, self._examples = state["dataset"], None
        self.shuffle_buffer = list(state["shuffle_buffer"])
        self.generator.set_state(state["generator"])
        self.builder.load_state_dict(state["builder"])


# ---------------------------------------------------------------------------------------------------------
# Evaluation batches


def eval_hint(cfg: DataConfig) -> str:
    """What to change when the held-out set is empty (the source's own advice)."""
    return data_source(cfg).eval_hint()


def iter_eval_sequences(cfg: DataConfig, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, lengths) row blocks of the eval split in a fixed order; a packed tail is padded, not dropped."""
    yield from iter_split_sequences(cfg, tokenizer, "eval")


def take_rows(blocks: Iterable[tuple[np.ndarray, np.ndarray]], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The first rows of `blocks` holding at least `max_tokens` targets (all rows when they hold fewer);
    blocks after that are never read."""
    taken_ids, taken_lengths, targets = [], [], 0
    for ids, lengths in blocks:
        cumulative = targets + np.cumsum(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0))
        rows = min(len(lengths), int(np.searchsorted(cumulative, max_tokens)) + 1)
        taken_ids.append(np.asarray(ids[:rows]))  # a memory-mapped shard: reads only these rows
        taken_lengths.append(np.asarray(lengths[:rows]))
        targets = int(cumulative[rows - 1]) if rows else targets
        if targets >= max_tokens:
            break
    if not taken_ids:
        return np.empty((0, 0), dtype=np.int32), np.empty(0, dtype=np.int32)
    return np.concatenate(taken_ids), np.concatenate(taken_lengths)
