"""What a run prints while it trains (lowmem.train.progress): the header, a plain line per log_every and per eval
when no bar is drawn, the end line, and the logged train loss as the window's mean."""
import math

import pytest

from lowmem.train import progress
from lowmem.train.metrics import read_metrics
from lowmem.train.trainer import Trainer


def test_the_logged_loss_is_the_window_mean_and_the_last_batch_is_kept(tmp_path, corpus, make_config):
    every = make_config(tmp_path / "every", corpus, "checkpoint.every=0")
    Trainer(every).fit()
    per_step = {r["step"]: r["loss"] for r in read_metrics(every.run_dir) if "loss" in r}
    windowed = make_config(tmp_path / "window", corpus, "checkpoint.every=0", "train.log_every=4")
    Trainer(windowed).fit()
    rows = {r["step"]: r for r in read_metrics(windowed.run_dir) if "loss" in r}
    assert sorted(rows) == [4, 6, 8, 12]  # every 4th, and the evals at 6 and 12
    assert rows[4]["loss"] == pytest.approx(sum(per_step[s] for s in (1, 2, 3, 4)) / 4, rel=1e-6)
    assert rows[6]["loss"] == pytest.approx((per_step[5] + per_step[6]) / 2, rel=1e-6)
    assert all(rows[s]["loss_last"] == pytest.approx(per_step[s], rel=1e-6) for s in rows)


def test_a_batch_job_gets_plain_lines_instead_of_a_bar(tmp_path, corpus, make_config, capsys):
    config = make_config(tmp_path, corpus, "checkpoint.every=0", "train.log_every=6", "log.progress=true")
    Trainer(config).fit()  # under pytest stderr is no terminal: no bar
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("model: llama_9m, ") and "trainable (100.0%)" in lines[0]
    assert lines[1].startswith("data: 128 tokens per update, 12 updates = 1,536 tokens; precision fp32")
    assert lines[2].startswith("optimizer: adamw, lr 0.01, weight decay 0.0, moments fp32")
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["6/12", "12/12"] and "tok/s" in steps[0] and "left" in steps[0]
    assert sum(line.startswith("eval at step ") for line in lines) == 2
    assert lines[-1].startswith("finished at step 12: ") and "eval perplexity" in lines[-1]
    assert "\r" not in err  # no progress frames in the log


def test_the_bar_is_drawn_only_on_a_terminal_on_rank_zero(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress.draws_bar(True, True)
    assert not progress.draws_bar(True, False) and not progress.draws_bar(False, True)


def test_remaining_time_follows_the_updates_taken():
    clock = progress.RunClock(start_step=10, total_steps=30)
    clock.started -= 20.0  # 20 s for the first 10 updates of this process
    assert clock.remaining(20) == pytest.approx(20.0, rel=0.01)
    assert math.isnan(clock.remaining(10))
    assert progress.effective_lr(type("O", (), {"lr": 0.01, "projects": True, "scale": 0.25})()) == (
        ", target weights move at 0.01 x 0.25 = 0.0025")
