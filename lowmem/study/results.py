"""A study's numbers: one row per run (configuration x seed) from its metrics, one summary per configuration
(mean and sample std over its seeds), ratios to the baseline's mean, the Pareto front, and the files:
`results.csv` (every run), `summary.csv` (every configuration) and `results.md` (the compact table)."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Optional

from lowmem.errors import TrainingDiverged
from lowmem.train.config import Config
from lowmem.train.metrics import read_metrics

MIB = 2**20
# column -> its short name in the ratio columns ("state / base")
RATIOS = {"optimizer_state_MiB": "state", "eval_ppl": "ppl", "peak_memory_MiB": "peak", "tokens_per_s": "tok/s",
          "wall_s": "wall"}
PREDICTED, MEASURED = "predicted", "CUDA-measured"


def predicted_peak(config: Config) -> int:
    from lowmem.memory.planner import plan_memory

    return plan_memory(config).total()


def rank_text(config: Config) -> str:
    """The rank column: LoRA's r, a projector's rank (or its density when the rank follows the shape), or '-'
    for an optimizer that keeps full-size state."""
    opt = config.optimizer
    if config.model.lora is not None:
        return f"LoRA r={config.model.lora.r}"
    if not getattr(opt, "projects", False):
        return "-"
    if getattr(opt, "rank", None) is not None:
        return str(opt.rank)
    return f"{getattr(opt, 'density', 0.25):g} x min side"


def method_text(config: Config) -> str:
    return config.optimizer.name + (" + LoRA" if config.model.lora is not None else "")


def summarize(run_name: str, config: Config, seconds: float, diverged: Optional[TrainingDiverged] = None,
              cpu_seconds: Optional[float] = None) -> dict[str, Any]:
    """One run's row, from its metrics (`config`, its configuration's name, is the run's until the study sets
    it). A diverged run has status `diverged`, the step and cause, and no eval numbers; its memory columns are
    filled when it got past its first update. `wall_s` and `cpu_s` are the run's wall-clock and CPU seconds
    (time.process_time: every thread of this process)."""
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
        "config": run_name,
        "seed": config.run.seed,
        "optimizer": config.optimizer.name,
        "lr": config.optimizer.lr,
        "rank": rank_text(config),
        "state_dtype": memory.get("state_dtype") or getattr(config.optimizer, "state_dtype", None),
        "status": "diverged" if diverged else "ok",
        "step": diverged.step if diverged else last.get("step"),
        "eval_loss": round(last["eval_loss"], 4) if last else None,
        "eval_ppl": round(last["eval_ppl"], 3) if last else None,
        "optimizer_state_MiB": round(memory["optimizer_state_bytes"] / MIB, 3) if memory else None,
        "params_MiB": round(memory["params_bytes"] / MIB, 3) if memory else None,
        "parameters": memory.get("parameters"),
        "peak_memory_MiB": round(predicted_peak(config) / MIB, 1),
        "cuda_peak_MiB": round(max(cuda) / MIB, 1) if cuda else None,
        "tokens": steps[-1]["tokens"] if steps else 0,
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "max_grad_norm": round(max(norms), 3) if norms else None,  # of the logged updates
        "wall_s": round(seconds, 1),
        "cpu_s": round(cpu_seconds, 1) if cpu_seconds is not None else None,
        "cause": diverged.cause if diverged else "",
    }


# ---------------------------------------------------------------------------------------------------------
# Over seeds


def mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def sample_std(values: list[float]) -> Optional[float]:
    """The sample standard deviation (n - 1), None for fewer than two values."""
    return statistics.stdev(values) if len(values) >= 2 else None


def _present(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def summarize_configuration(name: str, rows: list[dict]) -> dict[str, Any]:
    """One configuration over its seeds: mean and sample std of eval perplexity and loss over the seeds that
    finished, the means of the rest; peak memory CUDA-measured when every seed measured it, else predicted."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("eval_ppl") is not None]
    measured = all(r.get("cuda_peak_MiB") is not None for r in rows)
    first = rows[0]
    return {
        "config": name, "optimizer": first["optimizer"], "rank": first.get("rank", "-"),
        "state_dtype": first.get("state_dtype"), "seeds": " ".join(str(r.get("seed")) for r in rows),
        "finished": len(ok), "diverged": sum(r["status"] == "diverged" for r in rows),
        "eval_ppl": mean(_present(ok, "eval_ppl")), "eval_ppl_std": sample_std(_present(ok, "eval_ppl")),
        "eval_loss": mean(_present(ok, "eval_loss")), "eval_loss_std": sample_std(_present(ok, "eval_loss")),
        "optimizer_state_MiB": mean(_present(rows, "optimizer_state_MiB")),
        "peak_memory_MiB": mean(_present(rows, "peak_memory_MiB")),  # predicted, as in each run's row
        "cuda_peak_MiB": mean(_present(rows, "cuda_peak_MiB")) if measured else None,
        "peak_source": MEASURED if measured else PREDICTED,
        "tokens": max((r.get("tokens") or 0 for r in rows), default=0),
        "tokens_per_s": mean(_present(rows, "tokens_per_s")),
        "wall_s": mean(_present(rows, "wall_s")), "cpu_s": mean(_present(rows, "cpu_s")),
    }


