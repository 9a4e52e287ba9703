"""Export a checkpoint as a plain Hugging Face model directory (weights, config, tokenizer).

    python -m lowmem.export CHECKPOINT_DIR|RUN_DIR OUT_DIR [--fake-quant]

A run directory exports its newest checkpoint that loads with finite weights.

Without flags the master weights are written as they are. `--fake-quant` writes the weights of the linears
the run's `model.quant` replaced quantize-dequantized (round to nearest), so a plain model computes with the
weights the run trained through; activations cannot be quantized in a plain model and are left as they are.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowmem.console import log
from lowmem.config.schema import from_dict
from lowmem.errors import REPORTED, CheckpointError, ConfigError, EnvironmentProblem, os_error_text, report
from lowmem.library_output import quiet_accelerator_probe
from lowmem.model.config import QuantConfig
from lowmem.model.quant.fake import quantize_weight
from lowmem.model.quant.linear import target_linears
from lowmem.train import checkpoint as ckpt


def checkpoint_quant(checkpoint: Path) -> QuantConfig:
    """The `model.quant` a checkpoint was trained with, read from the config saved in its state.pt."""
    state = ckpt.load_state(checkpoint, mmap=True)  # mmap: only the config is needed, not the optimizer state
    tree = state["config"].get("model", {}).get("quant")
    quant = from_dict(QuantConfig, tree, "model.quant") if tree else None
    if quant is None or quant.weights == "none":
        raise ConfigError(f"--fake-quant: checkpoint '{checkpoint}' was trained without quantized weights "
                          f"(model.quant: {tree}); export it without --fake-quant")
    return quant


def fake_quantize_weights(model: PreTrainedModel, quant: QuantConfig) -> list[str]:
    """Overwrite the target linears' weights of a plain model by their fake-quantized values; the names."""
    targets = target_linears(model, quant)
    with torch.no_grad():
        for linear in targets.values():
            linear.weight.copy_(quantize_weight(linear.weight, quant.weights, quant.group_size,
                                                quant.keep_outliers))
    return list(targets)


def resolve_checkpoint(path: Path, doing: str = "exporting") -> Path:
    """The checkpoint to export or generate from: `path` itself, or for a run directory its newest checkpoint that loads and
    holds finite weights."""
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory '{path}' not found")
    if (path / "checkpoints").is_dir():  # a run directory
        found = ckpt.last_good_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run directory '{path}' holds no checkpoint that loads with finite weights; "
                                  f"pass a checkpoints/step_XXXXXXXX directory")
        log.info(f"{doing} {found}, the newest good checkpoint of the run directory {path}")
        return found
    if not (path / "model").is_dir() or not (path / "state.pt").is_file():
        raise ConfigError(f"'{path}' is not a complete checkpoint (needs model/ and state.pt); pass a "
                          "checkpoints/step_XXXXXXXX directory or a run directory")
    return path


def check_output(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output '{out_dir}' is a file, not a directory; name a new directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"output directory '{out_dir}' is not empty; choose a new one")


def export(checkpoint: str | Path, out_dir: str | Path, fake_quant: bool = False) -> Path:
    """Write the checkpoint's model (and tokenizer) to `out_dir`; ConfigError names a bad argument, a failed
    write leaves no partial output directory."""
    checkpoint, out_dir = resolve_checkpoint(Path(checkpoint)), Path(out_dir)
    check_output(out_dir)
    quant = checkpoint_quant(checkpoint) if fake_quant else None
    ckpt.check_weights(checkpoint)  # a truncated or damaged weight file: a message naming it
    try:  # a damaged config.json or tokenizer file fails in many ways
        model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", dtype="auto")
        tokenizer = None
        if (checkpoint / "model" / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model")
    except Exception as err:
        raise CheckpointError(f"checkpoint '{checkpoint}': its model/ cannot be loaded "
                              f"({ckpt.error_reason(err)})") from err
    if quant is not None:
        names = fake_quantize_weights(model, quant)
        log.info(f"fake-quantized the {quant.weights} weights of {len(names)} linears (group size {quant.group_size})")
    created = not out_dir.exists()
    try:
        ckpt.write_model(model, out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        ckpt.share_weight_files(out_dir)
    except BaseException as err:  # a full disk, Ctrl-C: no half-written model is left to be taken for whole
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(err, OSError):
            raise EnvironmentProblem(f"cannot write the model to '{out_dir}' ({os_error_text(err)})") from err
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, runs/NAME/checkpoints/step_XXXXXXXX, or a run "
                                           "directory runs/NAME (its newest good checkpoint)")
    parser.add_argument("out_dir", help="new directory for the Hugging Face model")
    parser.add_argument("--fake-quant", action="store_true",
                        help="write the model.quant target weights quantize-dequantized")
    args = parser.parse_args(argv)
    quiet_accelerator_probe()  # saving imports DeepSpeed (through accelerate), which would warn on a CPU machine
    try:
        out = export(args.checkpoint, args.out_dir, args.fake_quant)
    except REPORTED as err:
        return report(err)
    log.info(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
