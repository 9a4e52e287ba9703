import csv
import signal
from pathlib import Path

import pytest
import yaml

from lowmem import study as study_module
from lowmem.errors import ConfigError, TrainingInterrupted
from lowmem.study import expand_grid, load_study, pareto_front, run_study
from lowmem.train.metrics import read_metrics


def write_study(make_config, tmp_path, corpus_dir, runs, **extra):
    make_config(tmp_path, corpus_dir)  # writes tmp_path/config.yaml, the base of the study
    study = {"base": "config.yaml", "name": "s", "out_dir": str(tmp_path / "studies"),
             "overrides": {"train": {"max_steps": 4, "eval_every": 0}, "checkpoint": {"every": 0}},
             "runs": runs, **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_writes_table_and_plots(tmp_path, corpus, make_config):
    path = write_study(make_config, tmp_path, corpus, {"adamw_a": {"optimizer": {"name": "adamw", "lr": 0.01}},
                                                        "galore": {"optimizer": {"name": "galore", "rank": 4}}})
    rows = run_study(path)
    out = tmp_path / "studies" / "s"
    assert [r["run"] for r in rows] == ["adamw_a", "galore"]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in table] == ["adamw_a", "galore"]
    assert all(r["status"] == "ok" for r in table)
    assert float(table[0]["eval_ppl"]) > 1 and float(table[1]["optimizer_state_MiB"]) > 0
    assert float(table[0]["state / base"]) == 1.0  # the AdamW row is the baseline
    assert float(table[1]["state / base"]) == pytest.approx(
        float(table[1]["optimizer_state_MiB"]) / float(table[0]["optimizer_state_MiB"]), abs=1e-3)
    assert float(table[0]["peak_memory_MiB"]) > float(table[0]["params_MiB"]) and float(table[0]["wall_s"]) > 0
    assert "| adamw_a |" in (out / "results.md").read_text() and "Pareto" in (out / "results.md").read_text()
    assert (out / "memory_vs_ppl.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000


def test_every_run_is_validated_before_any_starts(tmp_path, corpus, make_config):
    path = write_study(make_config, tmp_path, corpus, {"ok": {"optimizer": {"name": "adamw"}},
                                                        "bad": {"optimizer": {"name": "adamw", "lrr": 0.1}}})
    with pytest.raises(ConfigError, match="study.runs.bad: unknown key 'optimizer.lrr'"):
        load_study(path)
    assert not (tmp_path / "studies").exists()


def test_grid_expands_every_run_over_the_product():
    runs = {"galore": {"optimizer": {"name": "galore"}},
            "adamw": {"optimizer": {"name": "adamw"}, "grid": {"optimizer.lr": [0.001, 0.01]}}}
    expanded = expand_grid(runs, {"optimizer.state_dtype": ["fp32", "int4"]})
    assert list(expanded) == ["galore-state_dtype=fp32", "galore-state_dtype=int4",
                              "adamw-state_dtype=fp32-lr=0.001", "adamw-state_dtype=fp32-lr=0.01",
                              "adamw-state_dtype=int4-lr=0.001", "adamw-state_dtype=int4-lr=0.01"]
    assert expanded["adamw-state_dtype=int4-lr=0.01"] == {"optimizer": {"name": "adamw", "state_dtype": "int4",
                                                                         "lr": 0.01}}
    assert "grid" not in runs["adamw"] or runs["adamw"]["grid"]  # the study's own mapping is left alone
    with pytest.raises(ConfigError, match="study.grid.optimizer.rank: expected a non-empty list"):
        expand_grid(runs, {"optimizer.rank": 64})


def test_pareto_front_on_a_hand_made_table():
    rows = [{"run": "a", "optimizer_state_MiB": 10, "eval_ppl": 30},   # front: least memory
            {"run": "b", "optimizer_state_MiB": 20, "eval_ppl": 25},   # front
            {"run": "c", "optimizer_state_MiB": 25, "eval_ppl": 28},   # dominated by b
            {"run": "d", "optimizer_state_MiB": 40, "eval_ppl": 20},   # front: lowest perplexity
            {"run": "e", "optimizer_state_MiB": 40, "eval_ppl": 22},   # dominated by d (equal memory)
            {"run": "f", "optimizer_state_MiB": 5, "eval_ppl": None}]  # diverged: not a point
    assert pareto_front(rows) == {"a", "b", "d"}


def test_a_study_interrupted_between_runs_skips_the_finished_ones(tmp_path, corpus, make_config, monkeypatch,
                                                                  capsys):
    path = write_study(make_config, tmp_path, corpus, {"one": {"optimizer": {"name": "adamw"}},
                                                        "two": {"optimizer": {"name": "adamw", "lr": 0.003}}})
    real_run_one, calls = study_module.run_one, []

    def interrupted(name, config):
        calls.append(name)
        if name == "two":
            raise KeyboardInterrupt
        return real_run_one(name, config)

    monkeypatch.setattr(study_module, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_study(path)
    monkeypatch.setattr(study_module, "run_one", lambda name, config: calls.append(name) or real_run_one(name, config))
    rows = run_study(path)
    assert calls == ["one", "two", "two"] and [r["run"] for r in rows] == ["one", "two"]
    assert "[1/2] one: already done, skipped" in capsys.readouterr().out


def test_a_run_interrupted_inside_resumes_from_its_checkpoint(tmp_path, corpus, make_config, monkeypatch):
    from lowmem.train.trainer import Trainer

    runs = {"r": {"optimizer": {"name": "adamw"}, "train": {"max_steps": 6}, "checkpoint": {"every": 2}}}
    path = write_study(make_config, tmp_path, corpus, runs)
    real_fit = Trainer.fit
    started = []

    def fit_then_crash(self, stop_at_step=None):
        started.append(self.step)
        real_fit(self, stop_at_step=5)  # the last checkpoint is at step 4
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", fit_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_study(path)
    monkeypatch.setattr(Trainer, "fit", lambda self, stop_at_step=None: started.append(self.step) or real_fit(self))
    run_study(path)
    assert started == [0, 4]
    _, configs = load_study(path)
    steps = [r["step"] for r in read_metrics(configs["r"].run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


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


def test_tiny_all_runs_every_registered_optimizer():
    from pathlib import Path

    from lowmem.optim import OPTIMIZERS

    _, configs = load_study(Path(__file__).resolve().parent.parent / "configs" / "studies" / "tiny_all.yaml")
    assert {c.optimizer.name for c in configs.values()} == set(OPTIMIZERS)


@pytest.mark.parametrize("stop, status, words", [
    (lambda: KeyboardInterrupt(), 130, "interrupted: SIGINT, stopped at once; run the same command again"),
    (lambda: TrainingInterrupted(signal.SIGTERM, 3, Path("runs/s/one/checkpoints/step_00000003")), 143,
     "interrupted: SIGTERM received: stopped after step 3 and wrote the checkpoint"),
])
def test_ctrl_c_during_a_study_ends_with_one_line_and_128_plus_the_signal(tmp_path, corpus, make_config, monkeypatch,
                                                                          capsys, stop, status, words):
    from lowmem.train.trainer import Trainer

    path = write_study(make_config, tmp_path, corpus, {"one": {"optimizer": {"name": "adamw"}}})

    def fit(self, stop_at_step=None):
        raise stop()

    monkeypatch.setattr(Trainer, "fit", fit)
    assert study_module.main([str(path)]) == status
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(words) and "Traceback" not in err
    assert "run the same command again to continue the study" in err


def test_a_study_file_that_is_not_valid_yaml_or_lacks_its_base_is_a_config_error(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("runs: [\n")
    (tmp_path / "no-base.yaml").write_text("runs: {a: {}}\n")
    assert study_module.main([str(tmp_path / "bad.yaml")]) == 2
    assert study_module.main([str(tmp_path / "no-base.yaml")]) == 2
    bad, no_base = capsys.readouterr().err.strip().splitlines()
    assert bad.startswith("config error: config file") and "bad.yaml' is not valid YAML" in bad
    assert no_base == "config error: study.base: missing; it has no default"
