"""The `data:` and `tokenizer:` sections. Each checks its own values; a data source's own checks live in its
class (lowmem.data.sources)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lowmem.config.schema import require
from lowmem.data.instruct import INSTRUCT_FORMATS
from lowmem.data.sources import DATA_SOURCES, source_class
from lowmem.errors import ConfigError


# `choices` of a field: the registry's names when a config is read, so a newly registered class is valid.
def _data_sources() -> list[str]:
    return list(DATA_SOURCES)


def _instruct_formats() -> list[str]:
    return list(INSTRUCT_FORMATS)


@dataclass
class BPEConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_chars: int = 50_000_000  # characters of training text read to fit the BPE merges


@dataclass
class TokenizerConfig:
    name: Optional[str] = None  # hub name (t5-base) or local directory; with a pretrained model, its own
    train_bpe: Optional[BPEConfig] = None  # fit a byte-level BPE (the default when no name is given)

    def validate(self) -> None:
        if self.name is not None and self.train_bpe is not None:
            raise ConfigError("tokenizer: set tokenizer.name or tokenizer.train_bpe, not both")
        if self.train_bpe is not None:
            require(self.train_bpe.vocab_size >= 260,
                    f"tokenizer.train_bpe.vocab_size: must be at least 260 (256 bytes + specials), "
                    f"got {self.train_bpe.vocab_size}")


@dataclass
class InstructConfig:
    """Instruction data (lowmem.data.instruct): prompt/response rows, or chat `messages` rendered with the
    tokenizer's chat template; the loss covers response (assistant) tokens only."""
    format: str = field(default="prompt_response", metadata={"choices": _instruct_formats})  # lowmem.data.instruct
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


@dataclass
class DataConfig:
    # A name in lowmem.data.sources.DATA_SOURCES: embedded: this interpreter's standard-library sources (no
    # download); hub: a datasets hub name; files: local text/jsonl/parquet files or globs; prepared: a
    # directory written by data/prepare.py.
    source: str = field(default="embedded", metadata={"choices": _data_sources})
    name: Optional[str] = None  # hub dataset name, e.g. allenai/c4
    subset: Optional[str] = None  # hub config name, e.g. en
    files: list = field(default_factory=list)  # paths or globs for source=files
    path: Optional[str] = None  # directory for source=prepared
    format: Literal["auto", "text", "json", "parquet"] = "auto"
    text_field: str = "text"
    split: str = "train"
    eval_split: Optional[str] = None  # None: hold out eval_fraction of the training documents
    eval_fraction: float = 0.02
    streaming: bool = False
    shuffle_buffer: int = 10_000  # streaming only
    seq_len: int = 256
    packing: bool = True  # False: each document truncated/padded to seq_len (the papers' mode)
    max_docs: Optional[int] = None  # cap on training documents read (map-style sources)
    instruct: Optional[InstructConfig] = None  # None: plain-text continuation

    def validate(self) -> None:
        """The data section's own checks (instruction rows against the tokenizer: lowmem.train.config)."""
        source = source_class(self.source)
        source.validate(self)
        require(self.max_docs is None or self.max_docs >= 1, f"data.max_docs: must be at least 1, got {self.max_docs}")
        if self.instruct is not None:
            require(source.instruction_rows,
                    f"data.instruct: instruction rows come from jsonl/parquet files or a hub dataset; data.source is "
                    f"'{self.source}' (set data.source=files and data.files=[...])")
            require(not self.streaming,
                    "data.instruct: instruction data is read whole (map-style); set data.streaming=false")
        source.validate_location(self)
        require(self.seq_len >= 8, f"data.seq_len: must be at least 8, got {self.seq_len}")
        require(0.0 < self.eval_fraction < 1.0, f"data.eval_fraction: must be in (0, 1), got {self.eval_fraction}")
