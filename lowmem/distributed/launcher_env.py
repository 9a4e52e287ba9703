"""Launcher flags that mean something lowmem configures: judged at config validation, never silently ignored.

`accelerate launch` passes its flags to the script as environment variables (accelerate.utils.launch:
`--mixed_precision bf16` is ACCELERATE_MIXED_PRECISION=bf16, `--zero_stage 2` ACCELERATE_DEEPSPEED_ZERO_STAGE=2,
...); torchrun and the deepspeed launcher set only the ranks and world size. lowmem's config decides every
setting, so for each flag in `FLAGS`:

- a lowmem key left at auto (or unset) takes the flag's value (`apply`), and the resolved config written to
  runs/NAME/config.yaml records it: ACCELERATE_USE_CPU with train.device=auto, ACCELERATE_USE_DEEPSPEED with
  distributed.backend=auto, ACCELERATE_DEEPSPEED_CONFIG_FILE with no distributed.deepspeed_config;
- otherwise a value that agrees with the config (or the launcher's 'no' / false default) passes, and one that
  conflicts is refused naming the flag, the lowmem key and what to set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from lowmem.distributed.deepspeed_settings import ABSENT, Context, accum_shown, grad_accum_for, lookup, shown
from lowmem.errors import ConfigError

if TYPE_CHECKING:
    from lowmem.train.config import Config


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def _off(value: str, ctx: Context) -> bool:
    return not _true(value)


def _offload_device(section: str) -> Callable[[str, Context], bool]:
    def agrees(value: str, ctx: Context) -> bool:
        given = lookup(ctx.user, f"zero_optimization.{section}.device")
        return value.strip().lower() == ("none" if given in (ABSENT, None) else str(given).lower())
    return agrees


def _precision_agrees(value: str, ctx: Context) -> bool:
    # accelerate's bf16 is bf16 compute: lowmem's bf16_autocast, or bf16 weights (DeepSpeed's bf16)
    value = value.strip().lower()
    return value == "no" or (value == "bf16" and ctx.config.train.precision in ("bf16", "bf16_autocast"))


def _precision_fix(value: str) -> str:
    if value == "bf16":
        return "set train.precision=bf16_autocast (or bf16 for bf16 weights), or launch with --mixed_precision no"
    return f"{value} is not one of lowmem's precisions: set train.precision=bf16_autocast and launch with " \
           f"--mixed_precision bf16 or no"


def _same_file(value: str, ctx: Context) -> bool:
    given = ctx.config.distributed.deepspeed_config
    return given is not None and Path(given).resolve() == Path(value).resolve()


def _apply_cpu(value: str, config: Config) -> None:
    if _true(value) and config.train.device == "auto":
        config.train.device = "cpu"


def _apply_deepspeed_file(value: str, config: Config) -> None:
    if config.distributed.deepspeed_config is None:
        config.distributed.deepspeed_config = value


@dataclass(frozen=True)
class LauncherFlag:
    env: str
    flag: str  # the launcher option that sets it
    lowmem: Callable[[Context], str]  # the lowmem key it is judged against, with its value
    agrees: Callable[[str, Context], bool]
    fix: Callable[[str], str]  # what to set instead
    apply: Optional[Callable[[str, Config], None]] = None  # takes the value where lowmem's key is auto/unset


JSON_OFFLOAD = "distributed.deepspeed_config (zero_optimization.{}.device)"
FLAGS: list[LauncherFlag] = [
    LauncherFlag("ACCELERATE_MIXED_PRECISION", "accelerate launch --mixed_precision", shown("train.precision"),
                 _precision_agrees, _precision_fix),
    LauncherFlag("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "accelerate launch --gradient_accumulation_steps",
                 accum_shown,
                 lambda v, c: _number(v) == grad_accum_for(c.config, c.world_size),
                 lambda v: f"set train.grad_accum={v} (or train.global_batch_size)"),
    LauncherFlag("ACCELERATE_GRADIENT_CLIPPING", "accelerate launch --gradient_clipping", shown("train.grad_clip"),
                 lambda v, c: _number(v) == c.config.train.grad_clip, lambda v: f"set train.grad_clip={v}"),
    LauncherFlag("ACCELERATE_DEEPSPEED_ZERO_STAGE", "accelerate launch --zero_stage", shown("distributed.zero_stage"),
                 lambda v, c: _number(v) == c.config.distributed.zero_stage,
                 lambda v: f"set distributed.zero_stage={v}"),
    LauncherFlag("ACCELERATE_USE_DEEPSPEED", "accelerate launch --use_deepspeed", shown("distributed.backend"),
                 lambda v, c: not _true(v) or c.config.distributed.backend in ("auto", "deepspeed"),
                 lambda v: "set distributed.backend=deepspeed (or auto)"),
    LauncherFlag("ACCELERATE_USE_FSDP", "accelerate launch --use_fsdp", shown("distributed.backend"), _off,
                 lambda v: "lowmem has no FSDP backend: launch without --use_fsdp, and set "
                           "distributed.backend=deepspeed with distributed.zero_stage=3 to shard the weights"),
    LauncherFlag("ACCELERATE_USE_MEGATRON_LM", "accelerate launch --use_megatron_lm", shown("distributed.backend"),
                 _off, lambda v: "lowmem has no Megatron-LM backend: launch without it (distributed.backend)"),
    LauncherFlag("ACCELERATE_USE_PARALLELISM_CONFIG", "accelerate launch --use_parallelism_config",
                 shown("distributed.backend"), _off,
                 lambda v: "lowmem has no tensor or context parallelism: launch without it (distributed.backend)"),
    LauncherFlag("ACCELERATE_USE_CPU", "accelerate launch --cpu", shown("train.device"),
                 lambda v, c: not _true(v) or c.config.train.device == "cpu",
                 lambda v: "set train.device=cpu (or auto)", _apply_cpu),
    LauncherFlag("ACCELERATE_DYNAMO_BACKEND", "accelerate launch --dynamo_backend",
                 lambda c: "lowmem's config (it has no torch.compile setting)",
                 lambda v, c: v.strip().lower() == "no",
                 lambda v: "lowmem does not torch.compile the model: launch with --dynamo_backend no"),
    LauncherFlag("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate launch --deepspeed_config_file",
                 shown("distributed.deepspeed_config"), _same_file,
                 lambda v: f"set distributed.deepspeed_config={v}, or launch without --deepspeed_config_file",
                 _apply_deepspeed_file),
    LauncherFlag("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "accelerate launch --offload_optimizer_device",
                 lambda c: JSON_OFFLOAD.format("offload_optimizer"), _offload_device("offload_optimizer"),
                 lambda v: f'set "zero_optimization": {{"offload_optimizer": {{"device": "{v}"}}}} and '
                           f'"zero_force_ds_cpu_optimizer": false in the file distributed.deepspeed_config names'),
    LauncherFlag("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "accelerate launch --offload_param_device",
                 lambda c: JSON_OFFLOAD.format("offload_param"), _offload_device("offload_param"),
                 lambda v: f'set "zero_optimization": {{"offload_param": {{"device": "{v}"}}}} in the file '
                           f'distributed.deepspeed_config names'),
    LauncherFlag("ACCELERATE_DEEPSPEED_ZERO3_INIT", "accelerate launch --zero3_init_flag",
                 shown("distributed.zero_stage"), _off,
                 lambda v: "lowmem builds the model whole and DeepSpeed partitions it at start: launch without "
                           "--zero3_init_flag"),
    LauncherFlag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "accelerate launch --zero3_save_16bit_model",
                 shown("model.dtype"), _off,
                 lambda v: "lowmem writes the whole model in its training dtype with each checkpoint: set "
                           "model.dtype (or train.precision) and launch without --zero3_save_16bit_model"),
]


def apply_launcher_flags(config: Config, env: Mapping[str, str] = os.environ) -> None:
    """Fill the lowmem keys left at auto (or unset) from the launcher's flags."""
    for flag in FLAGS:
        if flag.apply is not None and env.get(flag.env, "") != "":
            flag.apply(env[flag.env], config)


def check_launcher_flags(ctx: Context, env: Mapping[str, str] = os.environ) -> None:
    """Refuse every launcher flag that conflicts with the config, naming both and what to set."""
    for flag in FLAGS:
        value = env.get(flag.env, "")
        if value != "" and not flag.agrees(value, ctx):
            raise ConfigError(f"{flag.env}={value} ({flag.flag}) conflicts with {flag.lowmem(ctx)}: {flag.fix(value)}")
