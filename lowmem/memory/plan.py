"""A run's memory by part (weights, gradients, optimizer state, activations), per rank under ZeRO."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class MemoryPlan:
    parameters: int
    gradients: int
    optimizer_parts: dict[str, int]
    activations: int
    world_size: int = 1
    zero_stage: int = 0
    largest_weight_state: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def optimizer(self) -> int:
        return sum(self.optimizer_parts.values())

    def per_rank(self) -> dict[str, int]:
        """Each row on one rank under the ZeRO stage (stage 0: every rank holds everything)."""
        n, stage = self.world_size, self.zero_stage
        optimizer = self.optimizer if stage < 1 else math.ceil(self.optimizer / n) + self.largest_weight_state
        return {
            "parameters": self.parameters if stage < 3 else math.ceil(self.parameters / n),
            "gradients": self.gradients if stage < 2 else math.ceil(self.gradients / n),
            "optimizer state": min(optimizer, self.optimizer),
            "activations": self.activations,
        }

    def total(self) -> int:
        return sum(self.per_rank().values())

    def as_dict(self) -> dict:
        return {"per_rank": self.per_rank(), "total_per_rank": self.total(), "optimizer_parts": self.optimizer_parts,
                "world_size": self.world_size, "zero_stage": self.zero_stage, "notes": self.notes}
