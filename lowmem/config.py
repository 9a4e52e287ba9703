"""Typed run configuration: YAML files with `include`, dotted command-line overrides, strict validation.

Every section is a dataclass. Loading walks the YAML tree against the dataclasses, so an unknown key, a wrong
type or an impossible value fails before any work starts, with the dotted key in the message and, for a
misspelled key or name, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lowmem.errors import ConfigError  # defined with the other user-facing errors; imported from here too


def closest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(value: Any, choices: typing.Iterable[Any], key: str) -> None:
    """ConfigError naming `key` and the closest choice when `value` is not one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{closest(str(value), map(str, choices))}")


class Registry(dict):
    """Classes by their `name`, for the config key `key` whose value names one. `@registry.register` adds a
    class; `registry.lookup(name)` gives it, or a ConfigError naming the closest valid name."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def register(self, cls: type) -> type:
        self[cls.name] = cls
        return cls

    def lookup(self, name: str) -> type:
        check_choice(name, self, self.key)
        return self[name]


# Fields whose valid values are a registry's names: `field(metadata={"choices": ...})`, a function returning
# them, called when a config is read (so a newly registered class is a valid value without editing this file).


def _data_sources() -> list[str]:
    from lowmem.sources import DATA_SOURCES

    return list(DATA_SOURCES)


def _instruct_formats() -> list[str]:
    from lowmem.instruct import INSTRUCT_FORMATS

    return list(INSTRUCT_FORMATS)


# ---------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0


QUANT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class QuantConfig:
    """Fake 4-bit quantization of linear layers (lowmem.quant_linear); both formats none: no change."""
    weights: Literal["int4", "fp4", "none"] = "none"
    activations: Literal["int4", "fp4", "none"] = "none"
    group_size: int = 256  # consecutive input features sharing a scale; must divide every quantized in_features
    keep_outliers: int = 2  # largest |values| per group kept exact: activations, and fp4 weights
    stochastic_rounding: bool = False  # int4 weights and activations, in training mode only
    target_modules: list[str] = field(default_factory=lambda: list(QUANT_TARGETS))  # module-name substrings
    # auto (Triton's fused quantizers on CUDA, the torch reference elsewhere) | triton | torch (lowmem.kernels)
    kernels: str = "auto"


@dataclass
class ModelConfig:
    preset: Optional[str] = "llama_9m"
    pretrained: Optional[str] = None  # local path or hub name; replaces the preset
    activation_checkpointing: bool = False
    # Any of these overrides the preset; None keeps the preset's value.
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    num_hidden_layers: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's size
    max_position_embeddings: Optional[int] = None
    # Further LlamaConfig fields by name (rope_theta, rms_norm_eps, tie_word_embeddings, ...).
    extra: dict = field(default_factory=dict)
    quant: Optional[QuantConfig] = None  # fake-quantized (QAT) linears; None: plain linears
    # Weight dtype: fp32 | bf16 | fp16 | auto (a pretrained checkpoint's own dtype); None: from train.precision.
    dtype: Optional[Literal["fp32", "bf16", "fp16", "auto"]] = None
    # Shell-style patterns (fnmatch) over parameter and module names, e.g. "model.embed_tokens*" or
    # "*.layers.0.*": every matching parameter (or every parameter of a matching module) is frozen.
    freeze: list[str] = field(default_factory=list)


@dataclass
class BPEConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    max_chars: int = 50_000_000  # characters of training text read to fit the BPE merges


@dataclass
class TokenizerConfig:
    name: Optional[str] = None  # hub name (t5-base) or local directory; with a pretrained model, its own
    train_bpe: Optional[BPEConfig] = None  # fit a byte-level BPE (the default when no name is given)


@dataclass
class InstructConfig:
    """Instruction data (lowmem.instruct): prompt/response rows, or chat `messages` rendered with the
    tokenizer's chat template; the loss covers response (assistant) tokens only."""
    format: str = field(default="prompt_response", metadata={"choices": _instruct_formats})  # lowmem.instruct
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


@dataclass
class DataConfig:
    # A name in lowmem.sources.DATA_SOURCES: embedded: this interpreter's standard-library sources (no
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


