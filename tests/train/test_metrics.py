import json
import os

import pytest

from lowmem.errors import EnvironmentProblem
from lowmem.train.metrics import MetricsLog, read_metrics


def strict(line: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_every_line_is_strict_json_with_non_finite_numbers_as_null(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": float("nan"), "eval_ppl": float("inf"), "lr": 0.5,
             "nested": {"values": [1.0, float("-inf")]}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(lines[0]) == {"step": 1, "loss": None, "eval_ppl": None, "lr": 0.5, "nested": {"values": [1.0, None]}}
    assert read_metrics(tmp_path) == [strict(lines[0])]
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict(json.dumps({"loss": float("nan")}))  # what a plain json.dumps would have written


def test_a_resume_drops_a_torn_last_line_and_replaces_the_log_whole(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    before = path.read_text()

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        MetricsLog(tmp_path, resume_step=2)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    MetricsLog(tmp_path, resume_step=2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n'


def test_a_damaged_line_before_others_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(EnvironmentProblem, match=r"line 2 of '.*metrics.jsonl' is not JSON"):
        MetricsLog(tmp_path, resume_step=2)
