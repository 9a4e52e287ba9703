"""LoRA through `peft`: the baseline beside the low-memory optimizers, a model preparation set with `model.lora`.

`model.lora: {r, alpha, dropout, target_modules}` wraps the model with peft's `get_peft_model`: the base
weights are frozen, and the configured optimizer (AdamW typically) trains the adapters. Any optimizer trains
them, so a study can set LoRA + AdamW beside GaLore on the same model and data.

Checkpoints hold both forms: `model/` the merged weights W + (alpha / r) B A as a plain Hugging Face model (what
`AutoModelForCausalLM.from_pretrained` and `lowmem.export` read), and `adapter/` peft's adapter files, from
which a run resumes (on the base weights of `model.pretrained`, which LoRA never changes) and which
`PeftModel.from_pretrained(base, "adapter")` reads.
"""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from lowmem.errors import CheckpointError, ConfigError
from lowmem.model.config import LoraConfig
from lowmem.model.targets import DEFAULT_TARGETS, linear_module_names

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"


def _adaptable(module: nn.Module) -> bool:
    """A layer peft can put an adapter on: a linear, or GPT-2's Conv1D (a transposed linear)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def target_names(model: nn.Module, options: LoraConfig) -> list[str]:
    """Full names of the linears the adapters go on; ConfigError listing the linears when none matches."""

    patterns = options.target_modules
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        patterns = DEFAULT_TARGETS.get(model_type, DEFAULT_TARGETS["llama"])
    excluded = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    names = [name for name, module in model.named_modules()
             if _adaptable(module) and id(module) not in excluded and any(p in name for p in patterns)]
    if not names:
        raise ConfigError(f"model.lora.target_modules: {patterns} match no linear layer of the model; its "
                          f"linear modules are: {', '.join(linear_module_names(model))}")
    return names


def _compact(names: list[str], all_names: list[str]) -> list[str]:
    """The names as peft suffixes with the layer numbers dropped (`self_attn.q_proj`), so that adapter_config.json
    lists each kind of layer once; the full names when the suffixes would also match other layers."""
    suffixes = sorted({re.sub(r"^.*\.\d+\.", "", name) for name in names})
    matched = {n for n in all_names if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if matched == set(names) else names


def apply_lora(model: nn.Module, options: LoraConfig) -> nn.Module:
    """The model wrapped by peft with adapters on the target linears; only the adapters train."""
    from lowmem.library_output import import_bitsandbytes

    import_bitsandbytes()  # peft imports it: first, without its note about a kernel lowmem never runs
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    names = target_names(model, options)
    modules = dict(model.named_modules())
    adaptable = [n for n, m in modules.items() if _adaptable(m)]
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=_compact(names, adaptable), bias="none", task_type="CAUSAL_LM",
                        # Conv1D stores its weight in x out: peft must transpose the delta
                        fan_in_fan_out=any(isinstance(modules[n], Conv1D) for n in names))
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing a user can change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    # a PeftModel exists only once peft is imported; importing it to ask would pull in bitsandbytes
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged (W + scale B A) and peft's names undone, so it is
    a plain model's; computed beside the live weights, which stay unmerged (an in-place merge and unmerge
    would not give the same bits back, and a resumed run must continue the same weights)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            with torch.no_grad():
                deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER_NAME)
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value
    return state


def save_merged(model: nn.Module, directory: Path) -> None:
    """Write the merged model (plain Hugging Face layout) to `directory` and the adapter to its sibling
    `adapter/`."""
    directory = Path(directory)
    base = model.get_base_model()
    base.save_pretrained(directory, state_dict=merged_state_dict(model), safe_serialization=True)
    model.save_pretrained(directory.parent / ADAPTER_DIR, safe_serialization=True)


def load_adapter(model: nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's adapter weights into a LoRA-wrapped model (CheckpointError naming it otherwise)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(checkpoint) / ADAPTER_DIR / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{checkpoint}' has no {ADAPTER_DIR}/adapter_model.safetensors: it was "
                              "not written by a run with model.lora")
    try:
        weights = load_file(path)
    except Exception as err:  # a damaged file fails in several ways
        raise CheckpointError(f"checkpoint '{checkpoint}': {path.name} cannot be read ({err})") from err
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"checkpoint '{checkpoint}': adapter weights {unexpected[:3]} do not fit the model")
