"""A study: several optimizer configs trained on the same model, data and token budget, then one table and
plots of memory against perplexity.

    python -m lowmem.study configs/studies/optimizers.yaml [dotted.key=value ...]

The study file names a base training config, overrides shared by every run, and the runs (each a mapping of
overrides). `grid: {optimizer.rank: [64, 128], optimizer.state_dtype: [fp32, int4]}` at the top level (or
inside one run) expands every run (or that one) into the product of the values. Overrides on the command
line apply to every run. Every run is validated before any starts.

Resumable: a finished (or diverged) run leaves `study_result.json` in its run directory and is skipped the
next time with the same config; an interrupted run continues from its last checkpoint. Writes, in the study
directory: `results.csv` and `results.md` (eval perplexity, optimizer state counted, peak memory predicted
by the planner and measured on CUDA, tokens/s, wall time, each as a ratio to the baseline row too; a run
that diverged is recorded with its step and cause), `memory_vs_ppl.png` (the Pareto front of optimizer state
against perplexity marked, points labelled) and `curves.png` (train and eval loss against tokens).
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lowmem.console import log
from lowmem.config.files import apply_override, read_yaml_tree
from lowmem.config.schema import deep_merge, from_dict
from lowmem.errors import REPORTED, ConfigError, TrainingDiverged, TrainingInterrupted, report
from lowmem.train.config import Config, config_changes, config_from_tree
from lowmem.train.metrics import read_metrics

RESULT_FILE = "study_result.json"
MIB = 2**20
RATIOS = {"optimizer_state_MiB": "state", "eval_ppl": "ppl", "peak_memory_MiB": "peak", "tokens_per_s": "tok/s",
          "wall_s": "wall"}


@dataclass
class StudyConfig:
    base: str  # training config, relative to the study file
    name: str = "study"
    out_dir: str = "runs"
    overrides: dict = field(default_factory=dict)  # nested mapping applied to every run
    runs: dict = field(default_factory=dict)  # run name -> nested mapping of overrides (may hold its own grid)
    grid: dict = field(default_factory=dict)  # dotted key -> list of values: every run over their product
    baseline: Optional[str] = None  # the row ratios are taken against (default: the first plain AdamW run)


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
    """The study and each run's validated training config (every run is checked before any starts)."""
    path = Path(path)
    study = from_dict(StudyConfig, read_yaml_tree(path), "study")  # its errors name the file
    if not study.runs:
        raise ConfigError("study.runs: list at least one run")
    base_tree = read_yaml_tree(path.parent / study.base)
    configs = {}
    for run_name, run_overrides in expand_grid(study.runs, study.grid).items():
        tree = deep_merge(deep_merge(base_tree, study.overrides), run_overrides)
        for override in overrides:
            tree = apply_override(tree, override)
        tree = deep_merge(tree, {"run": {"name": run_name, "out_dir": str(Path(study.out_dir) / study.name)},
                                 "checkpoint": {"resume": "auto"}})  # an interrupted run continues
        try:
            configs[run_name] = config_from_tree(tree)
        except ConfigError as err:
            raise ConfigError(f"study.runs.{run_name}: {err}") from err
    if study.baseline is not None and study.baseline not in configs:
        raise ConfigError(f"study.baseline: no run named '{study.baseline}' (runs: {sorted(configs)})")
    return study, configs


# ---------------------------------------------------------------------------------------------------------
# One run's row


def predicted_peak(config: Config) -> int:
    from lowmem.memory.planner import plan_memory

    return plan_memory(config).total()


def summarize(run_name: str, config: Config, seconds: float, diverged: Optional[TrainingDiverged] = None
              ) -> dict[str, Any]:
    """One table row, from the run's metrics. A diverged run has status `diverged`, the step and cause, and no
    eval numbers; its memory columns are filled when it got past its first update."""
    records = read_metrics(config.run_dir) if (config.run_dir / "metrics.jsonl").exists() else []
    memory = next((r for r in records if r.get("event") == "memory"), {})
    evals = [r for r in records if r.get("eval_loss") is not None] if diverged is None else []
    steps = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    cuda = [r["cuda_peak_allocated_bytes"] for r in records if "cuda_peak_allocated_bytes" in r]
    norms = [r["grad_norm"] for r in steps if r.get("grad_norm") is not None]
    last = evals[-1] if evals else {}
    return {
        "run": run_name,
        "optimizer": config.optimizer.name,
        "lr": config.optimizer.lr,
        "status": "diverged" if diverged else "ok",
        "step": diverged.step if diverged else last.get("step"),
        "eval_loss": round(last["eval_loss"], 4) if last else None,
        "eval_ppl": round(last["eval_ppl"], 3) if last else None,
        "optimizer_state_MiB": round(memory["optimizer_state_bytes"] / MIB, 3) if memory else None,
        "params_MiB": round(memory["params_bytes"] / MIB, 3) if memory else None,
        "peak_memory_MiB": round(predicted_peak(config) / MIB, 1),
        "cuda_peak_MiB": round(max(cuda) / MIB, 1) if cuda else None,
        "tokens": steps[-1]["tokens"] if steps else 0,
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "max_grad_norm": round(max(norms), 3) if norms else None,  # of the logged updates
        "wall_s": round(seconds, 1),
        "cause": diverged.cause if diverged else "",
    }


