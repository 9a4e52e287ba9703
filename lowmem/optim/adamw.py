"""The dense baselines every low-memory method is measured against: torch AdamW (`adamw`) and
bitsandbytes' 8-bit AdamW (`bnb_adamw8bit`), each stating its own state size as a formula.

`adamw` with a `state_dtype` other than the one torch keeps (the parameter's dtype) is the pipeline's dense
AdamW with that storage (`optimizer: {name: adamw, state_dtype: int8}` is `adamw8bit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowmem.errors import ConfigError, closest
from lowmem.optim.options import OptimizerOptions
from lowmem.optim.registry import register_optimizer
from lowmem.optim.state.storage import STATE_DTYPES, resolve_state_dtype

TORCH_STEP_BYTES = 4  # torch AdamW keeps `step` as an fp32 scalar tensor per parameter
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_BYTES = 2 * 256 * 4  # the two shared fp32 code tables


class StateFormula:
    """Mixin for optimizers that keep a fixed state per parameter: `param_state_bytes(p)` per weight plus
    `shared_state_bytes(params)` held once, for the weights holding state now or for every trainable one."""

    def param_state_bytes(self, p: torch.Tensor) -> int:
        raise NotImplementedError

    def predicted_state_parts(self) -> dict[str, int]:
        return {"moments": self.predicted_state_bytes()}

    def shared_state_bytes(self, params: list[torch.Tensor]) -> int:
        return 0

    def _bytes(self, params: list[torch.Tensor]) -> int:
        return sum(self.param_state_bytes(p) for p in params) + (self.shared_state_bytes(params) if params else 0)

    def expected_state_bytes(self) -> int:
        return self._bytes([p for g in self.param_groups for p in g["params"] if self.state.get(p)])

    def predicted_state_bytes(self) -> int:
        return self._bytes([p for g in self.param_groups for p in g["params"] if p.requires_grad])


class TorchAdamW(StateFormula, torch.optim.AdamW):
    """torch.optim.AdamW: two moments in the parameter's dtype and an fp32 step tensor per parameter."""

    def param_state_bytes(self, p):
        return 2 * p.numel() * p.element_size() + TORCH_STEP_BYTES


@dataclass
class AdamWOptions(OptimizerOptions):
    # auto: torch AdamW (moments in the parameters' dtype); fp32 | bf16 | int8 | int4 other than that: the
    # pipeline's dense AdamW with that storage
    state_dtype: str = "auto"

    def validate(self) -> None:
        super().validate()
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(f"optimizer.state_dtype: unknown value '{self.state_dtype}'"
                              f"{closest(self.state_dtype, STATE_DTYPES)}; choose from {list(STATE_DTYPES)}")


@register_optimizer("adamw", AdamWOptions)
def build_adamw(groups: list[dict], options: AdamWOptions) -> torch.optim.Optimizer:
    dtypes = {p.dtype for g in groups for p in g["params"] if p.requires_grad}
    torch_keeps = resolve_state_dtype("auto", torch.bfloat16 if dtypes == {torch.bfloat16} else torch.float32)
    if getattr(options, "state_dtype", "auto") in ("auto", torch_keeps) and len(dtypes) <= 1:
        return TorchAdamW(groups, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                          weight_decay=options.weight_decay)
    from lowmem.optim.pipeline import PipelineOptimizer
    from lowmem.optim.presets import DenseOptions

    fields = {k: v for k, v in options.__dict__.items() if k in DenseOptions.__dataclass_fields__}
    return PipelineOptimizer(groups, DenseOptions(**fields))


def _bnb_adamw8bit_class() -> type:
    from lowmem.library_output import import_bitsandbytes

    bnb = import_bitsandbytes()

    class BnbAdamW8bit(StateFormula, bnb.optim.AdamW8bit):
        """bitsandbytes' AdamW8bit: uint8 moments with an fp32 absmax per 256 elements (fp32 moments under 4096
        elements), plus its two shared code tables."""

        def param_state_bytes(self, p):
            if p.numel() < BNB_MIN_8BIT_SIZE:
                return 2 * 4 * p.numel()
            return 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / BNB_BLOCK)

        def shared_state_bytes(self, params):
            return BNB_QMAP_BYTES if any(p.numel() >= BNB_MIN_8BIT_SIZE for p in params) else 0

    return BnbAdamW8bit


@register_optimizer("bnb_adamw8bit", OptimizerOptions)
def build_bnb_adamw8bit(groups: list[dict], options: OptimizerOptions) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")} for g in groups]
    # keyword arguments only: bnb 0.50 changed the positional signature of its optimizer base class
    return _bnb_adamw8bit_class()(groups, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                        weight_decay=options.weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)
