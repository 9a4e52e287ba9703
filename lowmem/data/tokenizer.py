"""The run's tokenizer: reloaded from a checkpoint, taken from a prepared data directory, loaded by name, or
trained as a byte-level BPE on the training documents.

Model vocabulary sizes must come from `len(tokenizer)`, which counts the added special tokens
(`tokenizer.vocab_size` does not).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lowmem.data.batches import iter_documents
from lowmem.data.sources import data_source, holds_tokenizer
from lowmem.errors import CheckpointError, ConfigError, DataError, error_summary

if TYPE_CHECKING:
    from lowmem.data.config import BPEConfig, DataConfig, TokenizerConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def build_tokenizer(cfg: TokenizerConfig, data_cfg: DataConfig,
                    saved_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a run, with an eos and a pad token id.

    Precedence: a tokenizer saved in `saved_dir` (a resumed run); the one saved in a prepared data directory
    (its token ids are fixed in the shards); `cfg.name` (hub name or local directory); a BPE trained on the
    training documents (`cfg.train_bpe`).
    """
    source = data_source(data_cfg)
    if saved_dir is not None and holds_tokenizer(saved_dir):
        tokenizer = load_saved_tokenizer(saved_dir)
    elif (directory := source.tokenizer_dir()) is not None:  # the data's token ids are fixed to it
        tokenizer = _load(str(directory), DataError, source.option)
    elif cfg.name is not None:
        tokenizer = _load(cfg.name, ConfigError, "tokenizer.name")
    elif cfg.train_bpe is not None:
        tokenizer = train_bpe(cfg.train_bpe, iter_documents(data_cfg, "train"))
    else:
        raise ValueError("tokenizer: set tokenizer.name or tokenizer.train_bpe")
    return ensure_special_tokens(tokenizer)


def _load(name: str, error: type[ConfigError], key: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer.from_pretrained(name); `error` naming `key` when it fails (a missing name fails with an
    OSError, a damaged tokenizer file with a KeyError, JSON or Unicode error...)."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:
        raise error(f"{key}: cannot load '{name}' (a local directory or hub name): "
                    f"{error_summary(err)}") from err


def load_saved_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a checkpoint saved in `directory`; CheckpointError naming it when it cannot be read."""
    try:
        return ensure_special_tokens(AutoTokenizer.from_pretrained(str(directory)))
    except Exception as err:  # a damaged tokenizer file fails in many ways (KeyError, JSON, Unicode...)
        raise CheckpointError(f"checkpoint '{Path(directory).parent}': its tokenizer cannot be read "
                              f"({error_summary(err)})") from err


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer an eos (added when missing) and a pad token (the eos when missing, as for gpt2)."""
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _limit_chars(documents: Iterator[str], max_chars: int) -> Iterator[str]:
    remaining = max_chars
    for text in documents:
        if remaining <= 0:
            return
        yield text[:remaining]
        remaining -= len(text)


def train_bpe(cfg: BPEConfig, documents: Iterator[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on the first `cfg.max_chars` characters of
    `documents`. Deterministic: the same text gives the same vocabulary and merges."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(_limit_chars(documents, cfg.max_chars), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )
