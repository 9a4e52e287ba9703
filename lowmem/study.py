"""A study: several optimizer configs trained on the same model, data and token budget, then one table and one
plot of optimizer-state memory against eval perplexity.

    python -m lowmem.study configs/studies/optimizers.yaml [dotted.key=value ...]

The study file names a base training config, overrides shared by every run, and the runs (each a mapping of
overrides). Overrides on the command line apply to every run. Writes `results.csv`, `results.md` and
`memory_vs_ppl.png` in the study directory, one run directory per run beside them.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lowmem.config import Config, ConfigError, config_from_tree, deep_merge, from_dict, read_yaml_tree, apply_override
from lowmem.errors import TrainingDiverged
from lowmem.metrics import read_metrics


@dataclass
class StudyConfig:
    base: str  # training config, relative to the study file
    name: str = "study"
    out_dir: str = "runs"
    overrides: dict = field(default_factory=dict)  # nested mapping applied to every run
    runs: dict = field(default_factory=dict)  # run name -> nested mapping of overrides


def load_study(path: str | Path, overrides: list[str] = ()) -> tuple[StudyConfig, dict[str, Config]]:
    """The study and each run's validated training config (every run is checked before any starts)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file '{path}' not found")
    study = from_dict(StudyConfig, yaml.safe_load(path.read_text()) or {}, "study")
    if not study.runs:
        raise ConfigError("study.runs: list at least one run")
    base_tree = read_yaml_tree(path.parent / study.base)
    configs = {}
    for run_name, run_overrides in study.runs.items():
        tree = deep_merge(deep_merge(base_tree, study.overrides), run_overrides or {})
        for override in overrides:
            tree = apply_override(tree, override)
        tree = deep_merge(tree, {"run": {"name": run_name, "out_dir": str(Path(study.out_dir) / study.name)}})
        try:
            configs[run_name] = config_from_tree(tree)
        except ConfigError as err:
            raise ConfigError(f"study.runs.{run_name}: {err}") from err
    return study, configs


def summarize(run_name: str, config: Config, seconds: float, diverged: TrainingDiverged | None = None) -> dict:
    """One table row. A diverged run has status `diverged`, the step and cause, and no eval numbers; its
    memory columns are filled when it got past its first update."""
    records = read_metrics(config.run_dir)
    memory = next((r for r in records if r.get("event") == "memory"), None)
    evals = [r for r in records if r.get("eval_loss") is not None] if diverged is None else []
    speeds = [r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None]
    last = evals[-1] if evals else {}
    return {
        "run": run_name,
        "optimizer": config.optimizer.name,
        "lr": config.optimizer.lr,
        "status": "diverged" if diverged else "ok",
        "step": diverged.step if diverged else last.get("step"),
        "eval_loss": round(last["eval_loss"], 4) if last else None,
        "eval_ppl": round(last["eval_ppl"], 3) if last else None,
        "optimizer_state_MiB": round(memory["optimizer_state_bytes"] / 2**20, 3) if memory else None,
        "params_MiB": round(memory["params_bytes"] / 2**20, 3) if memory else None,
        "tokens": last.get("tokens"),
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "wall_s": round(seconds, 1),
        "cause": diverged.cause if diverged else "",
    }


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    adamw = next((r for r in rows if r["optimizer"] == "adamw" and r["optimizer_state_MiB"]), None)
    header = list(rows[0]) + (["state / adamw"] if adamw else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = ["" if row[k] is None else str(row[k]) for k in rows[0]]
        if adamw:
            state = row["optimizer_state_MiB"]
            cells.append("" if state is None else f"{state / adamw['optimizer_state_MiB']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot([r for r in rows if r["eval_ppl"] is not None and r["optimizer_state_MiB"] is not None],
         out / "memory_vs_ppl.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        ax.scatter(row["optimizer_state_MiB"], row["eval_ppl"], s=40)
        ax.annotate(row["run"], (row["optimizer_state_MiB"], row["eval_ppl"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xlabel("optimizer state (MiB, counted tensor bytes)")
    ax.set_ylabel("eval perplexity")
    ax.set_title("memory vs perplexity, same model, data and token budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_study(path: str | Path, overrides: list[str] = ()) -> list[dict]:
    from lowmem.trainer import Trainer

    study, configs = load_study(path, overrides)
    rows = []
    for run_name, config in configs.items():
        print(f"=== {run_name}: optimizer {config.optimizer.name}")
        start = time.perf_counter()
        try:
            Trainer(config).fit()
            diverged = None
        except TrainingDiverged as err:  # one run's divergence is a result, not the end of the study
            print(f"{run_name} diverged: {err}", file=sys.stderr)
            diverged = err
        rows.append(summarize(run_name, config, time.perf_counter() - start, diverged))
        write_results(rows, Path(study.out_dir) / study.name)  # partial results survive a later failure
    print((Path(study.out_dir) / study.name / "results.md").read_text())
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study YAML (see configs/studies/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    args = parser.parse_args(argv)
    try:
        run_study(args.study, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
