"""A study: several optimizer configs trained on the same model, data and token budget, each over one or more
seeds, then a table and plots of memory against perplexity.

    python -m lowmem.study configs/studies/optimizers.yaml [dotted.key=value ...]

The study file names a base training config, overrides shared by every run, and the configurations (`runs`,
each a mapping of overrides). `grid: {optimizer.rank: [64, 128], optimizer.state_dtype: [fp32, int4]}` at the
top level (or inside one configuration) expands every configuration (or that one) into the product of the
values. `seeds: [0, 1, 2]` trains each configuration once per seed (`run.seed`; run names gain `-s0`, `-s1`,
...), seed by seed, so an interrupted study already holds whole comparisons. Overrides on the command line
apply to every run. Every run is validated before any starts.

Resumable: a finished (or diverged) run leaves `study_result.json` in its run directory and is skipped the
next time with the same config; an interrupted run continues from its last checkpoint. Writes, in the study
directory (lowmem.study.results, lowmem.study.plots): `results.csv` (one row per run and seed: eval
perplexity and loss, optimizer state counted, peak memory predicted by the planner and measured on CUDA,
tokens/s, wall and CPU seconds, ratios to the baseline's mean; a diverged run with its step and cause),
`summary.csv` (one row per configuration: means and sample stds over its seeds), `results.md` (the compact
table), `memory_vs_ppl.png` and `curves.png`.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lowmem.console import log
from lowmem.config.files import apply_override, read_yaml_tree
from lowmem.config.schema import deep_merge, from_dict
from lowmem.errors import REPORTED, ConfigError, TrainingDiverged, TrainingInterrupted, report
from lowmem.study.plots import plot_curves, plot_memory
from lowmem.study.results import (baseline_summary, pareto_front, short_count, summarize,
                                  summarize_configurations, with_ratios, write_tables)
from lowmem.train.config import Config, config_changes, config_from_tree

__all__ = ["StudyConfig", "expand_grid", "load_study", "main", "pareto_front", "run_one", "run_study"]

RESULT_FILE = "study_result.json"
FILES = ("results.md (the compact table), results.csv (one row per run), summary.csv (one row per "
         "configuration), memory_vs_ppl.png, curves.png")


@dataclass
class StudyConfig:
    base: str  # training config, relative to the study file
    name: str = "study"
    out_dir: str = "runs"
    overrides: dict = field(default_factory=dict)  # nested mapping applied to every run
    runs: dict = field(default_factory=dict)  # configuration name -> nested mapping of overrides (may hold a grid)
    grid: dict = field(default_factory=dict)  # dotted key -> list of values: every configuration over their product
    seeds: Optional[list[int]] = None  # each configuration once per seed (run.seed); None: the base config's seed
    baseline: Optional[str] = None  # the configuration ratios are taken against (default: the first plain AdamW)


def expand_grid(runs: dict, grid: dict) -> dict[str, dict]:
    """Each run crossed with the product of the grid's values (a run's own `grid` joins the study's); the
    name gains `-key=value` for every grid key (the last part of the dotted key)."""
    expanded: dict[str, dict] = {}
    for name, overrides in runs.items():
        overrides = copy.deepcopy(overrides or {})
        own = overrides.pop("grid", {}) or {}
        axes = {**grid, **own}
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"study.grid.{key}: expected a non-empty list of values, got {values!r}")
        for combination in itertools.product(*axes.values()):
            tree = copy.deepcopy(overrides)
            suffix = ""
            for key, value in zip(axes, combination):
                tree = apply_override(tree, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
                suffix += f"-{key.split('.')[-1]}={value}"
            expanded[name + suffix] = tree
    return expanded


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudyConfig, dict[str, Config]]:
    """The study and each run's validated training config, by run name (every run is checked before any
    starts). With `seeds`, runs go seed by seed, each over every configuration."""
    path = Path(path)
    study = from_dict(StudyConfig, read_yaml_tree(path), "study")  # its errors name the file
    if not study.runs:
        raise ConfigError("study.runs: list at least one run")
    if study.seeds is not None and (not study.seeds or len(set(study.seeds)) != len(study.seeds)):
        raise ConfigError(f"study.seeds: expected a non-empty list of distinct seeds, got {study.seeds}")
    base_tree = read_yaml_tree(path.parent / study.base)
    configurations = expand_grid(study.runs, study.grid)
    configs = {}
    for seed in study.seeds if study.seeds is not None else [None]:
        for name, run_overrides in configurations.items():
            run_name = name if seed is None else f"{name}-s{seed}"
            tree = deep_merge(deep_merge(base_tree, study.overrides), run_overrides)
            for override in overrides:
                tree = apply_override(tree, override)
            tree = deep_merge(tree, {"run": {"name": run_name, "out_dir": str(Path(study.out_dir) / study.name),
                                             **({} if seed is None else {"seed": seed})},
                                     "checkpoint": {"resume": "auto"}})  # an interrupted run continues
            try:
                configs[run_name] = config_from_tree(tree)
            except ConfigError as err:
                raise ConfigError(f"study.runs.{name}: {err}") from err
    if study.baseline is not None and study.baseline not in configurations:
        raise ConfigError(f"study.baseline: no configuration named '{study.baseline}' (runs: "
                          f"{sorted(configurations)})")
    return study, configs


def configuration_of(study: StudyConfig, run_name: str, config: Config) -> str:
    """The configuration a run trains: its name less the seed's `-sN`."""
    return run_name if study.seeds is None else run_name.removesuffix(f"-s{config.run.seed}")


