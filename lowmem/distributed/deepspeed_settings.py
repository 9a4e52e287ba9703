"""What lowmem gives DeepSpeed, and what it accepts from a user's DeepSpeed JSON (distributed.deepspeed_config).

The JSON is read and judged once, at config validation (lowmem.config), so `train.py` and the memory planner
accept and refuse the same files, and a bad one is one line before any rank starts:

- malformed JSON, a top level that is not an object, or a key DeepSpeed does not know (its top-level keys are
  recorded from DeepSpeed's own parser; `zero_optimization`, `bf16` and `fp16` are checked by DeepSpeed's
  pydantic models, which also judge their value types) is refused naming the file;
- a setting lowmem's config also expresses (`SHARED`) must equal the value lowmem's config gives it, or the run
  is refused naming both keys: what `runs/NAME/config.yaml` records is then what DeepSpeed trained with.

A value of "auto" (as in Hugging Face's DeepSpeed files) means "lowmem's value" and is dropped.
"""
from __future__ import annotations

import collections.abc
import functools
import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from lowmem.config.schema import deep_merge
from lowmem.errors import ConfigError, closest

if TYPE_CHECKING:
    from lowmem.train.config import Config

WHERE = "distributed.deepspeed_config"
ABSENT = object()  # a key the JSON does not hold; as an expected value: the block must not appear
# Top-level keys DeepSpeed reads outside DeepSpeedConfig's constructor (where the recording cannot see them).
KEYS_READ_ELSEWHERE = ("sequence_parallel_size",)


@dataclass(frozen=True)
class Context:
    """What a DeepSpeed setting is judged against: the config, the ranks it will run on, and the user's JSON."""
    config: Config
    world_size: int
    user: dict  # the DeepSpeed JSON with its "auto" values dropped; {} without one


def grad_accum_for(config: Config, world_size: int) -> int:
    """Micro-batches per update on each rank (train.global_batch_size divided over the ranks when set)."""
    t = config.train
    if t.global_batch_size is None:
        return t.grad_accum
    per_micro = t.batch_size * world_size
    if t.global_batch_size % per_micro:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                          f"train.batch_size {t.batch_size} x {world_size} ranks")
    return t.global_batch_size // per_micro


def generated_config(config: Config, world_size: int) -> dict:
    """The DeepSpeed settings lowmem's config gives (the user's JSON is merged over them, agreeing)."""
    return {
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": grad_accum_for(config, world_size),
        "gradient_clipping": config.train.grad_clip,
        "zero_allow_untested_optimizer": True,  # lowmem's optimizers are not on DeepSpeed's list
        "zero_optimization": {"stage": config.distributed.zero_stage, "round_robin_gradients": False},
        "bf16": {"enabled": config.train.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
    }


def deepspeed_config(config: Config, world_size: int) -> dict:
    """The whole DeepSpeed config a run hands to deepspeed.initialize (the JSON was judged at validation)."""
    user = drop_auto(read_json(config.distributed.deepspeed_config)) if config.distributed.deepspeed_config else {}
    return deep_merge(generated_config(config, world_size), user)


# ---------------------------------------------------------------------------------------------------------
# Reading the file and checking its keys against DeepSpeed's


def read_json(path: str) -> dict:
    """The JSON object in `path`, or one ConfigError naming the file (and line of a syntax error)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{WHERE}: cannot read '{path}': {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{WHERE}: '{path}' is not valid JSON: {err.msg} at line {err.lineno}, "
                          f"column {err.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{WHERE}: '{path}' must hold a JSON object ({{...}}) at top level, got a "
                          f"{type(data).__name__}")
    return data


def drop_auto(tree: dict) -> dict:
    return {k: drop_auto(v) if isinstance(v, dict) else v for k, v in tree.items() if v != "auto"}


@functools.cache
def deepspeed_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser reads. DeepSpeed keeps no single schema of its top level,
    so a minimal config is parsed through a dict that records each key looked up."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Keys(collections.abc.KeysView):
        def __contains__(self, key):
            seen.add(key)
            return dict.__contains__(self._mapping, key)

    class Recording(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):
            return Keys(self)

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(seen) | frozenset(KEYS_READ_ELSEWHERE)


def section_models() -> dict[str, type]:
    """DeepSpeed's own pydantic models of the sections whose keys and value types are checked here."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "bfloat16": DeepSpeedBF16Config,
            "fp16": DeepSpeedFP16Config}


def _field_names(model: type) -> list[str]:
    return [name for key, f in model.model_fields.items() for name in (key, f.alias) if name]


