"""Tokenize and pack a corpus once into token shards that `data.source: prepared` reads memory-mapped.

    python data/prepare.py --config configs/c4_pretrain.yaml --out prepared/c4_t5_256 \\
        --max-train-tokens 2000000000 --eval-tokens 10000000 [data.max_docs=... dotted overrides]

Only the `data` and `tokenizer` sections of the config are used. DIR receives `meta.json`, the tokenizer
(`tokenizer/`, via save_pretrained) and per split `.npy` shards: `{split}_{n:05d}.ids.npy` [rows, seq_len]
(uint16 when the vocabulary fits, else uint32) and `{split}_{n:05d}.lengths.npy` [rows] (int32; a row's
positions from its length on are padding). Rows are exactly what training on the source directly would
build, in source order (training shuffles them per epoch).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lowmem.config.files import apply_override, read_yaml_tree
from lowmem.config.schema import from_dict, to_dict
from lowmem.data.batches import iter_documents, iter_eval_sequences, iter_sequences, take_rows
from lowmem.data.config import DataConfig, TokenizerConfig
from lowmem.data.sources import PREPARED_META, PREPARED_TOKENIZER, data_source
from lowmem.data.tokenizer import build_tokenizer
from lowmem.errors import REPORTED, ConfigError, report

DEFAULT_SHARD_TOKENS = 100_000_000


class ShardWriter:
    """Writes the rows of one split as `.npy` shards of at most `rows_per_shard` rows each."""

    def __init__(self, out_dir: Path, split: str, rows_per_shard: int, dtype: type):
        self.out_dir, self.split, self.rows_per_shard, self.dtype = out_dir, split, rows_per_shard, dtype
        self.pending_ids: list[np.ndarray] = []
        self.pending_lengths: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.tokens = 0

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.pending_ids.append(ids.astype(self.dtype))
        self.pending_lengths.append(lengths.astype(np.int32))
        self.pending_rows += len(ids)
        self.tokens += int(lengths.sum())
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        ids, lengths = np.concatenate(self.pending_ids), np.concatenate(self.pending_lengths)
        name = f"{self.split}_{len(self.shards):05d}"
        np.save(self.out_dir / f"{name}.ids.npy", ids[:rows])
        np.save(self.out_dir / f"{name}.lengths.npy", lengths[:rows])
        self.shards.append({"ids": f"{name}.ids.npy", "lengths": f"{name}.lengths.npy", "sequences": rows})
        self.pending_ids, self.pending_lengths = [ids[rows:]], [lengths[rows:]]
        self.pending_rows -= rows

    def close(self) -> dict:
        """Writes the last shard; the split's entry of meta.json."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        return {"shards": self.shards, "sequences": sum(s["sequences"] for s in self.shards), "tokens": self.tokens}


def write_split(blocks: Iterable[tuple[np.ndarray, np.ndarray]], writer: ShardWriter,
                max_tokens: int | None) -> dict:
    """Write row blocks until `max_tokens` tokens (whole rows; None: all)."""
    for ids, lengths in blocks:
        if max_tokens is not None:
            room = np.searchsorted(writer.tokens + np.cumsum(lengths, dtype=np.int64), max_tokens) + 1
            ids, lengths = ids[:room], lengths[:room]
        writer.write(ids, lengths)
        if max_tokens is not None and writer.tokens >= max_tokens:
            break
    return writer.close()


def prepare(data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig, out_dir: str | Path,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, max_train_tokens: int | None = None,
            eval_tokens: int = 10_000_000) -> dict:
    """Tokenize and pack `data_cfg`'s train split (up to `max_train_tokens`) and the first `eval_tokens`
    target tokens of its eval split into `out_dir`; returns the meta.json content."""
    if data_source(data_cfg).holds_tokens:
        raise ConfigError(f"data.source: already '{data_cfg.source}'; name the corpus to prepare")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(tokenizer_cfg, data_cfg)
    tokenizer.save_pretrained(str(out_dir / PREPARED_TOKENIZER))
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    rows_per_shard = max(1, shard_tokens // data_cfg.seq_len)

    train_rows = iter_sequences(data_cfg, tokenizer, iter_documents(data_cfg, "train"))
    train = write_split(train_rows, ShardWriter(out_dir, "train", rows_per_shard, dtype), max_train_tokens)
    # The eval rows are the ones eval_batches would take from the source, up to eval_tokens targets.
    eval_rows = [take_rows(iter_eval_sequences(data_cfg, tokenizer), eval_tokens)]
    evaluation = write_split(eval_rows, ShardWriter(out_dir, "eval", rows_per_shard, dtype), None)

    meta = {
        "format": "lowmem-prepared-1",
        "seq_len": data_cfg.seq_len,
        "packing": data_cfg.packing,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": np.dtype(dtype).name,
        "source": to_dict(data_cfg),
        "tokenizer": {**to_dict(tokenizer_cfg), "name_or_path": tokenizer.name_or_path},
        "splits": {"train": train, "eval": evaluation},
    }
    (out_dir / PREPARED_META).write_text(json.dumps(meta, indent=2))
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a run config YAML; its data and tokenizer sections are used")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per .npy shard")
    parser.add_argument("--max-train-tokens", type=int, default=None, help="stop the train split here")
    parser.add_argument("--eval-tokens", type=int, default=10_000_000, help="target tokens of the eval split")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    args = parser.parse_args(argv)

    tree = read_yaml_tree(args.config) if args.config else {}
    for override in args.overrides:
        tree = apply_override(tree, override)
    data_cfg = from_dict(DataConfig, tree.get("data") or {}, "data")
    tokenizer_cfg = from_dict(TokenizerConfig, tree.get("tokenizer") or {}, "tokenizer")
    meta = prepare(data_cfg, tokenizer_cfg, args.out, args.shard_tokens, args.max_train_tokens, args.eval_tokens)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['sequences']} sequences, {info['tokens']} tokens, {len(info['shards'])} shards")
    return meta


if __name__ == "__main__":
    try:
        main()
    except REPORTED as err:  # a bad key, an unreadable file, a full disk: one line, not a traceback
        sys.exit(report(err))
