import json

import pytest

from lowmem.metrics import MetricsLog, read_metrics


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
