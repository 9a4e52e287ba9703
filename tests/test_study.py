import csv

import pytest
import yaml

from lowmem.config import ConfigError
from lowmem.study import load_study, run_study


def write_study(make_config, tmp_path, corpus_dir, runs):
    make_config(tmp_path, corpus_dir)  # writes tmp_path/config.yaml, the base of the study
    study = {"base": "config.yaml", "name": "s", "out_dir": str(tmp_path / "studies"),
             "overrides": {"train": {"max_steps": 4, "eval_every": 0}, "checkpoint": {"every": 0}},
             "runs": runs}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_writes_table_and_plot(tmp_path, corpus, make_config):
    path = write_study(make_config, tmp_path, corpus, {"adamw_a": {"optimizer": {"name": "adamw", "lr": 0.01}},
                                          "adamw_b": {"optimizer": {"name": "adamw", "lr": 0.001}}})
    rows = run_study(path)
    out = tmp_path / "studies" / "s"
    assert [r["run"] for r in rows] == ["adamw_a", "adamw_b"]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in table] == ["adamw_a", "adamw_b"]
    assert float(table[0]["eval_ppl"]) > 1 and float(table[0]["optimizer_state_MiB"]) > 0
    assert table[0]["optimizer_state_MiB"] == table[1]["optimizer_state_MiB"]  # same model, same AdamW state
    assert "| adamw_a |" in (out / "results.md").read_text()
    assert (out / "memory_vs_ppl.png").stat().st_size > 1000


def test_every_run_is_validated_before_any_starts(tmp_path, corpus, make_config):
    path = write_study(make_config, tmp_path, corpus, {"ok": {"optimizer": {"name": "adamw"}},
                                          "bad": {"optimizer": {"name": "adamw", "lrr": 0.1}}})
    with pytest.raises(ConfigError, match="study.runs.bad: unknown key 'optimizer.lrr'"):
        load_study(path)
    assert not (tmp_path / "studies").exists()


def test_a_diverging_run_is_recorded_and_the_study_goes_on(tmp_path, corpus, make_config, capsys):
    path = write_study(make_config, tmp_path, corpus, {"blows_up": {"optimizer": {"name": "adamw", "lr": 1e10}},
                                                       "fine": {"optimizer": {"name": "adamw", "lr": 0.01}}})
    rows = run_study(path)
    out = tmp_path / "studies" / "s"
    assert "blows_up diverged: loss became nan at step 2" in capsys.readouterr().err
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["status"], r["step"]) for r in table] == [("blows_up", "diverged", "2"), ("fine", "ok", "4")]
    assert table[0]["cause"] == "loss became nan" and table[0]["eval_ppl"] == "" and table[0]["eval_loss"] == ""
    assert float(table[1]["eval_ppl"]) > 1 and table[1]["cause"] == ""
    assert rows[0]["eval_ppl"] is None
    markdown = (out / "results.md").read_text()
    assert "| blows_up | adamw | 10000000000.0 | diverged | 2 |  |  |" in markdown
    assert (out / "memory_vs_ppl.png").stat().st_size > 1000
