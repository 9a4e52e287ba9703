"""The tiny CPU fp32 run's train losses, step by step, against a recorded curve (tests/golden/tiny_curves.json).

The recorded curve is what a refactor must keep: a change may alter it only for a stated reason (a fix of the
maths, a new default), said in its commit together with the re-recording. Re-record from this checkout with

    python tests/train/test_golden_curve.py --record

which runs each case twice in this process, refuses to write unless both runs agree exactly, and rewrites the
file. pytest only compares; it never records.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # as a script: this checkout's lowmem and the tests' helpers, as pytest imports them
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import write_corpus, write_tiny_config  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_curves.json"
RTOL = 1e-5
# conftest's tiny run (12 updates, checkpoints and evals on the way), with each optimizer; galore refreshes
# its basis every 4 updates so the curve covers refreshes.
CASES = {
    "adamw": [],
    "galore_rank4": ["optimizer.name=galore", "optimizer.rank=4", "optimizer.update_gap=4"],
}


def train_losses(tmp: Path, corpus: Path, overrides: list[str]) -> list[float]:
    """The per-step train losses of the tiny run from its metrics.jsonl, run through the command line."""
    from lowmem.cli import main
    from lowmem.train.metrics import read_metrics

    assert main([str(write_tiny_config(tmp, corpus)), "train.device=cpu", "train.precision=fp32", *overrides]) == 0
    rows = [row for row in read_metrics(tmp / "runs" / "t") if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
    return [row["loss"] for row in rows]


def recorded() -> dict[str, list[float]]:
    return json.loads(GOLDEN.read_text())["curves"]


@pytest.mark.parametrize("case", list(CASES))
def test_train_losses_follow_the_recorded_curve(tmp_path, corpus, case):
    expected = recorded()[case]
    losses = train_losses(tmp_path, corpus, CASES[case])
    assert len(losses) == len(expected) == 12
    far = [(step, got, want) for step, (got, want) in enumerate(zip(losses, expected), start=1)
           if not math.isclose(got, want, rel_tol=RTOL, abs_tol=0.0)]
    assert not far, (f"{case}: train losses left the recorded curve at (step, now, recorded) {far}; a refactor must "
                     f"keep it, or re-record with a stated reason (python tests/train/test_golden_curve.py --record)")


def record() -> None:
    curves = {}
    with tempfile.TemporaryDirectory(prefix="lowmem-golden-") as tmp:
        (Path(tmp) / "corpus").mkdir()
        corpus = write_corpus(Path(tmp) / "corpus")
        for case, overrides in CASES.items():
            first, second = (train_losses(Path(tmp) / f"{case}-{run}", corpus, overrides) for run in (1, 2))
            if first != second:
                raise SystemExit(f"{case}: two runs differ, nothing recorded:\n{first}\n{second}")
            curves[case] = first
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "about": "train loss per step of tests/conftest.py's tiny run (CPU, fp32, 12 updates) for each case of "
                 "tests/train/test_golden_curve.py; re-record only with a stated reason "
                 "(python tests/train/test_golden_curve.py --record)",
        "curves": curves}, indent=1) + "\n")
    print(f"recorded {', '.join(curves)} in {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/train/test_golden_curve.py --record  (rewrites tests/golden/tiny_curves.json)")
    record()
