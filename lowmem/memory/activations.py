"""Activation memory: the bytes of the tensors a forward pass saves for its backward, counted exactly.

`saved_activation_bytes` runs one forward with a saved-tensors hook that records every saved tensor's storage
once (views share storage; the model's own weights are excluded, they are counted as parameters). On a real
model that is the measurement; on a meta-device model (no storage, no compute: seconds for llama_7b) it is
the prediction the memory planner prints, with two adjustments so the meta trace saves what real kernels save:

- attention: on the meta device `scaled_dot_product_attention` falls back to its math path, which saves the
  full attention matrix; CPU and CUDA fused kernels (flash, memory-efficient) save q, k, v, the output and a
  row log-sum-exp instead, so the trace uses a stand-in that saves exactly those. With attention dropout the
  CPU kernel takes the math path (probabilities, dropout mask and dropped probabilities saved); the stand-in
  does the same, an upper bound for CUDA, whose flash kernel keeps dropout fused;
- bf16 autocast: the meta device has no autocast, so the trace casts the inputs of the matrix products
  (linear, addmm, matmul, bmm, baddbmm, as autocast's lower-precision list) to bf16, whose copies are what
  those products save, leaving norms, softmax and the loss in their own precision.

With activation checkpointing the layers keep only their inputs; one layer's activations exist again while
it is recomputed in backward, so the figure is the layer inputs + the largest layer + everything outside
the layers (embeddings, final norm, head, loss).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class ActivationCount:
    total: int  # bytes saved for backward (checkpointing applied)
    layers: list[int]  # bytes saved inside each decoder layer (no checkpointing)
    outside: int  # bytes saved outside the layers
    layer_inputs: int  # bytes of the decoder layers' inputs (what checkpointing keeps)


class _AttentionStandIn(torch.autograd.Function):
    """Saves what attention kernels save: q, k, v, output and a log-sum-exp per query row (fused kernels), or,
    with dropout, the probabilities, the mask and the dropped probabilities as well (the math path)."""

    @staticmethod
    def forward(ctx, query, key, value, output, dropout):
        saved = [query, key, value, output]
        if dropout:
            scores = query.shape[:-1] + key.shape[-2:-1]
            saved += [torch.empty(scores, dtype=torch.float32, device=query.device),  # softmax runs in fp32
                      torch.empty(scores, dtype=torch.bool, device=query.device),
                      torch.empty(scores, dtype=torch.float32, device=query.device)]
        else:
            saved.append(torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device))
        ctx.save_for_backward(*saved)
        return output

    @staticmethod
    def backward(ctx, grad):  # never run: the trace is forward-only
        raise NotImplementedError


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM (the ModuleList with the most parameters)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


class _Bf16Products(torch.overrides.TorchFunctionMode):
    """Autocast's effect on saved tensors, for the meta device: matrix products run on bf16 copies."""

    PRODUCTS = {torch.nn.functional.linear, torch.addmm, torch.mm, torch.matmul, torch.bmm, torch.baddbmm,
                torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            args = tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_kernels(autocast_bf16: bool) -> Iterator[None]:
    """Patch attention (and the products, under autocast) so a meta trace saves what real kernels save."""
    functional = torch.nn.functional
    real_sdpa = functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, dropout_p: float = 0.0, **kwargs):
        with torch.no_grad():
            output = torch.empty(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)
        return _AttentionStandIn.apply(query, key, value, output, dropout_p > 0)

    functional.scaled_dot_product_attention = sdpa
    try:
        with _Bf16Products() if autocast_bf16 else contextlib.nullcontext():
            yield
    finally:
        functional.scaled_dot_product_attention = real_sdpa


def saved_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, autocast_bf16: bool = False,
                           checkpointing: bool = False) -> ActivationCount:
    """Bytes saved for backward by one forward of `batch_size` x `seq_len` tokens with labels (the training
    step's forward). Works on a real model (measured) or a meta-device model (predicted)."""
    device = next(model.parameters()).device
    meta = device.type == "meta"
    params = {p.untyped_storage()._cdata if meta else p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = _decoder_layers(model)
    per_layer = [0] * len(layers)
    current = {"layer": -1}
    seen: set = set()
    totals = {"outside": 0, "inputs": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata if meta else storage.data_ptr()
        if key in params or key in seen:
            return tensor
        seen.add(key)
        if current["layer"] >= 0:
            per_layer[current["layer"]] += storage.nbytes()
        else:
            totals["outside"] += storage.nbytes()
        return tensor

    def enter(index: int):
        def hook(module, args, kwargs):
            current["layer"] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            totals["inputs"] += hidden.numel() * hidden.element_size()
        return hook

    def leave(module, args, kwargs, output):
        current["layer"] = -1

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave, with_kwargs=True) for layer in layers]
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 and not meta
                else contextlib.nullcontext())
    kernels = _meta_kernels(autocast_bf16) if meta else contextlib.nullcontext()
    try:
        with kernels, autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
    finally:
        for handle in handles:
            handle.remove()
    if checkpointing and layers:
        total = totals["inputs"] + max(per_layer) + totals["outside"]
    else:
        total = sum(per_layer) + totals["outside"]
    return ActivationCount(total, per_layer, totals["outside"], totals["inputs"])
