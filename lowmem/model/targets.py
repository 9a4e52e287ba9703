"""Which modules of an architecture are its attention and MLP projections: what the projecting optimizers and
LoRA act on by default."""
from __future__ import annotations

import re

from torch import nn

# The attention and MLP projections of each architecture family (module-name substrings), by the model's
# config.model_type. GPT-2's Conv1D weights (in x out, the transpose of a Linear's) are 2-D matrices like any
# other: the projectors work on either orientation.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2",
                     "granite", "cohere"], ["self_attn", "mlp"]),
    "gpt2": ["attn", "mlp"],
    "gpt_neox": ["attention", "mlp"],
    "gptj": ["attn", "mlp"],
    "opt": ["self_attn", "fc1", "fc2"],
    "falcon": ["self_attention", "mlp"],
    "phi": ["self_attn", "mlp"],
}


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the modules holding a 2-D weight matrix (linears; embeddings excluded), with layer numbers
    folded into N so that each kind of module is listed once."""
    names = [re.sub(r"\.\d+\.", ".N.", name) for name, module in model.named_modules()
             if not isinstance(module, nn.Embedding) and getattr(module, "weight", None) is not None
             and module.weight.ndim == 2]
    return list(dict.fromkeys(names))
