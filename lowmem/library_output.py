"""What the libraries lowmem calls print on their own, kept to what a user needs.

- DeepSpeed, imported by accelerate whenever transformers saves a model (any backend), warns "Setting
  accelerator to CPU" when it finds no GPU: on a machine without CUDA lowmem names the CPU accelerator itself
  (DS_ACCELERATOR=cpu, what DeepSpeed would choose), so the probe has nothing to warn about.
- transformers draws a "Writing model shards" bar for every checkpoint; lowmem's own bar (or line) says when
  a checkpoint is written, so the shard writer's bar is always off.
- With `log.progress: false` every library bar (transformers, datasets, the hub) is off too.
- DeepSpeed calls every optimizer it does not ship "untested"; lowmem says instead what it tests.
- bitsandbytes (imported for `bnb_adamw8bit`, and by peft for LoRA) warns on AVX512-BF16 CPUs that the hub's
  4-bit CPU matmul kernel cannot be loaded: lowmem never runs that kernel (it uses bitsandbytes for optimizer
  states only), so that one warning is dropped while bitsandbytes is imported.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from lowmem.console import log

UNTESTED_OPTIMIZER = "untested optimizer"
BNB_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward"
TESTED_UNDER_ZERO = ("note: DeepSpeed calls lowmem's optimizer untested; lowmem checks every registered optimizer "
                     "under ZeRO-1/2 (and element-wise AdamW under ZeRO-3) against one process, weight for weight "
                     "(tests/distributed/test_distributed_zero.py)")


def quiet_accelerator_probe() -> None:
    """Before DeepSpeed is first imported: tell it the CPU accelerator where there is no CUDA device."""
    import torch

    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def set_library_progress(enabled: bool) -> None:
    """Turn the progress bars of transformers, datasets and huggingface_hub on or off with lowmem's."""
    import datasets
    import huggingface_hub.utils
    import transformers

    if enabled:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
        huggingface_hub.utils.enable_progress_bars()
    else:
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


@contextlib.contextmanager
def no_transformers_progress() -> Iterator[None]:
    """transformers' bars off inside (the shard writer of save_pretrained), as they were after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _DropMessage(logging.Filter):
    def __init__(self, words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return self.words not in record.getMessage()


def import_bitsandbytes():
    """bitsandbytes, its note about the hub's 4-bit CPU matmul kernel left out (see the module docstring)."""
    if "bitsandbytes" not in sys.modules:
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        drop = _DropMessage(BNB_HUB_KERNEL)
        logger.addFilter(drop)
        try:
            import bitsandbytes  # noqa: F401
        finally:
            logger.removeFilter(drop)
    return sys.modules["bitsandbytes"]


class _ReplaceUntestedWarning(logging.Filter):
    def __init__(self, announce: bool):
        super().__init__()
        self.announce = announce

    def filter(self, record: logging.LogRecord) -> bool:
        if UNTESTED_OPTIMIZER not in record.getMessage():
            return True
        if self.announce:
            log.warning(TESTED_UNDER_ZERO)
            self.announce = False
        return False


@contextlib.contextmanager
def deepspeed_untested_note(is_main: bool) -> Iterator[None]:
    """Inside, DeepSpeed's "untested optimizer" warning becomes lowmem's one line (on the main rank)."""
    logger = logging.getLogger("DeepSpeed")
    replace = _ReplaceUntestedWarning(is_main)
    logger.addFilter(replace)
    try:
        yield
    finally:
        logger.removeFilter(replace)
