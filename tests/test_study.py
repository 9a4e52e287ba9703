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
    assert float(table[0]["cpu_s"]) > 0 and [r["seed"] for r in table] == ["3", "3"]  # the base config's seed
    assert table[0]["state_dtype"] == "fp32" and table[1]["rank"] == "4" and table[0]["rank"] == "-"
    markdown = (out / "results.md").read_text()
    assert "| adamw_a (baseline) | adamw | - | fp32 |" in markdown and "Pareto" in markdown
    assert "±" not in markdown.split("\n- ")[0] and "one seed (no std)" in markdown  # one seed: no ±
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
    assert "| blows_up | adamw | - | fp32 |" in markdown and "| diverged (1/1) |" in markdown
    assert "| fine (baseline) |" in markdown  # the first AdamW that finished
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


# ---------------------------------------------------------------------------------------------------------
# Seeds, the compact table, the plots


def final_eval(run_dir):
    """The last eval of a run, read from its own metrics (not from the study's tables)."""
    return [r for r in read_metrics(run_dir) if r.get("eval_loss") is not None][-1]


def test_seeds_run_each_configuration_per_seed_and_report_mean_and_std(tmp_path, corpus, make_config, capsys,
                                                                        monkeypatch):
    import statistics

    from matplotlib import image

    runs = {"adamw": {"optimizer": {"name": "adamw", "lr": 0.01}},
            "galore": {"optimizer": {"name": "galore", "lr": 0.01, "rank": 4}}}
    path = write_study(make_config, tmp_path, corpus, runs, seeds=[0, 1, 2])
    rows = run_study(path)
    out = tmp_path / "studies" / "s"
    names = ["adamw-s0", "galore-s0", "adamw-s1", "galore-s1", "adamw-s2", "galore-s2"]  # seed by seed
    assert [r["run"] for r in rows] == names
    for name in names:  # each run trained at its own seed, written in its run directory's config
        saved = yaml.safe_load((out / name / "config.yaml").read_text())
        assert saved["run"]["seed"] == int(name[-1])
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["config"], r["seed"]) for r in table] == [(n, n[:-3], n[-1]) for n in names]
    assert all(float(r["wall_s"]) > 0 and float(r["cpu_s"]) > 0 for r in table)

    # mean and sample std over the seeds, against numbers computed here from each run's own metrics
    evals = {c: [final_eval(out / f"{c}-s{seed}") for seed in (0, 1, 2)] for c in runs}
    for row in table:
        assert float(row["eval_ppl"]) == pytest.approx(final_eval(out / row["run"])["eval_ppl"], abs=1e-3)
    ppl = {c: [e["eval_ppl"] for e in evals[c]] for c in runs}
    assert len(set(ppl["adamw"])) == 3  # the seeds changed the runs
    summary = {r["config"]: r for r in csv.DictReader((out / "summary.csv").open())}
    for c in runs:
        assert float(summary[c]["eval_ppl"]) == pytest.approx(statistics.mean(ppl[c]), rel=1e-4)
        assert float(summary[c]["eval_ppl_std"]) == pytest.approx(statistics.stdev(ppl[c]), rel=1e-3, abs=2e-3)
        losses = [e["eval_loss"] for e in evals[c]]
        assert float(summary[c]["eval_loss"]) == pytest.approx(statistics.mean(losses), abs=1e-4)
        assert float(summary[c]["eval_loss_std"]) == pytest.approx(statistics.stdev(losses), abs=1e-4)
        assert summary[c]["seeds"] == "0 1 2" and summary[c]["finished"] == "3"

    # the baseline is the mean of AdamW's seeds: one AdamW seed is not 1.0, the mean is
    base = statistics.mean(ppl["adamw"])
    assert float(summary["adamw"]["ppl / base"]) == 1.0
    assert float(summary["galore"]["ppl / base"]) == pytest.approx(statistics.mean(ppl["galore"]) / base, abs=1e-3)
    for row in table:
        assert float(row["ppl / base"]) == pytest.approx(float(row["eval_ppl"]) / base, abs=1e-3)
    assert {float(r["ppl / base"]) for r in table if r["config"] == "adamw"} != {1.0}

    # the compact table: its columns, the peak memory's source, perplexity as mean ± std
    markdown = (out / "results.md").read_text()
    printed = capsys.readouterr()
    assert markdown in printed.out and f"study s wrote {out.resolve()}/: results.md" in printed.out
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| configuration"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "configuration", "method", "rank", "state dtype", "state MiB", "x adamw", "peak MiB (predicted)",
        "perplexity", "tok/s x adamw", "Pareto"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in lines if line.startswith("| adamw") or line.startswith("| galore")}
    adamw, galore = cells["adamw (baseline)"], cells["galore"]
    assert adamw[1:6] == ["adamw", "-", "fp32", f"{float(summary['adamw']['optimizer_state_MiB']):.2f}", "1.00x"]
    assert galore[2] == "4" and galore[5] == f"{float(summary['galore']['state / base']):.2f}x"
    decimals = 2 if base < 100 else 1
    assert adamw[7] == f"{base:.{decimals}f} ± {statistics.stdev(ppl['adamw']):.{decimals}f}"
    assert adamw[8] == "1.00x" and galore[8].endswith("x")
    assert "mean ± sample std over seeds 0, 1, 2" in markdown and "tokens/s are wall-clock" in markdown
    assert "predicted = the planner's total" in markdown and "cpu_s" in markdown

    # both figures are images of a readable size with something drawn on them
    for name, least in (("memory_vs_ppl.png", (400, 600)), ("curves.png", (400, 1200))):
        picture = image.imread(out / name)
        assert picture.ndim == 3 and picture.shape[0] >= least[0] and picture.shape[1] >= least[1], picture.shape
        ink = (picture[..., :3] < 0.8).any(axis=-1).mean()
        assert 0.01 < ink < 0.6, (name, ink)

    # run again: every (configuration, seed) is done; a fourth seed trains only its own runs
    real_run_one, calls = study_module.run_one, []
    monkeypatch.setattr(study_module, "run_one", lambda name, config: calls.append(name) or real_run_one(name, config))
    assert [r["run"] for r in run_study(path)] == names and calls == []
    assert "[6/6] galore-s2: already done, skipped" in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "seeds": [0, 1, 2, 3]}))
    rows = run_study(path)
    assert calls == ["adamw-s3", "galore-s3"] and len(rows) == 8
    summary = {r["config"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert summary["adamw"]["seeds"] == "0 1 2 3" and summary["adamw"]["finished"] == "4"


def test_the_summary_of_seeds_counts_the_diverged_and_averages_the_rest():
    from lowmem.study.results import ppl_text, summarize_configurations

    def row(seed, ppl, status="ok"):
        return {"run": f"a-s{seed}", "config": "a", "seed": seed, "optimizer": "adamw", "rank": "-",
                "state_dtype": "fp32", "status": status, "eval_ppl": ppl, "eval_loss": None if ppl is None else 1.0,
                "optimizer_state_MiB": 2.0, "peak_memory_MiB": 10.0, "cuda_peak_MiB": None, "tokens": 100,
                "tokens_per_s": 50.0 + seed, "wall_s": 1.0, "cpu_s": 2.0}

    (one,) = summarize_configurations([row(0, 30.0), row(1, 34.0), row(2, None, "diverged")])
    assert (one["eval_ppl"], one["eval_ppl_std"]) == (32.0, pytest.approx(2.8284271, rel=1e-6))
    assert (one["finished"], one["diverged"], one["peak_source"], one["tokens_per_s"]) == (2, 1, "predicted", 51.0)
    assert ppl_text(one) == "32.00 ± 2.83 (2 of 3 seeds; 1 diverged)"
    (lone,) = summarize_configurations([row(0, 123.456)])
    assert lone["eval_ppl_std"] is None and ppl_text(lone) == "123.5"
    measured = [dict(row(0, 30.0), cuda_peak_MiB=12.0), dict(row(1, 30.0), cuda_peak_MiB=14.0)]
    assert summarize_configurations(measured)[0]["peak_source"] == "CUDA-measured"
    assert summarize_configurations(measured)[0]["cuda_peak_MiB"] == 13.0


def test_seeds_must_be_distinct(tmp_path, corpus, make_config):
    path = write_study(make_config, tmp_path, corpus, {"a": {"optimizer": {"name": "adamw"}}}, seeds=[1, 1])
    with pytest.raises(ConfigError, match=r"study.seeds: expected a non-empty list of distinct seeds, got \[1, 1\]"):
        load_study(path)
