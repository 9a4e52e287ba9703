"""Run metrics: one JSON object per line in `metrics.jsonl`, and TensorBoard scalars when asked."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lowmem.errors import EnvironmentProblem


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
        """Drop records a crashed run wrote past the checkpoint it resumes from, so steps stay unique, and a
        last line torn by a kill. The file is replaced whole (written beside it, synced, renamed), so a crash
        here leaves the old log or the new one, never a part."""
        kept = [line for line, record in _read_lines(self.path) if record.get("step", 0) <= step]
        temp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with temp.open("w") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)  # a write that failed (a full disk) leaves the old log alone

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


def _read_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a metrics.jsonl with its record; a last line that is not whole JSON (torn by a kill
    mid-write) is left out, one before others is damage a run cannot repair (EnvironmentProblem naming it)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append((line, record))
        except ValueError:
            if number < len(lines):
                raise EnvironmentProblem(f"line {number} of '{path}' is not JSON; move the file aside (or remove "
                                         f"the line) to go on") from None
    return records


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [record for _, record in _read_lines(Path(run_dir) / "metrics.jsonl")]
