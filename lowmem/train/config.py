"""The run's configuration: every section (each owned, and checked, by its package), YAML files with `include`
and dotted command-line overrides, one resolve step for the defaults that depend on several sections, and the
checks across sections.

Loading walks the YAML tree against the dataclasses (lowmem.config), so an unknown key, a wrong type or an
impossible value fails before any work starts, with the dotted key in the message and, for a misspelled key
or name, the closest valid one. Order: each section validates itself, then the checks that need what the user
set, then `resolve` fills the defaults that follow from other sections and the launcher, then the checks
that need them.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from lowmem.config import apply_override, flatten, from_dict, load_tree, not_a_file, require, to_dict
from lowmem.console import log
from lowmem.data.config import BPEConfig, DataConfig, TokenizerConfig
from lowmem.distributed import deepspeed_settings as ds
from lowmem.distributed.config import DistributedConfig
from lowmem.distributed.gradient_sync import check_projected_sync
from lowmem.distributed.launch import launcher_world, resolve_backend
from lowmem.distributed.launcher_env import apply_launcher_flags, check_launcher_flags
from lowmem.errors import ConfigError, closest
from lowmem.model.config import ModelConfig
from lowmem.optim.registry import parse_optimizer_options
from lowmem.train.schedule import SCHEDULES


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0

    def validate(self) -> None:
        """The run directory is run.out_dir/run.name: a name of several parts (or none) would put it, and the
        checkpoints a fresh run deletes by rotation, somewhere else."""
        name = self.name
        one_part = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
        require(one_part, f"run.name: {name!r} must be one directory name (not empty, '.' or '..', no '/'); "
                          "set run.out_dir to say where the run directory goes")


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

    def validate(self) -> None:
        require(self.batch_size >= 1, f"train.batch_size: must be at least 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"train.grad_accum: must be at least 1, got {self.grad_accum}")
        require(self.global_batch_size is None or self.global_batch_size >= 1,
                f"train.global_batch_size: must be at least 1, got {self.global_batch_size}")
        require(self.global_batch_size is None or self.grad_accum == 1,
                f"train.grad_accum: {self.grad_accum} set together with train.global_batch_size; leave grad_accum "
                f"at 1, it is derived (global_batch_size / (batch_size x ranks))")
        require(self.max_steps >= 1, f"train.max_steps: must be at least 1, got {self.max_steps}")
        require(self.max_tokens is None or self.max_tokens > 0, f"train.max_tokens: must be positive, got {self.max_tokens}")
        require(self.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0.0, f"train.grad_clip: must be >= 0, got {self.grad_clip}")
        require(self.eval_every >= 0, f"train.eval_every: must be >= 0, got {self.eval_every}")
        require(self.eval_tokens >= 1, f"train.eval_tokens: must be positive, got {self.eval_tokens}")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1,
                f"train.eval_batch_size: must be at least 1, got {self.eval_batch_size}")
        _validate_device(self.device)
        require(self.log_every >= 1, f"train.log_every: must be at least 1, got {self.log_every}")
        require(self.schedule in SCHEDULES,
                f"train.schedule: unknown schedule '{self.schedule}'{closest(self.schedule, SCHEDULES)}; "
                f"choose from {sorted(SCHEDULES)}")


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: Optional[str] = None  # None | "auto" | a checkpoint directory

    def validate(self) -> None:
        require(self.every >= 0, f"checkpoint.every: must be >= 0, got {self.every}")
        require(self.keep_last >= 1, f"checkpoint.keep_last: must be at least 1, got {self.keep_last}")
        if self.resume not in (None, "auto"):
            require(Path(self.resume).is_dir(), f"checkpoint.resume: checkpoint directory '{self.resume}' "
                                                f"{'is a file' if Path(self.resume).exists() else 'not found'}")
            require((Path(self.resume) / "state.pt").is_file(),
                    f"checkpoint.resume: '{self.resume}' is not a complete checkpoint (no state.pt)")


@dataclass
class LogConfig:
    tensorboard: bool = False
    progress: bool = True


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


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _validate_device(name: str) -> None:
    """A device string torch parses, of a kind lowmem runs on (whether this machine has it is checked when
    the run starts: lowmem.train.device.pick_device)."""
    if name == "auto":
        return
    kind = name.split(":")[0]
    require(kind in DEVICE_TYPES, f"train.device: unknown device '{name}'{closest(kind, ['auto', *DEVICE_TYPES])}; "
                                   "use auto, cpu, cuda or cuda:N")
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: '{name}' is not a device (its index must be a number); use auto, cpu, "
                          f"{kind} or {kind}:N") from None


def config_changes(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two resolved configs. A key the saved config lacks (written
    by an older lowmem) is no change while it holds its default (or None): new options must not make every
    earlier run and checkpoint look different."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(to_dict(Config()))
    return sorted(key for key in old.keys() | new.keys()
                  if old.get(key) != new.get(key)
                  and not (key not in old and new[key] in (None, defaults.get(key))))


def load_config(paths: str | Path | typing.Sequence[str | Path] | None,
                overrides: typing.Sequence[str] = (), world_size: Optional[int] = None) -> Config:
    """Read and merge one or more YAML files (later wins), apply dotted overrides, validate for `world_size`
    ranks (None: the launcher's). Raises ConfigError on any bad key or value."""
    files = load_tree(paths)
    tree = copy.deepcopy(files)
    for override in overrides:
        tree = apply_override(tree, override)
    _lr_follows_a_switched_optimizer(files, tree, overrides)
    return config_from_tree(tree, world_size)


def _lr_follows_a_switched_optimizer(files: dict, tree: dict, overrides: typing.Sequence[str]) -> None:
    """An lr in the files was chosen for the optimizer they name: when the command line names another
    optimizer and sets no lr, that optimizer's own preset lr applies (GaLore's 0.01, not AdamW's 0.003)."""
    before, after = files.get("optimizer") or {}, tree.get("optimizer") or {}
    switched = before.get("name", "adamw") != after.get("name", "adamw")
    lr_given = any(o.split("=", 1)[0].strip() in ("optimizer.lr", "optimizer") for o in overrides)
    if switched and "lr" in before and not lr_given:
        del after["lr"]
        log.info(f"optimizer.lr: the config's {before['lr']} was set for {before.get('name', 'adamw')}; "
                 f"{after['name']} trains at its own preset lr (set optimizer.lr=... to choose one)")


def config_from_tree(tree: dict, world_size: Optional[int] = None) -> Config:
    tree = dict(tree)
    optimizer_tree = tree.pop("optimizer", None) or {"name": "adamw"}
    config = from_dict(Config, tree)
    config.optimizer = parse_optimizer_options(optimizer_tree)
    validate(config, world_size)
    return config


def validate(config: Config, world_size: Optional[int] = None) -> None:
    """Every check of a config, for `world_size` ranks (None: the launcher's environment), with `resolve` in
    between. Training and the memory planner both load configs through here, so they accept and refuse the
    same ones."""
    world = launcher_world()[2] if world_size is None else world_size
    for section in (config.run, config.model, config.tokenizer, config.data, config.train, config.checkpoint,
                    config.distributed):
        section.validate()
    m, d, t = config.model, config.distributed, config.train
    if t.max_tokens is None and t.warmup_steps >= t.max_steps:
        log.warning(f"warning: train.warmup_steps {t.warmup_steps} >= train.max_steps {t.max_steps}: the lr never "
                    f"leaves its warm-up")
    if m.pretrained is not None:
        # Its embeddings were trained with its own tokenizer: a freshly fitted BPE's ids would mean nothing to it.
        require(config.tokenizer.train_bpe is None,
                f"tokenizer.train_bpe: a freshly fitted BPE gives token ids the pretrained model "
                f"'{m.pretrained}' never saw; set tokenizer.train_bpe=null to train with the model's own "
                f"tokenizer (or tokenizer.name=... for another one that fits its vocabulary)")
    if config.optimizer.update_in_backward:
        require(t.grad_clip == 0.0,
                "optimizer.update_in_backward: global gradient clipping needs every gradient at once; "
                "set train.grad_clip=0 to update in backward")
    ds.grad_accum_for(config, world)  # a global batch the ranks cannot divide
    require(d.backend != "none" or world == 1,
            f"distributed.backend: 'none' under a launcher of {world} ranks would train {world} separate copies "
            f"into one run directory; set distributed.backend=auto, ddp or deepspeed")
    resolve(config, world)
    if config.data.instruct is not None:
        require(config.tokenizer.train_bpe is None,
                "data.instruct: needs the tokenizer the model was trained with (model.pretrained's own, or "
                "tokenizer.name), not a freshly fitted BPE; set tokenizer.train_bpe=null and tokenizer.name=...")
    _check_distributed(config, world)


def resolve(config: Config, world: int) -> None:
    """The defaults that follow from other sections or from the launcher, filled in place, so the recorded
    config says what trained: the tokenizer (a pretrained model's own, else a fitted BPE), the keys the
    launcher's flags set (lowmem.distributed.launcher_env), and backend auto under a launcher."""
    tokenizer = config.tokenizer
    if tokenizer.name is None and tokenizer.train_bpe is None:
        if config.model.pretrained is not None:
            tokenizer.name = config.model.pretrained  # a pretrained model brings its own tokenizer
        else:
            tokenizer.train_bpe = BPEConfig()  # default: fit a byte-level BPE on the training split
    apply_launcher_flags(config)
    if world > 1:
        config.distributed.backend = resolve_backend(config.distributed.backend, world)


def _check_distributed(config: Config, world: int) -> None:
    """The distributed settings against the launcher's flags, the DeepSpeed JSON (lowmem.distributed.
    deepspeed_settings), the optimizer and the batch."""
    d, t = config.distributed, config.train
    user: dict = {}
    if d.deepspeed_config is not None:
        require(Path(d.deepspeed_config).is_file(),
                f"distributed.deepspeed_config: file '{d.deepspeed_config}' {not_a_file(Path(d.deepspeed_config))}")
        require(d.backend != "ddp", "distributed.deepspeed_config: set, but distributed.backend is 'ddp', which "
                                    "would ignore it; set distributed.backend=deepspeed (or auto under "
                                    "accelerate launch --use_deepspeed)")
        user = ds.read_json(d.deepspeed_config)
        ds.check_file(config, world, user)
    check_launcher_flags(ds.Context(config, world, ds.drop_auto(user)))
    ds.check_zero3_options(config)
    if d.gradient_sync == "projected":
        check_projected_sync(config.optimizer)
        require(t.grad_clip == 0.0, "distributed.gradient_sync: 'projected' leaves the whole gradient unknown on "
                                    "each rank, so its global norm cannot be clipped; set train.grad_clip=0")
    if config.optimizer.update_in_backward and d.backend in ("ddp", "deepspeed"):
        raise ConfigError(f"optimizer.update_in_backward: steps each weight during backward, before "
                          f"{d.backend} has averaged its gradient over the ranks; set it to false to train on "
                          f"several ranks")
