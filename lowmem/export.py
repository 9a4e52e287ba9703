"""Export a checkpoint as a plain Hugging Face model directory (weights, config, tokenizer).

    python -m lowmem.export CHECKPOINT_DIR OUT_DIR [--fake-quant]

Without flags the master weights are written as they are. `--fake-quant` writes the weights of the linears
the run's `model.quant` replaced quantize-dequantized (round to nearest), so a plain model computes with the
weights the run trained through; activations cannot be quantized in a plain model and are left as they are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowmem.config import ConfigError, QuantConfig, from_dict
from lowmem.fake_quant import quantize_weight
from lowmem.quant_linear import target_linears


def checkpoint_quant(checkpoint: Path) -> QuantConfig:
    """The `model.quant` a checkpoint was trained with, read from the config saved in its state.pt."""
    # mmap: only the config is needed, not the optimizer state beside it.
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    tree = state.get("config", {}).get("model", {}).get("quant")
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


def export(checkpoint: str | Path, out_dir: str | Path, fake_quant: bool = False) -> Path:
    """Write the checkpoint's model (and tokenizer) to `out_dir`; ConfigError names a bad argument."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint directory '{checkpoint}' not found")
    if not (checkpoint / "model").is_dir() or not (checkpoint / "state.pt").is_file():
        raise ConfigError(f"'{checkpoint}' is not a complete checkpoint (needs model/ and state.pt); pass a "
                          "checkpoints/step_XXXXXXXX directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output directory '{out_dir}' is not empty; choose a new one")
    quant = checkpoint_quant(checkpoint) if fake_quant else None
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", dtype="auto")
    if quant is not None:
        names = fake_quantize_weights(model, quant)
        print(f"fake-quantized the {quant.weights} weights of {len(names)} linears (group size {quant.group_size})")
    model.save_pretrained(out_dir)
    if (checkpoint / "model" / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(checkpoint / "model").save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, runs/NAME/checkpoints/step_XXXXXXXX")
    parser.add_argument("out_dir", help="new directory for the Hugging Face model")
    parser.add_argument("--fake-quant", action="store_true",
                        help="write the model.quant target weights quantize-dequantized")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.fake_quant)
    except ConfigError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