def baseline_row(rows: list[dict], study: StudyConfig, configs: dict[str, Config]) -> Optional[dict]:
    """The row ratios are taken against: study.baseline, else the first finished AdamW run without an lr split."""
    if study.baseline is not None:
        return next((r for r in rows if r["run"] == study.baseline), None)
    return next((r for r in rows if r["optimizer"] == "adamw" and r["eval_ppl"] is not None
                 and configs[r["run"]].optimizer.target_lr_scale == 1.0), None)


def with_ratios(rows: list[dict], baseline: Optional[dict]) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        for key, short in RATIOS.items():
            ok = baseline and row.get(key) is not None and baseline.get(key)
            row[f"{short} / base"] = round(row[key] / baseline[key], 3) if ok else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------
# Outputs


def pareto_front(rows: list[dict], x: str = "optimizer_state_MiB", y: str = "eval_ppl") -> set[str]:
    """Runs no other run beats on both x and y (lower is better), among the finished ones."""
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = set()
    for r in points:
        dominated = any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in points)
        if not dominated:
            front.add(r["run"])
    return front


def write_results(rows: list[dict], out: Path, runs: dict[str, Config]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    front = pareto_front(rows)
    lines = ["| " + " | ".join(header) + " | Pareto |", "|" + "---|" * (len(header) + 1)]
    for row in rows:
        cells = ["" if row[k] is None else str(row[k]) for k in header]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if row['run'] in front else ''} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot_memory(rows, front, out / "memory_vs_ppl.png")
    plot_curves(runs, out / "curves.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(rows: list[dict], front: set[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    points = [r for r in rows if r["eval_ppl"] is not None and r["optimizer_state_MiB"] is not None]
    for row in points:
        on_front = row["run"] in front
        ax.scatter(row["optimizer_state_MiB"], row["eval_ppl"], s=60 if on_front else 30,
                   marker="o" if on_front else "x", color="C3" if on_front else "C0", zorder=3)
        ax.annotate(row["run"], (row["optimizer_state_MiB"], row["eval_ppl"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    frontier = sorted((r for r in points if r["run"] in front), key=lambda r: r["optimizer_state_MiB"])
    if frontier:
        ax.step([r["optimizer_state_MiB"] for r in frontier], [r["eval_ppl"] for r in frontier], where="post",
                color="C3", alpha=0.6, label="Pareto front (less memory and lower perplexity)")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer state (MiB, counted tensor bytes)")
    ax.set_ylabel("eval perplexity")
    ax.set_title("memory vs perplexity, same model, data and token budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: dict[str, Config], path: Path) -> None:
    plt = _pyplot()
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, config in runs.items():
        if not (config.run_dir / "metrics.jsonl").exists():
            continue
        records = read_metrics(config.run_dir)
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        if steps:
            train_ax.plot([r["tokens"] for r in steps], [r["loss"] for r in steps], label=name, lw=1)
        if evals:
            eval_ax.plot([r["tokens"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=name)
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set_xlabel("tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    train_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Running


def _config_key(config: Config) -> dict:
    tree = config.to_dict()
    tree["checkpoint"].pop("resume", None)
    return tree


def run_one(run_name: str, config: Config) -> dict:
    """Train one run (continuing an interrupted one) and return its row; a diverged run is a row too."""
    from lowmem.train.trainer import Trainer

    start = time.perf_counter()
    diverged = None
    try:
        Trainer(config).fit()
    except TrainingDiverged as err:
        log.warning(f"{run_name} diverged: {err}; the study goes on")
        diverged = err
    row = summarize(run_name, config, time.perf_counter() - start, diverged)
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
    study, configs = load_study(path, overrides)
    out = Path(study.out_dir) / study.name
    rows = []
    for i, (run_name, config) in enumerate(configs.items(), start=1):
        row = finished_row(config)
        if row is not None:
            log.info(f"[{i}/{len(configs)}] {run_name}: already done, skipped")
        else:
            log.info(f"[{i}/{len(configs)}] {run_name}: optimizer {config.optimizer.name}")
            row = run_one(run_name, config)
        rows.append(row)
        done = {name: configs[name] for name in (r["run"] for r in rows)}
        write_results(with_ratios(rows, baseline_row(rows, study, configs)), out, done)  # partial results survive
    print((out / "results.md").read_text())
    return with_ratios(rows, baseline_row(rows, study, configs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study YAML (see configs/studies/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    args = parser.parse_args(argv)
    try:
        run_study(args.study, args.overrides)
    except REPORTED as err:
        more = ", stopped at once" if isinstance(err, KeyboardInterrupt) else ""  # a second Ctrl-C, or between runs
        if isinstance(err, (KeyboardInterrupt, TrainingInterrupted)):
            more += "; run the same command again to continue the study (finished runs are skipped)"
        return report(err, more)
    return 0


if __name__ == "__main__":
    sys.exit(main())