# ---------------------------------------------------------------------------------------------------------
# Outputs


def study_title(rows: list[dict], config: Config) -> str:
    """`llama_9m (9.1M parameters), 410K tokens per run`: the model and token budget every run shares."""
    model = config.model.pretrained or config.model.preset
    parameters = next((r["parameters"] for r in rows if r.get("parameters")), None)
    size = f" ({short_count(parameters)} parameters)" if parameters else ""
    tokens = max((r.get("tokens") or 0 for r in rows), default=0)
    return f"{model}{size}, {short_count(tokens)} tokens per run"


def write_results(rows: list[dict], study: StudyConfig, configs: dict[str, Config], out: Path
                  ) -> tuple[list[dict], Optional[dict]]:
    """The tables and both plots of the runs in `rows`; returns the configurations' summaries and the
    baseline's."""
    summaries = summarize_configurations(rows)
    plain_adamw = {configuration_of(study, name, c) for name, c in configs.items()
                   if c.optimizer.name == "adamw" and c.optimizer.target_lr_scale == 1.0 and c.model.lora is None}
    baseline = baseline_summary(summaries, study.baseline, plain_adamw)
    title = study_title(rows, configs[rows[0]["run"]])
    write_tables(with_ratios(rows, baseline), summaries, baseline, out, title)
    runs: dict[str, list[Config]] = {}
    for row in rows:
        runs.setdefault(row["config"], []).append(configs[row["run"]])
    plot_memory(summaries, baseline, title, out / "memory_vs_ppl.png")
    plot_curves(summaries, runs, baseline, title, out / "curves.png")
    return summaries, baseline


# ---------------------------------------------------------------------------------------------------------
# Running


def _config_key(config: Config) -> dict:
    tree = config.to_dict()
    tree["checkpoint"].pop("resume", None)
    return tree


def run_one(run_name: str, config: Config) -> dict:
    """Train one run (continuing an interrupted one) and return its row; a diverged run is a row too."""
    from lowmem.train.trainer import Trainer

    start, cpu_start = time.perf_counter(), time.process_time()
    diverged = None
    try:
        Trainer(config).fit()
    except TrainingDiverged as err:
        log.warning(f"{run_name} diverged: {err}; the study goes on")
        diverged = err
    row = summarize(run_name, config, time.perf_counter() - start, diverged,
                    cpu_seconds=time.process_time() - cpu_start)
    (config.run_dir / RESULT_FILE).write_text(json.dumps({"row": row, "config": _config_key(config)}))
    return row


def finished_row(config: Config) -> Optional[dict]:
    """The row of a run this study already finished with the same config, or None."""
    path = config.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return None if config_changes(saved["config"], json.loads(json.dumps(_config_key(config)))) else saved["row"]


def run_study(path: str | Path, overrides: list[str] = ()) -> list[dict]:
    """Train every run not yet done, write the results after each one, print the compact table and return
    the runs' rows (with their ratios to the baseline's mean)."""
    study, configs = load_study(path, overrides)
    out = Path(study.out_dir) / study.name
    seeds = f" x {len(study.seeds)} seeds" if study.seeds is not None else ""
    log.info(f"study {study.name}: {len(configs)} runs ({len(configs) // len(study.seeds or [0])} "
             f"configurations{seeds}), results in {out}/")
    rows: list[dict] = []
    baseline = None
    for i, (run_name, config) in enumerate(configs.items(), start=1):
        row = finished_row(config)
        if row is not None:
            log.info(f"[{i}/{len(configs)}] {run_name}: already done, skipped")
        else:
            log.info(f"[{i}/{len(configs)}] {run_name}: optimizer {config.optimizer.name}, seed {config.run.seed}")
            row = run_one(run_name, config)
        row = {**row, "config": configuration_of(study, run_name, config), "seed": config.run.seed}
        rows.append(row)
        _, baseline = write_results(rows, study, configs, out)  # partial results survive an interruption
    print((out / "results.md").read_text())
    log.info(f"study {study.name} wrote {out.resolve()}/: {FILES}")
    return with_ratios(rows, baseline)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.study", description=(
        "Train several optimizer configurations on the same model, data and token budget, each over its seeds, "
        "and write a table and plots of memory against perplexity."))
    parser.add_argument("study", help="the study's YAML file (configs/studies/ has examples; the README lists its keys)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run of the study")
    args = parser.parse_args(argv)
    try:
        run_study(args.study, args.overrides)
    except REPORTED as err:
        more = ", stopped at once" if isinstance(err, KeyboardInterrupt) else ""  # a second Ctrl-C, or between runs
        if isinstance(err, (KeyboardInterrupt, TrainingInterrupted)):
            more += "; run the same command again to continue the study (finished runs are skipped)"
        return report(err, more)
    return 0

