"""MicroAdam (Modoranu et al., NeurIPS 2024) as a core: no dense moments at all. Each update keeps only the
top-k entries of the error-corrected gradient in a ring buffer of the last `window` updates, and the Adam
direction is recomputed from that window every update. The error feedback (what top-k left out) is kept in
4 bits.

Per update t of a core gradient g, flattened to d elements and cut into blocks of `topk_block`:

    a = g + Q^-1(e)                              e: 4-bit error feedback, per-bucket min/max (bf16)
    per block b: the k_b = ceil(len(b) * k_init) entries of largest |a| -> (int16 block-local indices,
                 values) written to ring row (t - 1) mod window
    a[those entries] = 0;  e = Q(a)              4-bit asymmetric: u = (max - min) / 15,
                                                 q = floor((x - min) / u + 1/2), two codes per byte
    m~ = sum over the min(t, window) rows r of beta1^age_r * V_r  (scattered by index; age_r = (t-1-r) mod window)
    v~ = sum of beta2^age_r * V_r^2
    D  = c1 m~ / (sqrt(c2 v~) + eps),  c1 = (1-b1)/(1-b1^t),  c2 = (1-b2)/(1-b2^t)

Coordinates that were in no top-k set of the window get D = 0. The weight update and decoupled weight decay
follow the optimizer's convention (the preset: torch's, decay before the step, as MicroAdam does). The
reference implementation is CUDA/bf16-only; this one runs on fp32 or bf16 weights on any device. Window
values are bf16 as in the reference (fp32 with state_dtype fp32); the EF buffer is always 4-bit.

`ef_alpha` > 0 is the reference's `alpha` for pretraining (its "PRETRAINING" branch): a fraction of the error
feedback joins the update, which is then dense, and leaves the feedback:

    D = D + alpha Q^-1(e);  e = Q((1 - alpha) Q^-1(e))     (min/max recomputed)

alpha = 0 (the reference's default, for fine-tuning) is the sparse update above. The reference's alpha = -2
(densify with the quantization error itself) is not implemented.
"""
from __future__ import annotations

import math

import torch

from lowmem.optim.parts.cores import Core, CoreStep, register_core

EF_LEVELS = 15  # 4-bit codes 0..15
INDEX_LIMIT = 32768  # int16 block-local indices


def topk_layout(numel: int, block: int, k_init: float) -> tuple[int, int, int]:
    """(full blocks, k per full block, k of the last partial block) for a tensor of `numel` elements."""
    full = numel // block
    rest = numel - full * block
    return full, math.ceil(block * k_init), math.ceil(rest * k_init) if rest else 0


def window_width(numel: int, block: int, k_init: float) -> int:
    """Entries kept per update: the sum of every block's k."""
    full, k_full, k_last = topk_layout(numel, block, k_init)
    return full * k_full + k_last


def blockwise_topk(values: torch.Tensor, block: int, k_init: float) -> torch.Tensor:
    """Global (int64) indices of the k largest |values| in each block of a flat tensor, block by block."""
    numel = values.numel()
    full, k_full, k_last = topk_layout(numel, block, k_init)
    found = []
    if full:
        local = values[: full * block].view(full, block).abs().topk(k_full, dim=1, sorted=False).indices
        found.append((local + torch.arange(full, device=values.device)[:, None] * block).reshape(-1))
    if k_last:
        local = values[full * block:].abs().topk(k_last, sorted=False).indices
        found.append(local + full * block)
    return torch.cat(found)


def block_starts(numel: int, block: int, k_init: float, device: torch.device) -> torch.Tensor:
    """The first global index of the block each kept entry belongs to (int64, one per window column)."""
    full, k_full, k_last = topk_layout(numel, block, k_init)
    starts = torch.arange(full, device=device).repeat_interleave(k_full) * block
    return torch.cat([starts, torch.full((k_last,), full * block, device=device, dtype=torch.long)])