@dataclass
class TrainConfig:
    batch_size: int = 8  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    # sequences per update over every rank; when set, grad_accum = global / (batch_size x ranks), so the same
    # run resumes on another number of ranks with the same updates
    global_batch_size: Optional[int] = None
    max_steps: int = 100  # optimizer updates
    max_tokens: Optional[int] = None  # tokens processed (updates x grad_accum x batch x seq_len); overrides max_steps
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    precision: Literal["fp32", "bf16_autocast", "bf16"] = "fp32"
    eval_every: int = 50  # 0: only at the end
    eval_tokens: int = 32_768
    eval_batch_size: Optional[int] = None
    log_every: int = 10
    device: str = "auto"


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: Optional[str] = None  # None | "auto" | a checkpoint directory


@dataclass
class LogConfig:
    tensorboard: bool = False
    progress: bool = True


@dataclass
class DistributedConfig:
    # auto: none on one process; under a launcher (torchrun, deepspeed, accelerate launch) ddp, or deepspeed
    # when accelerate was configured for it
    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    zero_stage: int = 2  # DeepSpeed: 0, 1 or 2 for every optimizer; 3 for torch AdamW (adamw) only
    gradient_sync: Literal["full", "projected"] = "full"  # ddp: all-reduce G, or R = P^T G (lowmem.distributed)
    # a DeepSpeed JSON for any other setting (offload, buckets, ...); what it shares with this config must agree
    # (lowmem.distributed.deepspeed_settings)
    deepspeed_config: Optional[str] = None
    timeout_s: float = 600.0  # a collective waiting longer ends the run on every rank


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: Any = None  # an OptimizerOptions subclass chosen by `optimizer.name` (lowmem.optim.registry)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return to_dict(self)

    def record(self) -> dict:
        """What runs/NAME/config.yaml records: to_dict with only the optimizer keys its chosen parts read, so the
        record loads back (a key no part reads is refused) and lists no setting that had no effect."""
        tree = self.to_dict()
        tree["optimizer"] = {key: value for key, value in tree["optimizer"].items() if self.optimizer.reads(key)}
        return tree


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _number(text: str, key: str) -> int | float:
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {args}")
    if origin is Literal:
        check_choice(value, args, key)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if tp in (float, int) and isinstance(value, str):
        value = _number(value, key)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .inf / .nan: no lr, decay or ratio is meaningful there
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args and origin is tuple and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if args:
            return type(value)(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key '{dotted}'{closest(str(key), fields)}")
        if "choices" in fields[key].metadata:  # a registry's names, checked as a Literal's values would be
            check_choice(value, fields[key].metadata["choices"](), dotted)
            kwargs[key] = value
        else:
            kwargs[key] = _convert(value, hints[key], dotted)
    required = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"{prefix + '.' if prefix else ''}{required[0]}: missing; it has no default")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------------
# YAML loading: include, merge, overrides

def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (empty dicts stay leaves)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two resolved configs. A key the saved config lacks (written
    by an older lowmem) is no change while it holds its default (or None): new options must not make every
    earlier run and checkpoint look different."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(to_dict(Config()))
    return sorted(key for key in old.keys() | new.keys()
                  if old.get(key) != new.get(key)
                  and not (key not in old and new[key] in (None, defaults.get(key))))


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(err: yaml.YAMLError, where: bool = True) -> str:
    """A YAML error on one line: what is wrong and (`where`) the line and column of the file."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if where and mark else problem


def _not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, for a message."""
    return "is a directory, not a file" if path.is_dir() else "not found"


def _resolve_include(name: str, relative_to: Path) -> Path:
    candidate = relative_to / name
    if not candidate.is_file():
        raise ConfigError(f"include: file '{name}' {_not_a_file(candidate)} (relative to {relative_to})")
    return candidate


