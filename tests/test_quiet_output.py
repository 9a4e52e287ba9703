"""A plain run prints nothing that reads as a failure: no library banners, bars or warnings about code paths
lowmem does not take, run as a user runs it (train.py from the checkout's root, in a fresh process)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_config
from lowmem.library_output import BNB_HUB_KERNEL, TESTED_UNDER_ZERO, deepspeed_untested_note, import_bitsandbytes

ROOT = Path(__file__).resolve().parent.parent
# What the libraries print on their own: bitsandbytes' hub-kernel note, DeepSpeed's accelerator banner,
# transformers' shard-writer bar, any Python warning.
NOISE = [BNB_HUB_KERNEL, "real_accelerator", "Setting accelerator", "Writing model shards", "Warning:", "[WARNING]"]


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DS_", "PYTHONWARNINGS"))}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_quiet(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr
    for words in NOISE:
        assert words not in run.stdout + run.stderr, f"{words!r} printed:\n{run.stdout}\n{run.stderr}"


@pytest.mark.subprocess
def test_a_plain_run_with_checkpoints_prints_no_library_noise(tmp_path, corpus):
    run = run_train(str(write_tiny_config(tmp_path, corpus)), "train.max_steps=4", "checkpoint.every=2")
    assert_quiet(run)
    assert run.stderr == ""  # log.progress=false: nothing on stderr at all
    assert "done: step 4" in run.stdout
    assert (tmp_path / "runs" / "t" / "checkpoints" / "step_00000004" / "model" / "model.safetensors").exists()


@pytest.mark.subprocess
def test_lora_and_bitsandbytes_runs_print_no_library_noise(tmp_path, tiny_finetune):
    """peft imports bitsandbytes (whose CPU backend warns about a hub kernel lowmem never runs) and reads a
    deprecated transformers alias; bnb_adamw8bit imports bitsandbytes itself."""
    data = tiny_finetune["llama"]
    common = ["train.max_steps=2", "checkpoint.every=2", f"run.out_dir={tmp_path / 'runs'}",
              f"model.pretrained={data / 'model'}", f"data.files=[{data / 'chat.jsonl'}]", "log.progress=false"]
    assert_quiet(run_train(str(ROOT / "configs" / "finetune_lora.yaml"), *common))
    assert_quiet(run_train(str(ROOT / "configs" / "finetune_adamw.yaml"), *common, "optimizer.name=bnb_adamw8bit"))


def test_bitsandbytes_is_imported_without_its_hub_kernel_note(capfd):
    if "bitsandbytes" in sys.modules:
        pytest.skip("bitsandbytes already imported in this process")
    assert import_bitsandbytes() is sys.modules["bitsandbytes"]
    assert BNB_HUB_KERNEL not in "".join(capfd.readouterr())


def test_deepspeeds_untested_optimizer_warning_becomes_one_line_of_ours(capsys):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("DeepSpeed")
    keep = Keep()
    logger.addHandler(keep)
    try:
        with deepspeed_untested_note(is_main=True):
            for _ in range(2):
                logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
            logger.warning("another warning")
    finally:
        logger.removeHandler(keep)
    assert seen == ["another warning"]
    assert capsys.readouterr().err.count(TESTED_UNDER_ZERO) == 1
