"""The `model:` section: a preset or a pretrained checkpoint, shape overrides, weight dtype, frozen patterns,
fake-quantized linears and LoRA adapters; each part checks its own values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lowmem.config.schema import require
from lowmem.errors import ConfigError, closest
from lowmem.kernels.dispatch import BACKENDS
from lowmem.model.presets import MODEL_PRESETS

# The ModelConfig fields that override a preset's LlamaConfig.
MODEL_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers", "vocab_size", "max_position_embeddings")
QUANT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class QuantConfig:
    """Fake 4-bit quantization of linear layers (lowmem.model.quant.linear); both formats none: no change."""
    weights: Literal["int4", "fp4", "none"] = "none"
    activations: Literal["int4", "fp4", "none"] = "none"
    group_size: int = 256  # consecutive input features sharing a scale; must divide every quantized in_features
    keep_outliers: int = 2  # largest |values| per group kept exact: activations, and fp4 weights
    stochastic_rounding: bool = False  # int4 weights and activations, in training mode only
    target_modules: list[str] = field(default_factory=lambda: list(QUANT_TARGETS))  # module-name substrings
    # auto (Triton's fused quantizers on CUDA, the torch reference elsewhere) | triton | torch (lowmem.kernels)
    kernels: str = "auto"

    def validate(self) -> None:
        """Checks that need no model; group sizes against the layers' widths are checked on the meta model."""
        require(self.group_size >= 1, f"model.quant.group_size: must be at least 1, got {self.group_size}")
        require(self.keep_outliers >= 0, f"model.quant.keep_outliers: must be >= 0, got {self.keep_outliers}")
        require(self.keep_outliers < self.group_size,
                f"model.quant.keep_outliers: {self.keep_outliers} leaves nothing to quantize in a group of "
                f"model.quant.group_size {self.group_size}; keep fewer than the group size")
        require(len(self.target_modules) > 0, "model.quant.target_modules: list at least one module-name pattern")
        require(self.kernels in BACKENDS,
                f"model.quant.kernels: unknown value '{self.kernels}'; choose from {list(BACKENDS)}")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module-name substrings, as optimizer.target_modules; null: the architecture's attention and MLP
    # projections (lowmem.model.targets.DEFAULT_TARGETS). Every linear (or GPT-2 Conv1D) inside a match gets an
    # adapter.
    target_modules: Optional[list[str]] = None

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r: must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("model.lora.target_modules: list at least one module-name pattern, or null for "
                              "the architecture's defaults")


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
    # Train LoRA adapters (through peft) instead of the weights themselves (lowmem.model.lora); any optimizer
    # trains them.
    lora: Optional[LoraConfig] = None
    # Weight dtype: fp32 | bf16 | fp16 | auto (a pretrained checkpoint's own dtype); None: from train.precision.
    dtype: Optional[Literal["fp32", "bf16", "fp16", "auto"]] = None
    # Shell-style patterns (fnmatch) over parameter and module names, e.g. "model.embed_tokens*" or
    # "*.layers.0.*": every matching parameter (or every parameter of a matching module) is frozen.
    freeze: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """The model section's own checks (a pretrained model against the tokenizer: lowmem.train.config)."""
        if self.pretrained is None:
            require(self.preset is not None, "model.preset: set a preset or model.pretrained")
            require(self.preset in MODEL_PRESETS,
                    f"model.preset: unknown preset '{self.preset}'{closest(str(self.preset), MODEL_PRESETS)}; "
                    f"choose from {sorted(MODEL_PRESETS)}")
        for key in MODEL_SHAPE_KEYS:
            value = getattr(self, key)
            require(value is None or value > 0, f"model.{key}: must be positive, got {value}")
        if self.quant is not None:
            self.quant.validate()
        if self.lora is not None:
            self.lora.validate()
        if self.pretrained is not None:
            # A pretrained model keeps its shapes and vocabulary: these keys would be silently ignored.
            ignored = [f"model.{key}" for key in MODEL_SHAPE_KEYS if getattr(self, key) is not None]
            ignored += ["model.extra"] if self.extra else []
            require(not ignored, f"{', '.join(ignored)}: a pretrained model (model.pretrained '{self.pretrained}') "
                    f"keeps its own shapes and config; unset {'them' if len(ignored) > 1 else 'it'} "
                    f"({' '.join(key + '=null' for key in ignored)})")