def read_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file and the files its `include:` names (earlier includes first, this file last)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' {_not_a_file(path)}")
    if path.resolve() in _seen:
        raise ConfigError(f"include cycle through '{path}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML ({_yaml_problem(err)})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at top level")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for name in includes:
        merged = deep_merge(merged, read_yaml_tree(_resolve_include(name, path.parent), _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_override(tree: dict, override: str) -> dict:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like dotted.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': the value of {dotted.strip()} is not valid YAML "
                          f"({_yaml_problem(err, where=False)})") from None
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value
    return tree


def load_tree(paths: str | Path | typing.Sequence[str | Path] | None, overrides: typing.Sequence[str] = ()) -> dict:
    """Read and merge one or more YAML files (later wins) and apply dotted overrides, unvalidated."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    tree: dict = {}
    for path in paths:
        tree = deep_merge(tree, read_yaml_tree(path))
    for override in overrides:
        tree = apply_override(tree, override)
    return tree


def load_config(paths: str | Path | typing.Sequence[str | Path] | None,
                overrides: typing.Sequence[str] = (), world_size: Optional[int] = None) -> Config:
    """Read and merge one or more YAML files (later wins), apply dotted overrides, validate for `world_size`
    ranks (None: the launcher's). Raises ConfigError on any bad key or value."""
    return config_from_tree(load_tree(paths, overrides), world_size)


def config_from_tree(tree: dict, world_size: Optional[int] = None) -> Config:
    from lowmem.optim.registry import parse_optimizer_options

    tree = dict(tree)
    optimizer_tree = tree.pop("optimizer", None) or {"name": "adamw"}
    config = from_dict(Config, tree)
    config.optimizer = parse_optimizer_options(optimizer_tree)
    validate(config, world_size)
    return config


# ---------------------------------------------------------------------------------------------------------
# Value checks that types cannot express


# The ModelConfig fields that override a preset's LlamaConfig.
MODEL_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers", "vocab_size", "max_position_embeddings")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_quant(q: QuantConfig) -> None:
    """Checks that need no model; group sizes against the layers' widths are checked on the meta model."""
    _require(q.group_size >= 1, f"model.quant.group_size: must be at least 1, got {q.group_size}")
    _require(q.keep_outliers >= 0, f"model.quant.keep_outliers: must be >= 0, got {q.keep_outliers}")
    _require(q.keep_outliers < q.group_size,
             f"model.quant.keep_outliers: {q.keep_outliers} leaves nothing to quantize in a group of "
             f"model.quant.group_size {q.group_size}; keep fewer than the group size")
    _require(len(q.target_modules) > 0, "model.quant.target_modules: list at least one module-name pattern")
    from lowmem.kernels.dispatch import BACKENDS

    _require(q.kernels in BACKENDS, f"model.quant.kernels: unknown value '{q.kernels}'; choose from {list(BACKENDS)}")


def _validate_instruct(config: Config, source_has_rows: bool) -> None:
    d = config.data
    _require(source_has_rows,
             f"data.instruct: instruction rows come from jsonl/parquet files or a hub dataset; data.source is "
             f"'{d.source}' (set data.source=files and data.files=[...])")
    _require(not d.streaming, "data.instruct: instruction data is read whole (map-style); set data.streaming=false")
    _require(config.tokenizer.train_bpe is None,
             "data.instruct: needs the tokenizer the model was trained with (model.pretrained's own, or "
             "tokenizer.name), not a freshly fitted BPE; set tokenizer.train_bpe=null and tokenizer.name=...")


def validate(config: Config, world_size: Optional[int] = None) -> None:
    """Every check of a config, for `world_size` ranks (None: the launcher's environment). Training and the
    memory planner both load configs through here, so they accept and refuse the same ones."""
    from lowmem.model import MODEL_PRESETS
    from lowmem.schedule import SCHEDULES

    m, d, t, c = config.model, config.data, config.train, config.checkpoint
    _validate_run_name(config.run.name)
    if m.pretrained is None:
        _require(m.preset is not None, "model.preset: set a preset or model.pretrained")
        _require(m.preset in MODEL_PRESETS,
                 f"model.preset: unknown preset '{m.preset}'{closest(str(m.preset), MODEL_PRESETS)}; "
                 f"choose from {sorted(MODEL_PRESETS)}")
    for key in MODEL_SHAPE_KEYS:
        value = getattr(m, key)
        _require(value is None or value > 0, f"model.{key}: must be positive, got {value}")
    if m.quant is not None:
        _validate_quant(m.quant)
    if m.pretrained is not None:
        # A pretrained model keeps its shapes and vocabulary: these keys would be silently ignored.
        ignored = [f"model.{key}" for key in MODEL_SHAPE_KEYS if getattr(m, key) is not None]
        ignored += ["model.extra"] if m.extra else []
        _require(not ignored, f"{', '.join(ignored)}: a pretrained model (model.pretrained '{m.pretrained}') "
                 f"keeps its own shapes and config; unset {'them' if len(ignored) > 1 else 'it'} "
                 f"({' '.join(key + '=null' for key in ignored)})")
        # Its embeddings were trained with its own tokenizer: a freshly fitted BPE's ids would mean nothing to it.
        _require(config.tokenizer.train_bpe is None,
                 f"tokenizer.train_bpe: a freshly fitted BPE gives token ids the pretrained model "
                 f"'{m.pretrained}' never saw; set tokenizer.train_bpe=null to train with the model's own "
                 f"tokenizer (or tokenizer.name=... for another one that fits its vocabulary)")
    if config.tokenizer.name is None and config.tokenizer.train_bpe is None:
        if m.pretrained is not None:
            config.tokenizer.name = m.pretrained  # a pretrained model brings its own tokenizer
        else:
            config.tokenizer.train_bpe = BPEConfig()  # default: fit a byte-level BPE on the training split
    if config.tokenizer.name is not None and config.tokenizer.train_bpe is not None:
        raise ConfigError("tokenizer: set tokenizer.name or tokenizer.train_bpe, not both")
    if config.tokenizer.train_bpe is not None:
        _require(config.tokenizer.train_bpe.vocab_size >= 260,
                 f"tokenizer.train_bpe.vocab_size: must be at least 260 (256 bytes + specials), "
                 f"got {config.tokenizer.train_bpe.vocab_size}")

    from lowmem.sources import source_class

    source = source_class(d.source)
    source.validate(d)
    _require(d.max_docs is None or d.max_docs >= 1, f"data.max_docs: must be at least 1, got {d.max_docs}")
    if d.instruct is not None:
        _validate_instruct(config, source.instruction_rows)
    source.validate_location(d)
    _require(d.seq_len >= 8, f"data.seq_len: must be at least 8, got {d.seq_len}")
    _require(0.0 < d.eval_fraction < 1.0, f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")

    _require(t.batch_size >= 1, f"train.batch_size: must be at least 1, got {t.batch_size}")
    _require(t.grad_accum >= 1, f"train.grad_accum: must be at least 1, got {t.grad_accum}")
    _require(t.max_steps >= 1, f"train.max_steps: must be at least 1, got {t.max_steps}")
    _require(t.max_tokens is None or t.max_tokens > 0, f"train.max_tokens: must be positive, got {t.max_tokens}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.grad_clip >= 0.0, f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    _require(t.eval_every >= 0, f"train.eval_every: must be >= 0, got {t.eval_every}")
    _require(t.eval_tokens >= 1, f"train.eval_tokens: must be positive, got {t.eval_tokens}")
    _require(t.eval_batch_size is None or t.eval_batch_size >= 1,
             f"train.eval_batch_size: must be at least 1, got {t.eval_batch_size}")
    _validate_device(t.device)
    _require(t.log_every >= 1, f"train.log_every: must be at least 1, got {t.log_every}")
    _require(t.schedule in SCHEDULES,
             f"train.schedule: unknown schedule '{t.schedule}'{closest(t.schedule, SCHEDULES)}; "
             f"choose from {sorted(SCHEDULES)}")
    _require(c.every >= 0, f"checkpoint.every: must be >= 0, got {c.every}")
    _require(c.keep_last >= 1, f"checkpoint.keep_last: must be at least 1, got {c.keep_last}")
    if c.resume not in (None, "auto"):
        _require(Path(c.resume).is_dir(), f"checkpoint.resume: checkpoint directory '{c.resume}' "
                                          f"{'is a file' if Path(c.resume).exists() else 'not found'}")
        _require((Path(c.resume) / "state.pt").is_file(),
                 f"checkpoint.resume: '{c.resume}' is not a complete checkpoint (no state.pt)")
    if config.optimizer.update_in_backward:
        _require(t.grad_clip == 0.0,
                 "optimizer.update_in_backward: global gradient clipping needs every gradient at once; "
                 "set train.grad_clip=0 to update in backward")
    _validate_distributed(config, world_size)


def _validate_run_name(name: str) -> None:
    """The run directory is run.out_dir/run.name: a name of several parts (or none) would put it, and the
    checkpoints a fresh run deletes by rotation, somewhere else."""
    one_part = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    _require(one_part, f"run.name: {name!r} must be one directory name (not empty, '.' or '..', no '/'); "
                       "set run.out_dir to say where the run directory goes")


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _validate_device(name: str) -> None:
    """A device string torch parses, of a kind lowmem runs on (whether this machine has it is checked when
    the run starts: lowmem.trainer.pick_device)."""
    if name == "auto":
        return
    kind = name.split(":")[0]
    _require(kind in DEVICE_TYPES, f"train.device: unknown device '{name}'{closest(kind, ['auto', *DEVICE_TYPES])}; "
                                   "use auto, cpu, cuda or cuda:N")
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: '{name}' is not a device (its index must be a number); use auto, cpu, "
                          f"{kind} or {kind}:N") from None


def _validate_distributed(config: Config, world_size: Optional[int]) -> None:
    """The distributed settings, for `world_size` ranks, with the launcher's flags (lowmem.distributed.launcher_env)
    and the DeepSpeed JSON (lowmem.distributed.deepspeed_settings) judged against them. Under a launcher,
    backend auto is resolved here, so the recorded config names the backend that trained."""
    from lowmem.distributed import deepspeed_settings as ds
    from lowmem.distributed.launch import launcher_world, resolve_backend
    from lowmem.distributed.launcher_env import apply_launcher_flags, check_launcher_flags

    d, t = config.distributed, config.train
    world = launcher_world()[2] if world_size is None else world_size
    _require(d.zero_stage in (0, 1, 2, 3), f"distributed.zero_stage: must be 0, 1, 2 or 3, got {d.zero_stage}")
    _require(d.timeout_s > 0, f"distributed.timeout_s: must be positive, got {d.timeout_s}")
    _require(t.global_batch_size is None or t.global_batch_size >= 1,
             f"train.global_batch_size: must be at least 1, got {t.global_batch_size}")
    _require(t.global_batch_size is None or t.grad_accum == 1,
             f"train.grad_accum: {t.grad_accum} set together with train.global_batch_size; leave grad_accum at 1, "
             f"it is derived (global_batch_size / (batch_size x ranks))")
    ds.grad_accum_for(config, world)  # a global batch the ranks cannot divide
    apply_launcher_flags(config)
    if d.backend in ("none",) and d.gradient_sync != "full":
        raise ConfigError("distributed.gradient_sync: applies to the ddp backend; distributed.backend is 'none'")
    _require(d.backend != "none" or world == 1,
             f"distributed.backend: 'none' under a launcher of {world} ranks would train {world} separate copies "
             f"into one run directory; set distributed.backend=auto, ddp or deepspeed")
    if world > 1:
        d.backend = resolve_backend(d.backend, world)
    user: dict = {}
    if d.deepspeed_config is not None:
        _require(Path(d.deepspeed_config).is_file(),
                 f"distributed.deepspeed_config: file '{d.deepspeed_config}' {_not_a_file(Path(d.deepspeed_config))}")
        _require(d.backend != "ddp", f"distributed.deepspeed_config: set, but distributed.backend is 'ddp', which "
                                     f"would ignore it; set distributed.backend=deepspeed (or auto under "
                                     f"accelerate launch --use_deepspeed)")
        user = ds.read_json(d.deepspeed_config)
        ds.check_file(config, world, user)
    check_launcher_flags(ds.Context(config, world, ds.drop_auto(user)))
    ds.check_zero3_options(config)
    if d.gradient_sync == "projected":
        from lowmem.distributed.gradient_sync import check_projected_sync

        check_projected_sync(config.optimizer)
        _require(t.grad_clip == 0.0, "distributed.gradient_sync: 'projected' leaves the whole gradient unknown on "
                                     "each rank, so its global norm cannot be clipped; set train.grad_clip=0")
    if config.optimizer.update_in_backward and d.backend in ("ddp", "deepspeed"):
        raise ConfigError(f"optimizer.update_in_backward: steps each weight during backward, before "
                          f"{d.backend} has averaged its gradient over the ranks; set it to false to train on "
                          f"several ranks")