def check_keys(user: dict, path: str) -> None:
    """Unknown keys (with the closest valid one) and wrong value types, as DeepSpeed's models judge them."""
    from pydantic import ValidationError

    known = deepspeed_keys()
    for key in user:
        if key not in known:
            raise ConfigError(f"{WHERE}: unknown DeepSpeed key '{key}' in {path}{closest(key, known)}")
    for section, model in section_models().items():
        if section not in user:
            continue
        value = user[section]
        if not isinstance(value, dict):
            raise ConfigError(f"{WHERE}: {section} in {path} must be an object, got {json.dumps(value)}")
        names = _field_names(model)
        for key in value:
            if key not in names:
                raise ConfigError(f"{WHERE}: unknown key '{section}.{key}' in {path}{closest(key, names)}")
        try:
            model(**drop_auto(value))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join([section, *map(str, first["loc"])])
            raise ConfigError(f"{WHERE}: {where} in {path}: {first['msg']}, got {json.dumps(first.get('input'))}") \
                from None


# ---------------------------------------------------------------------------------------------------------
# Settings lowmem's config also expresses: they must agree


def shown(key: str) -> Callable[[Context], str]:
    """'train.precision=fp32': a lowmem key and its value in the config."""
    def show(ctx: Context) -> str:
        value = operator.attrgetter(key)(ctx.config)
        return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
    return show


def accum_shown(ctx: Context) -> str:
    t = ctx.config.train
    if t.global_batch_size is None:
        return f"train.grad_accum={t.grad_accum}"
    return f"train.global_batch_size={t.global_batch_size} (grad_accum {grad_accum_for(ctx.config, ctx.world_size)} " \
           f"on {ctx.world_size} ranks)"


def _global_batch(ctx: Context) -> int:
    return ctx.config.train.batch_size * grad_accum_for(ctx.config, ctx.world_size) * ctx.world_size


def global_shown(ctx: Context) -> str:
    t = ctx.config.train
    if t.global_batch_size is not None:
        return f"train.global_batch_size={t.global_batch_size}"
    return f"train.batch_size={t.batch_size} x train.grad_accum={t.grad_accum} x {ctx.world_size} ranks = " \
           f"{_global_batch(ctx)}"


def _bf16_fix(value: Any) -> str:
    return ("set train.precision=bf16 (DeepSpeed's bf16: bf16 weights with an fp32 master copy)" if value is True
            else "set train.precision=fp32 or bf16_autocast")


@dataclass(frozen=True)
class Shared:
    """A DeepSpeed setting lowmem's config also expresses."""
    path: str  # dotted key in the DeepSpeed JSON
    lowmem: Callable[[Context], str]  # the lowmem key holding it, with its value ('train.precision=fp32')
    expected: Callable[[Context], Any]  # the value lowmem's config means (ABSENT: the block must not appear)
    fix: Callable[[Any], str]  # how to get the JSON's value through lowmem's config instead


NO_PRECISION = "is not one of lowmem's precisions: use train.precision=bf16 or bf16_autocast"
SHARED: list[Shared] = [
    Shared("bf16.enabled", shown("train.precision"), lambda c: c.config.train.precision == "bf16", _bf16_fix),
    Shared("bfloat16.enabled", shown("train.precision"), lambda c: c.config.train.precision == "bf16", _bf16_fix),
    Shared("fp16.enabled", shown("train.precision"), lambda c: False, lambda v: f"fp16 {NO_PRECISION}"),
    Shared("amp.enabled", shown("train.precision"), lambda c: False, lambda v: f"apex AMP {NO_PRECISION}"),
    Shared("torch_autocast.enabled", shown("train.precision"), lambda c: False,
           lambda v: "lowmem autocasts the forward itself: set train.precision=bf16_autocast"),
    Shared("zero_optimization.stage", shown("distributed.zero_stage"), lambda c: c.config.distributed.zero_stage,
           lambda v: f"set distributed.zero_stage={v}"),
    Shared("gradient_clipping", shown("train.grad_clip"), lambda c: c.config.train.grad_clip,
           lambda v: f"set train.grad_clip={v}"),
    Shared("train_micro_batch_size_per_gpu", shown("train.batch_size"), lambda c: c.config.train.batch_size,
           lambda v: f"set train.batch_size={v}"),
    Shared("gradient_accumulation_steps", accum_shown, lambda c: grad_accum_for(c.config, c.world_size),
           lambda v: f"set train.grad_accum={v} (or train.global_batch_size)"),
    Shared("train_batch_size", global_shown, _global_batch, lambda v: f"set train.global_batch_size={v}"),
    Shared("optimizer", shown("optimizer.name"), lambda c: ABSENT,
           lambda v: "lowmem runs its own optimizer inside DeepSpeed's step: set optimizer.name, optimizer.lr, ..."),
    Shared("scheduler", shown("train.schedule"), lambda c: ABSENT,
           lambda v: "lowmem drives the learning rate: set train.schedule, train.warmup_steps, ..."),
    Shared("activation_checkpointing", shown("model.activation_checkpointing"), lambda c: ABSENT,
           lambda v: "it configures deepspeed.checkpointing, which the model never calls: set "
                     "model.activation_checkpointing=true"),
    Shared("checkpoint", shown("checkpoint.every"), lambda c: ABSENT,
           lambda v: "it configures DeepSpeed's save_checkpoint, which lowmem never calls: set checkpoint.*"),
    Shared("elasticity.enabled", shown("train.global_batch_size"), lambda c: False,
           lambda v: "elastic batch sizes would replace lowmem's: set train.global_batch_size to keep the same "
                     "updates on any number of ranks"),
    Shared("curriculum_learning.enabled", shown("data.seq_len"), lambda c: False,
           lambda v: "lowmem's data pipeline (data.*) decides what each batch holds"),
    Shared("data_efficiency.enabled", shown("data.seq_len"), lambda c: False,
           lambda v: "lowmem's data pipeline (data.*) decides what each batch holds"),
    Shared("zero_allow_untested_optimizer", shown("optimizer.name"), lambda c: True,
           lambda v: "DeepSpeed would refuse lowmem's optimizer, which is not on its tested list"),
]


def lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return ABSENT
        node = node[key]
    return node


def same(value: Any, expected: Any) -> bool:
    """Equal as settings: a flag only equals a flag (JSON true is not 1), numbers compare as numbers."""
    if value is ABSENT or expected is ABSENT:
        return value is expected
    if isinstance(value, bool) or isinstance(expected, bool):
        return value is expected
    if isinstance(value, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(value, expected)
    return value == expected


def check_agreement(ctx: Context, path: str) -> None:
    for setting in SHARED:
        value = lookup(ctx.user, setting.path)
        if value is ABSENT or same(value, setting.expected(ctx)):
            continue
        given = setting.path if isinstance(value, dict) else f"{setting.path}={json.dumps(value)}"
        raise ConfigError(f"{WHERE}: {given} in {path} conflicts with {setting.lowmem(ctx)}; {setting.fix(value)} "
                          f"(or drop {setting.path} from the file: lowmem sets it from its config)")


def check_requirements(user: dict, path: str) -> None:
    """DeepSpeed settings lowmem's optimizer cannot run under, whatever the config says."""
    zero = user.get("zero_optimization", {})
    if zero.get("round_robin_gradients"):
        raise ConfigError(f"{WHERE}: zero_optimization.round_robin_gradients in {path} must be false: with it "
                          f"DeepSpeed's fragment map points at the wrong slices of its fp32 partition")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and user.get("zero_force_ds_cpu_optimizer", True):
        raise ConfigError(f"{WHERE}: offload_optimizer in {path} without \"zero_force_ds_cpu_optimizer\": false "
                          f"would silently replace lowmem's optimizer by DeepSpeed's CPU Adam; set it to false")


def check_with_deepspeed(ctx: Context, path: str) -> None:
    """The merged config through DeepSpeed's own parser, for what the checks above do not cover. The batch
    product is left out: it was judged against the real world size, DeepSpeed would assume one rank here."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    merged = deep_merge(generated_config(ctx.config, ctx.world_size), ctx.user)
    merged.pop("train_batch_size", None)
    try:
        DeepSpeedConfig(merged)
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{WHERE}: DeepSpeed refuses {path}: {line}") from None


def check_file(config: Config, world_size: int, user: dict) -> None:
    """Every check of the user's DeepSpeed JSON (already read), in the order a user would fix them."""
    path = config.distributed.deepspeed_config
    check_keys(user, path)
    ctx = Context(config, world_size, drop_auto(user))
    check_agreement(ctx, path)
    check_requirements(ctx.user, path)
    check_with_deepspeed(ctx, path)


# ---------------------------------------------------------------------------------------------------------
# ZeRO-3: only the element-wise torch AdamW runs on DeepSpeed's flat partitions


def zero_stage_of(config: Config) -> int:
    """The ZeRO stage a validated config trains with (0: no DeepSpeed, as plain data parallel holds)."""
    return config.distributed.zero_stage if config.distributed.backend == "deepspeed" else 0


def _zero3_refusal(config: Config) -> ConfigError:
    return ConfigError(f"distributed.zero_stage: ZeRO-3 splits every weight over the ranks, and "
                       f"'{config.optimizer.name}' has matrix rules (projections, factored or block-quantized "
                       f"moments, transforms) that need whole matrices; use stage 1 or 2 (ZeRO-3 runs the "
                       f"element-wise adamw)")


def check_zero3_options(config: Config) -> None:
    """At config validation: optimizers that never build torch AdamW are refused under ZeRO-3."""
    if zero_stage_of(config) == 3 and not (config.optimizer.name == "adamw"
                               and getattr(config.optimizer, "state_dtype", "auto") in ("auto", "fp32", "bf16")):
        raise _zero3_refusal(config)


def check_zero3_optimizer(config: Config, optimizer: torch.optim.Optimizer, stage: int) -> None:
    """On the optimizer built for ZeRO `stage` (the run's, or the planner's on meta weights): adamw builds the
    pipeline's dense AdamW instead of torch's when the weights' dtypes or its state_dtype call for it."""
    if stage == 3 and not isinstance(optimizer, torch.optim.AdamW):
        raise _zero3_refusal(config)
