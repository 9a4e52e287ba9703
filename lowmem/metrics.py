"""Run metrics: one JSON object per line in `metrics.jsonl`, and TensorBoard scalars when asked."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None,
                 enabled: bool = True):
        """A fresh run (`resume_step` None) starts an empty log; a resumed one keeps records up to its step.
        Disabled (ranks other than 0), it writes nothing."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # drop events a crashed run wrote later
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        """Drop records a crashed run wrote past the checkpoint it resumes from, so steps stay unique."""
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record; a NaN or infinite number is written as null, so every line is strict JSON."""
        if not self.enabled:
            return
        record = {key: strict_json(value) for key, value in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