def ef_quantize(values: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit asymmetric codes (packed, two per byte) with per-bucket bf16 min and max."""
    numel = values.numel()
    pad = (-numel) % bucket
    padded = torch.nn.functional.pad(values, (0, pad), value=float(values[-1])) if pad else values
    buckets = padded.view(-1, bucket)
    low = buckets.amin(dim=1).to(torch.bfloat16)
    high = buckets.amax(dim=1).to(torch.bfloat16)
    unit = ((high.float() - low.float()) / EF_LEVELS).clamp_(min=1e-30)[:, None]
    codes = torch.floor((buckets - low.float()[:, None]) / unit + 0.5).clamp_(0, EF_LEVELS).to(torch.uint8)
    codes = codes.reshape(-1)[:numel]
    if numel % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), low, high


def ef_dequantize(packed: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bucket: int, numel: int) -> torch.Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].float()
    unit = ((high.float() - low.float()) / EF_LEVELS).repeat_interleave(bucket)[:numel]
    return low.float().repeat_interleave(bucket)[:numel] + codes * unit


def microadam_math(indices: torch.Tensor, values: torch.Tensor, ages: torch.Tensor, step: int, numel: int,
                   beta1: float, beta2: float, eps: float) -> torch.Tensor:
    """The Adam direction recomputed from a window: `indices` (rows x k, global int64) and fp32 `values` of the
    valid rows, `ages` (rows,) how many updates ago each row was written. Returns a fresh fp32 (numel,)."""
    first = torch.zeros(numel, device=values.device)
    second = torch.zeros(numel, device=values.device)
    flat_index = indices.reshape(-1)
    first.index_add_(0, flat_index, (values * beta1 ** ages[:, None].float()).reshape(-1))
    second.index_add_(0, flat_index, (values * values * beta2 ** ages[:, None].float()).reshape(-1))
    c1, c2 = window_corrections(step, beta1, beta2)
    return first.mul_(c1).div_(second.mul_(c2).sqrt_().add_(eps))


def window_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(c1, c2) = ((1-b1)/(1-b1^t), (1-b2)/(1-b2^t)): the window sums' bias corrections."""
    return (1.0 - beta1) / (1.0 - beta1 ** step), (1.0 - beta2) / (1.0 - beta2 ** step)


@register_core("microadam")
class MicroAdamCore(Core):
    name = "microadam"
    moment_keys = ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max")
    counter_keys = ("micro_step", "window_row")

    @property
    def value_dtype(self) -> torch.dtype:
        """bf16 window values as in the reference (state_dtype auto or bf16), fp32 when asked for."""
        return torch.float32 if self.options.state_dtype == "fp32" else torch.bfloat16

    def reset(self, state):
        for key in self.moment_keys + self.counter_keys:
            state.pop(key, None)

    def reset_moments(self, state, shape):
        """Empty the window (its rows read as zeros) and the error feedback, keeping the count."""
        if "window_values" in state:
            state["window_values"].zero_()
            state["window_indices"].zero_()
            state["ef_codes"].zero_()
            state["ef_min"].zero_()
            state["ef_max"].zero_()

    def step(self, grad, state, group, ctx):
        o = self.options
        numel = grad.numel()
        width = window_width(numel, o.topk_block, o.k_init)
        if "micro_step" not in state:
            state["micro_step"] = 0
            state["window_row"] = 0
            state["window_indices"] = torch.zeros(o.window, width, dtype=torch.int16, device=grad.device)
            state["window_values"] = torch.zeros(o.window, width, dtype=self.value_dtype, device=grad.device)
            state["ef_codes"], state["ef_min"], state["ef_max"] = ef_quantize(torch.zeros(numel, device=grad.device),
                                                                              o.ef_block)
        beta1, beta2 = group["betas"]
        state["micro_step"] += 1
        step = state["micro_step"]
        if ctx.fused:  # the same update with its dense passes fused
            from lowmem.kernels import microadam as fused  # lazily: kernel modules import Triton

            corrected = fused.ef_correct(grad, state["ef_codes"], state["ef_min"], state["ef_max"], o.ef_block,
                                         EF_LEVELS)
        else:
            corrected = grad.reshape(-1) + ef_dequantize(state["ef_codes"], state["ef_min"], state["ef_max"],
                                                         o.ef_block, numel)
        chosen = blockwise_topk(corrected, o.topk_block, o.k_init)
        starts = block_starts(numel, o.topk_block, o.k_init, grad.device)
        row = state["window_row"]
        state["window_indices"][row] = (chosen - starts).to(torch.int16)
        state["window_values"][row] = corrected[chosen].to(self.value_dtype)
        state["window_row"] = (row + 1) % o.window
        corrected[chosen] = 0.0
        if ctx.fused and o.ef_block % 2 == 0:  # the kernel's code pairs never straddle two buckets
            fused.ef_quantize_into(corrected, state["ef_codes"], state["ef_min"], state["ef_max"], o.ef_block,
                                   EF_LEVELS)
        else:
            state["ef_codes"], state["ef_min"], state["ef_max"] = ef_quantize(corrected, o.ef_block)

        rows = min(step, o.window)
        ages = (step - 1 - torch.arange(rows, device=grad.device)) % o.window
        if ctx.fused:
            direction = fused.window_direction(state["window_indices"], state["window_values"], rows,
                                               beta1 ** ages.float(), beta2 ** ages.float(), numel, o.topk_block,
                                               *topk_layout(numel, o.topk_block, o.k_init),
                                               *window_corrections(step, beta1, beta2), group["eps"])
        else:
            indices = state["window_indices"][:rows].long() + starts
            direction = microadam_math(indices, state["window_values"][:rows].float(), ages, step, numel,
                                       beta1, beta2, group["eps"])
        return CoreStep(self._densified(direction, state, numel).view(grad.shape))

    def _densified(self, direction: torch.Tensor, state: dict, numel: int) -> torch.Tensor:
        """With ef_alpha > 0, move that fraction of the error feedback into the (flat) direction."""
        alpha, bucket = self.options.ef_alpha, self.options.ef_block
        if alpha == 0:
            return direction
        error = ef_dequantize(state["ef_codes"], state["ef_min"], state["ef_max"], bucket, numel)
        direction = direction.reshape(-1).add_(error, alpha=alpha)
        state["ef_codes"], state["ef_min"], state["ef_max"] = ef_quantize(error.mul_(1.0 - alpha), bucket)
        return direction

    def state_parts(self, shape):
        o = self.options
        numel = math.prod(shape)
        width = window_width(numel, o.topk_block, o.k_init)
        value_bytes = torch.empty((), dtype=self.value_dtype).element_size()
        buckets = -(-numel // o.ef_block)
        return {"window": o.window * width * (2 + value_bytes),  # int16 indices and values
                "error feedback": (numel + 1) // 2 + 2 * 2 * buckets}  # 4-bit codes, bf16 min and max
