"""Fake-quantized linear layers for quantization-aware training (`model.quant`), and swapping them into a model.

`FakeQuantLinear` is an `nn.Linear` whose forward multiplies the fake-quantized input by the fake-quantized
weight (`lowmem.model.quant.fake`). Its parameters are the unquantized master weights, in the training dtype and under
the names `weight`/`bias`, so optimizers, state dicts and `save_pretrained` see a plain `nn.Linear`.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.errors import ConfigError, closest
from lowmem.kernels.dispatch import resolve_backend
from lowmem.model.config import QuantConfig
from lowmem.model.quant.fake import linear_grads, quantize_activation, quantize_weight


def quant_enabled(quant: QuantConfig | None) -> bool:
    return quant is not None and (quant.weights != "none" or quant.activations != "none")


REFERENCES = {"weight": quantize_weight, "activation": quantize_activation}  # lowmem.model.quant.fake's, by operand


def _quantize(t: torch.Tensor, kind: str, quant: QuantConfig, stochastic: bool) -> torch.Tensor:
    """Q(t) for operand `kind` (weight | activation): lowmem.kernels.fake_quant where quant.kernels resolves to
    Triton for t's device (round to nearest), the torch reference otherwise."""
    fmt = quant.weights if kind == "weight" else quant.activations
    if fmt != "none" and resolve_backend(quant.kernels, t.device) == "triton":
        from lowmem.kernels import fake_quant as fused  # lazily: kernel modules import Triton

        if fused.handles(fmt, stochastic):
            return fused.fake_quantize(t, kind, fmt, quant.group_size, quant.keep_outliers)
    return REFERENCES[kind](t, fmt, quant.group_size, quant.keep_outliers, stochastic)


def _weight(w: torch.Tensor, quant: QuantConfig, stochastic: bool) -> torch.Tensor:
    return _quantize(w, "weight", quant, stochastic)


class FakeQuantLinearFunction(torch.autograd.Function):
    """out = Q(x) @ Q(W)ᵀ + b; backward grad_x = grad_out @ Q(W), grad_W = grad_outᵀ @ Q(x), with Q(x) the
    quantized activations saved in forward (not x), as the reference does; straight-through otherwise."""

    @staticmethod
    def forward(ctx, x, weight, bias, quant: QuantConfig, stochastic: bool):
        qx = _quantize(x, "activation", quant, stochastic)
        qw = _weight(weight, quant, stochastic)
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # (the planner's trace)
        if autocast:  # multiply (and save qx) in the autocast dtype, as nn.Linear
            dtype = torch.get_autocast_dtype(x.device.type)
            qx, qw = qx.to(dtype), qw.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        # Round-to-nearest Q(W) is recomputed in backward rather than held: one weight copy less per layer.
        ctx.saves_qw = stochastic and quant.weights == "int4"
        ctx.save_for_backward(qx, qw if ctx.saves_qw else weight)
        ctx.quant = quant
        return F.linear(qx, qw, bias)

    @staticmethod
    def backward(ctx, grad_out):
        qx, saved = ctx.saved_tensors
        qw = saved if ctx.saves_qw else _weight(saved, ctx.quant, False).to(qx.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = linear_grads(grad_out, qx, qw, need_x, need_w, need_b)
        return grad_x, grad_w, grad_b, None, None


class FakeQuantLinear(nn.Linear):
    """An nn.Linear computing with fake-quantized activations and weights; stochastic rounding (if configured)
    in training mode only, so evaluation is deterministic."""

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.quant = quant

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: QuantConfig) -> FakeQuantLinear:
        """A FakeQuantLinear sharing `linear`'s parameters (no copy; built on meta, so nothing is allocated)."""
        layer = cls(linear.in_features, linear.out_features, quant, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FakeQuantLinearFunction.apply(x, self.weight, self.bias, self.quant,
                                             self.training and self.quant.stochastic_rounding)

    def extra_repr(self) -> str:
        q = self.quant
        return (f"{super().extra_repr()}, weights={q.weights}, activations={q.activations}, "
                f"group_size={q.group_size}")


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear but the output head (embeddings and norms are not linears)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def target_linears(model: nn.Module, quant: QuantConfig) -> dict[str, nn.Linear]:
    """The linears `quant` replaces; ConfigError if a pattern matches none, or the group size does not divide the
    hidden size (the input of every projection but the down projection, whose input may take row-crossing
    groups: lowmem.model.quant.fake). Works on a meta model."""
    linears = quantizable_linears(model)
    for pattern in quant.target_modules:
        if not any(pattern in name for name in linears):
            kinds = sorted({re.sub(r"\.\d+\.", ".*.", name) for name in linears})
            leaves = {name.rsplit(".", 1)[-1] for name in linears}
            raise ConfigError(f"model.quant.target_modules: '{pattern}' matches no linear layer of the model"
                              f"{closest(pattern, leaves)}; its linears are {kinds} (the output head is never "
                              "quantized)")
    targets = {name: m for name, m in linears.items() if any(p in name for p in quant.target_modules)}
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or min(m.in_features for m in targets.values())
    if hidden % quant.group_size:
        fitting = [d for d in range(1, hidden + 1) if hidden % d == 0 and d <= 1024]
        raise ConfigError(f"model.quant.group_size: {quant.group_size} does not divide the hidden size {hidden}; "
                          f"group sizes that do: {fitting}")
    return targets


def apply_fake_quant(model: nn.Module, quant: QuantConfig | None) -> list[str]:
    """Replace the target linears of `model` in place by FakeQuantLinears sharing their parameters; the names
    replaced. No change at all when `quant` is None or quantizes neither weights nor activations."""
    if not quant_enabled(quant):
        return []
    targets = target_linears(model, quant)
    for name, linear in targets.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeQuantLinear.from_linear(linear, quant))
    return list(targets)
