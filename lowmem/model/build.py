"""LLaMA-style models: the reference presets as transformers `LlamaConfig`s, or a pretrained checkpoint."""
from __future__ import annotations

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lowmem.errors import ConfigError, closest, error_summary
from lowmem.model.config import MODEL_SHAPE_KEYS, ModelConfig
from lowmem.model.presets import MODEL_PRESETS
from lowmem.model.quant.linear import apply_fake_quant

PRESET_COMMON = dict(vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.02,
                     hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # set from the run's tokenizer


def llama_config(cfg: ModelConfig, vocab_size: int | None = None) -> LlamaConfig:
    """The preset's LlamaConfig with every override from `cfg` applied; `vocab_size` from the tokenizer."""
    fields = dict(PRESET_COMMON, **MODEL_PRESETS[cfg.preset])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    fields.update({key: getattr(cfg, key) for key in MODEL_SHAPE_KEYS if getattr(cfg, key) is not None})
    known = set(LlamaConfig().to_dict())
    for key in cfg.extra:
        if key in MODEL_SHAPE_KEYS:
            raise ConfigError(f"model.extra.{key}: set model.{key} instead")
        if key not in known:
            raise ConfigError(f"model.extra.{key}: not a LlamaConfig field{closest(key, known)}")
    fields.update(cfg.extra)
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConfigError(f"model.hidden_size: {fields['hidden_size']} is not divisible by "
                          f"model.num_attention_heads {fields['num_attention_heads']}")
    kv_heads = fields.get("num_key_value_heads") or fields["num_attention_heads"]
    if fields["num_attention_heads"] % kv_heads:
        raise ConfigError(f"model.num_key_value_heads: {kv_heads} does not divide "
                          f"model.num_attention_heads {fields['num_attention_heads']}")
    try:
        return LlamaConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as err:  # transformers checks head_dim, rope, ...
        raise ConfigError(f"model: the preset '{cfg.preset}' with these overrides is not a valid LlamaConfig: "
                          f"{err}") from err


def load_pretrained(name: str, loader, **kwargs):
    """`loader.from_pretrained(name)`, with a failure reported against the `model.pretrained` key."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except Exception as err:  # a missing name: OSError; a damaged config or weight file: JSON, safetensors...
        raise ConfigError(f"model.pretrained: cannot load '{name}' (a local directory or hub name): "
                          f"{error_summary(err)}") from err


def build_model(cfg: ModelConfig, vocab_size: int | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None
                ) -> PreTrainedModel:
    """A fresh preset model, or `cfg.pretrained` (local directory or hub name) loaded with its weights; with
    `cfg.quant`, its target linears fake-quantized (the master weights keep `dtype`).

    A fresh model takes `tokenizer`'s eos/bos/pad ids into its config and generation config, so a saved
    checkpoint's `generate` stops at the tokenizer's document end. A pretrained model keeps its own (they
    belong to its own tokenizer, and may list several eos ids)."""
    if cfg.pretrained is not None:
        model = load_pretrained(cfg.pretrained, AutoModelForCausalLM, dtype=dtype)
    else:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(cfg, vocab_size)).to(dtype)
        if tokenizer is not None:
            for key in SPECIAL_TOKEN_IDS:
                setattr(model.config, key, getattr(tokenizer, key))
                setattr(model.generation_config, key, getattr(tokenizer, key))
    model.to(device)
    apply_fake_quant(model, cfg.quant)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_meta_model(cfg: ModelConfig, vocab_size: int | None = None) -> PreTrainedModel:
    """The model's structure with no storage, to check shapes (and `cfg.quant` against the layers) before any
    work is done."""
    if cfg.pretrained is not None:
        from transformers import AutoConfig

        config = load_pretrained(cfg.pretrained, AutoConfig)
    else:
        config = llama_config(cfg, vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    apply_fake_quant(model, cfg.quant)
    return model


MODEL_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16_autocast": torch.float32, "bf16": torch.bfloat16}


def weight_dtype(cfg: ModelConfig, precision: str) -> torch.dtype:
    """The dtype the weights are built or loaded in: `model.dtype` when set (auto: the pretrained checkpoint's
    own, read from its config), else the one `train.precision` implies."""
    if cfg.dtype is None:
        return PRECISION_DTYPES[precision]
    if cfg.dtype != "auto":
        return MODEL_DTYPES[cfg.dtype]
    if cfg.pretrained is None:
        return PRECISION_DTYPES[precision]  # a fresh model has no dtype of its own
    from transformers import AutoConfig

    saved = getattr(load_pretrained(cfg.pretrained, AutoConfig), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def prepare_for_training(model: PreTrainedModel, cfg: ModelConfig) -> PreTrainedModel:
    """Freeze `model.freeze`, then wrap the model with LoRA adapters when `model.lora` is set (the returned
    model is then a peft model). Works on a meta-device model too, for the planner."""
    from lowmem.model.freeze import freeze

    freeze(model, cfg.freeze)
    if cfg.lora is not None:
        from lowmem.model.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the whole model: under ZeRO-3 a rank holds a partition, and `ds_numel` is the full size."""
    def size(p: torch.Tensor) -> int:
        return getattr(p, "ds_numel", p.numel())

    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    embedding = sum(size(p) for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    return {"total": total, "trainable": trainable, "non_embedding": total - embedding}
