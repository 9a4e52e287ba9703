"""Data sources: where a run's documents, or a prepared directory's token rows, come from.

`data.source` names a class in `DATA_SOURCES`. The class owns everything that depends on which source it is:
the data options it needs and refuses (`validate`), its documents and instruction rows, how messages name it,
what to change when its eval split is empty, and what it supports (data.files, streaming, named splits,
instruction rows, token rows with a tokenizer of their own). The config, the data pipeline, the tokenizer and
the trainer ask the class and never compare source names.

Adding a source is one new `DataSource` subclass with a `name`, registered with `@register_source`: configs
accept its name from then on. (Instruction formats are registered the same way in lowmem.data.instruct.)
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import numpy as np

from lowmem.config.schema import Registry
from lowmem.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets

    from lowmem.data.config import DataConfig

PREPARED_META = "meta.json"
PREPARED_TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what save_pretrained writes
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
FORMAT_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------------------
# The registry


class DataSource:
    """One kind of `data.source`, reading the data section `cfg`.

    The class attributes say what it supports; the config checks are classmethods (they run before any
    data is read), the rest reads or describes `self.cfg`."""

    name: ClassVar[str]
    option: ClassVar[str | None] = None  # the data key that says where its data is (data.name, ...)
    required: ClassVar[str | None] = None  # when `option` must be given: what it must hold, for the message
    reads_files: ClassVar[bool] = False  # data.files lists its input
    streams: ClassVar[bool] = False  # data.streaming reads it on the fly
    named_splits: ClassVar[bool] = False  # data.eval_split names one of its splits
    instruction_rows: ClassVar[bool] = False  # data.instruct can read its rows
    holds_tokens: ClassVar[bool] = False  # token rows made with a tokenizer of its own, not documents

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    # Config checks -------------------------------------------------------------------------------------

    @classmethod
    def validate(cls, d: DataConfig) -> None:
        """ConfigError for a data option this source needs and lacks, or has and cannot use."""
        if cls.required is not None and getattr(d, cls.option.removeprefix("data.")) in (None, [], ()):
            raise ConfigError(f"{cls.option}: {cls.required} when data.source is '{cls.name}'")
        cls.validate_own(d)
        if d.files and not cls.reads_files:
            raise ConfigError(f"data.files: set, but data.source is '{d.source}'; set "
                              f"data.source={source_names('reads_files', ' or ')} to read them")
        if d.streaming and not cls.streams:
            raise ConfigError(f"data.streaming: only {source_names('streams')} sources stream, data.source is "
                              f"'{d.source}'")
        if d.eval_split is not None and not cls.named_splits:
            raise ConfigError(f"data.eval_split: only {source_names('named_splits')} datasets have named splits "
                              f"(data.source is '{d.source}'); leave it unset to hold out data.eval_fraction of "
                              "the documents")

    @classmethod
    def validate_own(cls, d: DataConfig) -> None:
        """The source's own checks of its options, after `required` and before the capability checks."""

    @classmethod
    def validate_location(cls, d: DataConfig) -> None:
        """ConfigError when the data is not where the config says; run after the other data checks."""

    # Reading -------------------------------------------------------------------------------------------

    def describe(self) -> str:
        """The source as messages name it."""
        return f"data.source '{self.name}'"

    def documents(self, split_name: str) -> Iterator[str]:
        """The text of every document of the split named `split_name`, in source order, empty ones included."""
        raise DataError(f"data.source '{self.name}' holds no documents")

    def dataset(self, split_name: str) -> datasets.Dataset | datasets.IterableDataset:
        """The raw `datasets` dataset (streaming when `cfg.streaming`)."""
        raise DataError(f"data.source '{self.cfg.source}' is not a datasets source")

    def rows(self) -> Iterator[tuple[dict, str]]:
        """Every instruction row in order, with where it is ("line 3 of 'a.jsonl'")."""
        raise DataError(f"data.instruct: data.source '{self.name}' has no instruction rows")

    def token_blocks(self, tokenizer, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (ids, lengths) row blocks of a split, for a source that holds token rows."""
        raise DataError(f"data.source '{self.name}' holds documents, not token rows")

    def tokenizer_dir(self) -> Path | None:
        """The directory of the tokenizer its token rows were made with, which the run must use (DataError
        when it holds none); None: the run chooses its own."""
        return None

    def describe_tokenizer(self) -> str | None:
        """How messages name the tokenizer of `tokenizer_dir`; None when it has none."""
        return None

    def eval_hint(self) -> str:
        """What to change when its held-out set is empty."""
        return "raise data.eval_fraction or add documents"

    def first_bad_row(self) -> str | None:
        """Where the first row without a string text field is, when the source can tell."""
        return None

    def first_undecodable_file(self) -> str | None:
        """The first input that is not UTF-8, when the source can tell."""
        return None


DATA_SOURCES = Registry("data.source")  # data.source name -> DataSource class
register_source = DATA_SOURCES.register
source_class = DATA_SOURCES.lookup  # the class of a name; ConfigError naming the closest one when unknown


def data_source(cfg: DataConfig) -> DataSource:
    """The source of the data section `cfg`."""
    return source_class(cfg.source)(cfg)


def source_names(capability: str, joiner: str = " and ") -> str:
    """The registered sources that have `capability`, in registration order ("hub and files")."""
    return joiner.join(name for name, cls in DATA_SOURCES.items() if getattr(cls, capability))


# ---------------------------------------------------------------------------------------------------------
# embedded: this interpreter's standard library


def embedded_paths() -> list[Path]:
    """This interpreter's standard-library `.py` files (site-packages excluded), in a stable sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages"))
        paths += [Path(directory) / f for f in files if f.endswith(".py")]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


@register_source
class EmbeddedSource(DataSource):
    """This interpreter's standard-library sources: no download, no options."""

    name = "embedded"

    def describe(self) -> str:
        return "data.source 'embedded' (this interpreter's standard-library sources)"

    def documents(self, split_name: str) -> Iterator[str]:
        for path in embedded_paths():
            yield path.read_bytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------
# hub and files: read through `datasets`


@contextlib.contextmanager
def naming_source(cfg: DataConfig) -> Iterator[None]:
    """Adds the source to the loaders' errors, which do not say which files or option were at fault (and
    streaming datasets raise them only while iterating)."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        import datasets

        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ else err
        source = data_source(cfg)
        if isinstance(cause, UnicodeDecodeError):
            where = source.first_undecodable_file() or source.describe()
            raise DataError(f"data.files: {where} is not UTF-8 text, so it cannot be read as "
                            f"{resolve_files(cfg)[1]}; remove that file from data.files (a binary file is no "
                            f"training text)") from err
        raise DataError(f"cannot read {source.describe()}: {type(cause).__name__}: {cause}") from err


def document_text(example: dict, cfg: DataConfig, row: int | None = None) -> str:
    """The text of one example; DataError naming the file and row when it has none (`row`: its 0-based
    position in the dataset, when known)."""
    source = data_source(cfg)
    if cfg.text_field not in example:
        raise DataError(f"data.text_field: no column '{cfg.text_field}' in {source.describe()} "
                        f"(columns: {sorted(example)})")
    text = example[cfg.text_field]
    if not isinstance(text, str):  # a row lacking the field (datasets fills in None) or holding a number, list...
        where = source.first_bad_row() or (f"row {row + 1} of {source.describe()}" if row is not None
                                           else f"a row of {source.describe()}")
        shown = "null" if text is None else f"{type(text).__name__} {str(text)[:40]!r}"
        raise DataError(f"data.text_field: {where} has no text in '{cfg.text_field}' (found {shown}); fix or "
                        f"remove that row, or set data.text_field to the column that holds the text")
    return text


class DatasetSource(DataSource):
    """A source read with `datasets.load_dataset`: documents are the rows' `data.text_field`."""

    streams = True
    instruction_rows = True

    def documents(self, split_name: str) -> Iterator[str]:
        with naming_source(self.cfg):
            for row, example in enumerate(self.dataset(split_name)):
                yield document_text(example, self.cfg, row)


@register_source
class HubSource(DatasetSource):
    """A `datasets` hub dataset (or a local dataset directory): data.name, data.subset, named splits."""

    name = "hub"
    option = "data.name"
    required = "a hub dataset name is needed"
    named_splits = True

    def describe(self) -> str:
        return f"data.name '{self.cfg.name}' (subset {self.cfg.subset})"

    def dataset(self, split_name: str) -> datasets.Dataset | datasets.IterableDataset:
        import datasets

        with naming_source(self.cfg):
            return datasets.load_dataset(self.cfg.name, self.cfg.subset, split=split_name,
                                         streaming=self.cfg.streaming)

    def rows(self) -> Iterator[tuple[dict, str]]:
        for number, row in enumerate(self.dataset(self.cfg.split), 1):
            yield dict(row), f"row {number} of data.name '{self.cfg.name}'"

    def eval_hint(self) -> str:
        if self.cfg.eval_split is None:
            return "raise data.eval_fraction or set data.eval_split"
        return f"data.eval_split '{self.cfg.eval_split}' holds no text; name another split"


def file_format(name: str) -> str:
    """The loader for a file name: json, parquet, or text for anything else (code, prose)."""
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return FORMAT_BY_SUFFIX.get(Path(name).suffix.lower(), "text")


def resolve_files(cfg: DataConfig) -> tuple[list[str], str]:
    """The sorted files matched by `cfg.files` and their `datasets` loader (text, json or parquet)."""
    files: list[str] = []
    for pattern in cfg.files:
        matches = sorted(glob.glob(str(pattern)))
        if not matches:
            raise DataError(f"data.files: no file matches '{pattern}'")
        folders = [m for m in matches if os.path.isdir(m)]
        if folders:
            origin = f" (from '{pattern}')" if str(pattern) != folders[0] else ""
            raise DataError(f"data.files: '{folders[0]}'{origin} is a directory, not a file; list the files in "
                            f"it, e.g. '{os.path.join(folders[0], '*.txt')}'")
        files += [m for m in matches if m not in files]
    if cfg.format != "auto":
        return files, cfg.format
    formats = {file_format(name) for name in files}
    if len(formats) > 1:
        raise DataError(f"data.files: mixed formats {sorted(formats)} in {files}; list one format, "
                        f"or set data.format")
    return files, formats.pop()


def _json_lines(file: str) -> Iterator[tuple[dict, str]]:
    import fsspec

    with fsspec.open(file, "rt", compression="infer", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {number} of '{file}'"
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"data.files: {where} is not a JSON object ({err}); instruction files hold one "
                                f"JSON object per line (jsonl)") from err
            if not isinstance(row, dict):
                raise DataError(f"data.files: {where} is a JSON {type(row).__name__}, not an object with fields")
            yield row, where


def _parquet_rows(file: str) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(file).iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield row, f"row {number} of '{file}'"


ROW_READERS: dict[str, Callable[[str], Iterator[tuple[dict, str]]]] = {"json": _json_lines,
                                                                       "parquet": _parquet_rows}


@register_source
class FilesSource(DatasetSource):
    """Local text, jsonl or parquet files or globs (data.files), read as data.format."""

    name = "files"
    option = "data.files"
    required = "list at least one file or glob"
    reads_files = True

    @classmethod
    def validate_own(cls, d: DataConfig) -> None:
        for pattern in d.files:
            if not glob.glob(str(pattern)):
                raise ConfigError(f"data.files: no file matches '{pattern}'")

    def describe(self) -> str:
        files, loader = resolve_files(self.cfg)
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return f"data.files [{shown}] read as {loader}"

    def dataset(self, split_name: str) -> datasets.Dataset | datasets.IterableDataset:
        import datasets

        files, loader = resolve_files(self.cfg)
        options = {"sample_by": "document"} if loader == "text" else {}  # a text file is one document
        with naming_source(self.cfg):
            return datasets.load_dataset(loader, data_files=files, split="train", streaming=self.cfg.streaming,
                                         **options)

    def rows(self) -> Iterator[tuple[dict, str]]:
        files, loader = resolve_files(self.cfg)
        if loader not in ROW_READERS:
            raise DataError(f"data.instruct: instruction rows are read from jsonl or parquet files, but data.files "
                            f"{files} are read as {loader}")
        for file in files:
            yield from ROW_READERS[loader](file)

    def first_undecodable_file(self) -> str | None:
        """The first file that is not UTF-8 ("'a.txt' (byte 1204)"), or None; read again, on this error path
        only, since `datasets` does not say which file failed."""
        import codecs

        import fsspec

        for file in resolve_files(self.cfg)[0]:
            decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
            with fsspec.open(file, "rb", compression="infer") as f:
                try:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        decoder.decode(chunk)
                        offset += len(chunk)
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError as err:
                    return f"'{file}' (byte {offset + err.start})"
        return None

    def first_bad_row(self) -> str | None:
        """Where, in file order, the first row without a string text field is ("line 3 of 'a.jsonl'"), or
        None when it cannot be told. `datasets` does not say which file an example came from, so the files
        are read again, once, on this error path only."""
        import fsspec

        cfg = self.cfg
        files, loader = resolve_files(cfg)
        for file in files:
            if loader == "json":
                with fsspec.open(file, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
                    for number, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                        except ValueError:
                            return None  # not JSON lines (one JSON document): no row numbers to give
                        if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
                            return f"line {number} of '{file}'"
            elif loader == "parquet":
                import pyarrow.parquet as pq

                number = 0
                for batch in pq.ParquetFile(file).iter_batches(columns=[cfg.text_field]):
                    for value in batch.column(0).to_pylist():
                        number += 1
                        if not isinstance(value, str):
                            return f"row {number} of '{file}'"
        return None


def load_source(cfg: DataConfig, split_name: str) -> datasets.Dataset | datasets.IterableDataset:
    """The raw `datasets` dataset of a hub or files source (streaming when `cfg.streaming`)."""
    return data_source(cfg).dataset(split_name)


# ---------------------------------------------------------------------------------------------------------
# prepared: token shards written by data/prepare.py


def prepared_tokenizer_dir(cfg: DataConfig) -> Path:
    return Path(cfg.path) / PREPARED_TOKENIZER


def read_prepared_meta(cfg: DataConfig, tokenizer) -> dict[str, Any]:
    """The prepared directory's meta.json, checked against the config and the tokenizer."""
    meta_path = Path(cfg.path) / PREPARED_META
    if not meta_path.is_file():
        raise DataError(f"data.path: '{cfg.path}' has no {PREPARED_META}; write it with data/prepare.py")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"data.path: {meta_path} cannot be read ({err})") from err
    for key in ("seq_len", "packing"):
        if meta[key] != getattr(cfg, key):
            raise DataError(f"data.{key}: {getattr(cfg, key)} but the prepared data in '{cfg.path}' "
                            f"was made with {key}={meta[key]}")
    found = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    for key, value in found.items():
        if meta[key] != value:
            raise DataError(f"tokenizer: {key}={value} but the prepared data in '{cfg.path}' has {meta[key]}; "
                            f"use the tokenizer saved in {prepared_tokenizer_dir(cfg)}")
    return meta


def load_prepared_blocks(cfg: DataConfig, tokenizer, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (ids, lengths) shards of a prepared split, memory-mapped."""
    meta = read_prepared_meta(cfg, tokenizer)
    blocks = []
    for shard in meta["splits"][split]["shards"]:
        try:
            blocks.append((np.load(Path(cfg.path) / shard["ids"], mmap_mode="r"),
                           np.load(Path(cfg.path) / shard["lengths"], mmap_mode="r")))
        except (OSError, ValueError) as err:  # a missing or damaged shard
            raise DataError(f"data.path: a shard of the prepared data in '{cfg.path}' cannot be read "
                            f"({err})") from err
    return blocks


@register_source
class PreparedSource(DataSource):
    """A directory written by data/prepare.py (data.path): token rows in memory-mapped shards, with the
    tokenizer they were made with."""

    name = "prepared"
    option = "data.path"
    holds_tokens = True

    @classmethod
    def validate_own(cls, d: DataConfig) -> None:
        """The source's own checks of its options, after `required` and before the capability checks."""

    @classmethod
    def validate_location(cls, d: DataConfig) -> None:
        if d.path is None or not Path(d.path).is_dir():
            raise ConfigError(f"data.path: prepared data directory '{d.path}' not found")

    def describe(self) -> str:
        return f"the prepared data in '{self.cfg.path}'"

    def documents(self, split_name: str) -> Iterator[str]:
        raise DataError(f"data.source 'prepared': {self.cfg.path} holds token ids, not documents")

    def token_blocks(self, tokenizer, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        return load_prepared_blocks(self.cfg, tokenizer, split)

    def tokenizer_dir(self) -> Path:
        directory = prepared_tokenizer_dir(self.cfg)
        if not holds_tokenizer(directory):
            raise DataError(f"data.path: '{self.cfg.path}' has no tokenizer in {directory} (its ids are fixed in "
                            "the shards); write the directory with data/prepare.py, which saves it there")
        return directory

    def describe_tokenizer(self) -> str:
        return f"the prepared data's tokenizer ({self.cfg.path})"

    def eval_hint(self) -> str:
        return (f"the prepared data in '{self.cfg.path}' has no eval rows; write it again with data/prepare.py "
                "--eval-tokens")


def holds_tokenizer(directory: str | Path) -> bool:
    """Whether `directory` holds a tokenizer written by `save_pretrained`."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)
