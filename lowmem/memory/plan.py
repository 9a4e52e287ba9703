"""A run's memory by part (weights, gradients, optimizer state, activations), per rank under ZeRO."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# The rows of a plan and their keys in JSON (predicted and measured sections use the same keys)
ROW_KEYS = {"parameters": "parameters_bytes", "gradients": "gradients_bytes",
            "optimizer state": "optimizer_state_bytes", "activations": "activations_bytes"}
IMBALANCE_PART = "owner imbalance"  # the per-rank part of the state beyond S/N under owner sharding


def bytes_key(name: str) -> str:
    """A part's name as a JSON key: snake_case ending in `_bytes` ('first moment' -> 'first_moment_bytes')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + "_bytes"


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
    # what the figures assume (dtypes, batch, checkpointing, ranks): lowmem.memory.planner fills it
    assumptions: dict = field(default_factory=dict)

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

    def per_rank_parts(self) -> dict[str, int]:
        """The optimizer state of one rank by part: each part's share S/N when ZeRO shards the state, plus the
        owner imbalance (a matrix's state is never split: at most the largest single weight's state more).
        The parts sum to the per-rank optimizer state row."""
        state = self.per_rank()["optimizer state"]
        if state == self.optimizer:
            return dict(self.optimizer_parts)
        shares = {name: math.ceil(size / self.world_size) for name, size in self.optimizer_parts.items()}
        return {**shares, IMBALANCE_PART: state - sum(shares.values())}

    def total(self) -> int:
        return sum(self.per_rank().values())

    def predicted(self) -> dict:
        """The per-rank figures as JSON: every byte count under a key ending in `_bytes`."""
        rows = {ROW_KEYS[name]: value for name, value in self.per_rank().items()}
        return {**rows, "total_bytes": self.total(),
                "optimizer_state_parts": {bytes_key(name): size for name, size in self.per_rank_parts().items()}}