def summarize_configurations(rows: list[dict]) -> list[dict]:
    """One summary per configuration, in the order the configurations first appear in `rows`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    return [summarize_configuration(name, members) for name, members in groups.items()]


def baseline_summary(summaries: list[dict], baseline: Optional[str], plain_adamw: set[str]) -> Optional[dict]:
    """The configuration ratios are taken against (its seeds' mean): `baseline`, else the first plain AdamW
    configuration (`plain_adamw`: those without an lr split or adapters) with a finished seed."""
    if baseline is not None:
        return next((s for s in summaries if s["config"] == baseline), None)
    return next((s for s in summaries if s["config"] in plain_adamw and s["eval_ppl"] is not None), None)


def with_ratios(rows: list[dict], baseline: Optional[dict]) -> list[dict]:
    """Each row with `SHORT / base` columns: its value over the baseline configuration's mean."""
    out = []
    for row in rows:
        row = dict(row)
        for key, short in RATIOS.items():
            ok = baseline and row.get(key) is not None and baseline.get(key)
            row[f"{short} / base"] = round(row[key] / baseline[key], 3) if ok else None
        out.append(row)
    return out


def pareto_front(rows: list[dict], x: str = "optimizer_state_MiB", y: str = "eval_ppl", key: str = "run"
                 ) -> set[str]:
    """The rows (by `key`) no other row beats on both x and y (lower is better), among those with both."""
    points = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    front = set()
    for r in points:
        dominated = any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in points)
        if not dominated:
            front.add(r[key])
    return front


# ---------------------------------------------------------------------------------------------------------
# For reading


def short_number(value: float) -> str:
    """A number for reading: 0.123, 1.23, 12.3, 123, 1,234 (no decimals past 100)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"


def short_count(count: float) -> str:
    """A count of tokens or parameters for an axis or a title, 3 significant digits: 500, 12K, 1.25M, 3B."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(float(f"{count:.3g}")) >= size:  # 999,999 reads 1M, not 1e+03K
            return f"{float(f'{count:.3g}') / size:.3g}{unit}"
    return f"{count:.0f}"


def ppl_text(summary: dict) -> str:
    """`55.21 ± 1.30`, the std with the mean's decimals; a lone seed has no ±; diverged seeds are counted."""
    seeds = len(summary["seeds"].split())
    if summary["eval_ppl"] is None:
        return f"diverged ({summary['diverged']}/{seeds})"
    value = summary["eval_ppl"]
    decimals = 2 if value < 100 else 1 if value < 1000 else 0
    text = f"{value:.{decimals}f}"
    if summary["eval_ppl_std"] is not None:
        text += f" ± {summary['eval_ppl_std']:.{decimals}f}"
    if summary["finished"] < seeds:
        text += f" ({summary['finished']} of {seeds} seeds; {summary['diverged']} diverged)"
    return text


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}x" if value is not None and base else ""


def compact_table(summaries: list[dict], baseline: Optional[dict], title: str) -> str:
    """results.md: the Markdown table a paper takes (one row per configuration) and the notes that say what
    each column is."""
    sources = {s["peak_source"] for s in summaries}
    source = sources.pop() if len(sources) == 1 else None  # mixed: each cell names its own
    base_name = baseline["config"] if baseline else "base"
    base = baseline or {}
    front = pareto_front(summaries, key="config")
    header = ["configuration", "method", "rank", "state dtype", "state MiB", f"x {base_name}",
              f"peak MiB ({source})" if source else "peak MiB", "perplexity", f"tok/s x {base_name}", "Pareto"]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        state = s["optimizer_state_MiB"]
        peak = s["cuda_peak_MiB"] if s["peak_source"] == MEASURED else s["peak_memory_MiB"]
        peak_cell = "" if peak is None else short_number(peak) + ("" if source else f" ({s['peak_source']})")
        cells = [s["config"] + (" (baseline)" if baseline and s["config"] == base_name else ""), s["optimizer"],
                 s["rank"], s["state_dtype"] or "", "" if state is None else short_number(state),
                 _ratio(state, base.get("optimizer_state_MiB")), peak_cell, ppl_text(s),
                 _ratio(s["tokens_per_s"], base.get("tokens_per_s")), "yes" if s["config"] in front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({seed for s in summaries for seed in s["seeds"].split()}, key=lambda x: (len(x), x))
    notes = [
        f"Perplexity: eval perplexity after the last update, mean ± sample std over seeds {', '.join(seeds)}"
        if len(seeds) > 1 else "Perplexity: eval perplexity after the last update, one seed (no std)",
        f"x {base_name}: against the baseline configuration's mean over its seeds"
        + (f" ({short_number(base['tokens_per_s'])} tok/s)" if base.get("tokens_per_s") else "")
        + "; state: optimizer state tensor bytes counted after the first update",
        "Peak memory: predicted = the planner's total (weights, gradients, state, activations; no CUDA context); "
        "CUDA-measured = the largest CUDA allocation over the run",
        "tokens/s are wall-clock and may come from a shared machine; results.csv has each run's wall and CPU "
        "seconds (wall_s, cpu_s)",
        "Pareto: no configuration has both less optimizer state and lower mean perplexity",
    ]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def _write_csv(rows: list[dict], path: Path) -> None:
    header: list[str] = []
    for row in rows:  # rows a study finished under an older lowmem may lack a newer column
        header += [key for key in row if key not in header]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_tables(rows: list[dict], summaries: list[dict], baseline: Optional[dict], out: Path, title: str) -> None:
    """results.csv (one row per run), summary.csv (one per configuration), results.md (the compact table)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "results.csv")
    _write_csv([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                for s in with_ratios(summaries, baseline)], out / "summary.csv")
    (out / "results.md").write_text(compact_table(summaries, baseline, title))
