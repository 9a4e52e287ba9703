"""The `distributed:` section: the backend, the ZeRO stage, the gradient sync and the collective timeout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lowmem.config.schema import require


@dataclass
class DistributedConfig:
    # auto: none on one process; under a launcher (torchrun, deepspeed, accelerate launch) ddp, or deepspeed
    # when accelerate was configured for it
    backend: Literal["auto", "none", "ddp", "deepspeed"] = "auto"
    zero_stage: int = 2  # DeepSpeed: 0, 1 or 2 for every optimizer; 3 for torch AdamW (adamw) only
    gradient_sync: Literal["full", "projected"] = "full"  # ddp: all-reduce G, or R = P^T G (lowmem.distributed)
    # a DeepSpeed JSON for any other setting (offload, buckets, ...); what it shares with this config must agree
    # (lowmem.distributed.deepspeed_settings)
    deepspeed_config: Optional[str] = None
    timeout_s: float = 600.0  # a collective waiting longer ends the run on every rank

    def validate(self) -> None:
        """The section's own checks (against the launcher, the batch and the optimizer: lowmem.train.config)."""
        require(self.zero_stage in (0, 1, 2, 3), f"distributed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.timeout_s > 0, f"distributed.timeout_s: must be positive, got {self.timeout_s}")
        require(self.backend != "none" or self.gradient_sync == "full",
                "distributed.gradient_sync: applies to the ddp backend; distributed.backend is 'none'")
