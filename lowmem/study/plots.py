"""A study's two figures (matplotlib, Agg): `memory_vs_ppl.png` (optimizer state against eval perplexity, mean
± std over seeds, the Pareto front and the baseline marked) and `curves.png` (train loss, eval loss and lr
against tokens, mean over seeds with a ± std band)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from lowmem.study.results import pareto_front, sample_std, short_count
from lowmem.train.config import Config
from lowmem.train.metrics import read_metrics

CURVE_POINTS = 40  # train curves are smoothed to about this many independent points


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def point_label(summary: dict) -> str:
    """`galore (r=64, int4)`: the configuration with its rank and state dtype."""
    rank = summary.get("rank") or "-"
    parts = [] if rank == "-" else [rank if rank.startswith("LoRA") else f"r={rank}"]
    parts += [summary["state_dtype"]] if summary.get("state_dtype") else []
    return summary["config"] + (f" ({', '.join(parts)})" if parts else "")


def _token_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_count(x)))
    ax.set_xlabel("tokens trained")


def _seeds(summaries: list[dict]) -> tuple[int, str]:
    """How many seeds the study's runs used, and `seeds 0, 1, 2` (or `seed 0`)."""
    seeds = sorted({seed for s in summaries for seed in s["seeds"].split()}, key=lambda x: (len(x), x))
    return len(seeds), f"seeds {', '.join(seeds)}" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else ""


def plot_memory(summaries: list[dict], baseline: Optional[dict], title: str, path: Path) -> None:
    """One point per configuration: mean optimizer state against mean eval perplexity, the std over seeds as
    an error bar; the Pareto front filled and joined, the baseline a star with its perplexity as a band."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    n_seeds, seeds = _seeds(summaries)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = [s for s in summaries if s["eval_ppl"] is not None and s["optimizer_state_MiB"] is not None]
    front = pareto_front(points, key="config")
    base_name = baseline["config"] if baseline else None
    for s in points:
        x, y, err = s["optimizer_state_MiB"], s["eval_ppl"], s["eval_ppl_std"]
        if s["config"] == base_name:
            style = dict(marker="*", markersize=15, color="black", mfc="gold")
        elif s["config"] in front:
            style = dict(marker="o", markersize=8, color="C3", mfc="C3")
        else:
            style = dict(marker="o", markersize=7, color="C0", mfc="white")
        ax.errorbar(x, y, yerr=err if err is not None else None, capsize=4, elinewidth=1, zorder=3, ls="none",
                    **style)
        ax.annotate(point_label(s), (x, y), textcoords="offset points", xytext=(7, 5), fontsize=8)
    frontier = sorted((s for s in points if s["config"] in front), key=lambda s: s["optimizer_state_MiB"])
    if len(frontier) > 1:
        ax.step([s["optimizer_state_MiB"] for s in frontier], [s["eval_ppl"] for s in frontier], where="post",
                color="C3", alpha=0.5, zorder=2)
    if baseline and baseline.get("eval_ppl") is not None:
        ax.axhline(baseline["eval_ppl"], color="0.4", ls="--", lw=1, zorder=1)
        if baseline.get("eval_ppl_std"):
            low, high = (baseline["eval_ppl"] + sign * baseline["eval_ppl_std"] for sign in (-1, 1))
            ax.axhspan(low, high, color="0.5", alpha=0.12, zorder=0)
    states = [s["optimizer_state_MiB"] for s in points if s["optimizer_state_MiB"] > 0]
    if states and max(states) / min(states) > 20:
        ax.set_xscale("log")
    shown = {s["config"] for s in points}
    handles = []  # one entry for every kind of mark drawn
    if base_name in shown:
        handles.append(Line2D([], [], marker="*", markersize=12, color="black", mfc="gold", ls="none",
                              label=f"baseline: {base_name}" + (", on the front" if base_name in front else "")))
    if (front - {base_name}) & shown:
        handles.append(Line2D([], [], marker="o", color="C3", mfc="C3", ls="-", alpha=0.8,
                              label="Pareto front: no configuration has less state and lower perplexity"))
    if shown - front - {base_name}:
        handles.append(Line2D([], [], marker="o", color="C0", mfc="white", ls="none", label="not on the front"))
    if base_name in shown:
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1, label=f"{base_name}'s perplexity"
                              + (" (band: ± std)" if baseline.get("eval_ppl_std") else "")))
    handles.append(Line2D([], [], color="black", marker="|", markersize=12, ls="none",
                          label=f"error bar: ± sample std over {seeds}" if n_seeds > 1
                          else "one seed: no error bars"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
              frameon=False)
    diverged = [s["config"] for s in summaries if s["eval_ppl"] is None]
    if diverged:
        ax.text(0.01, 0.01, "diverged, not shown: " + ", ".join(diverged), transform=ax.transAxes, fontsize=7,
                color="C3")
    ax.margins(x=0.18, y=0.08)  # room for the labels right of the points
    ax.set_xlabel("optimizer state (MiB, tensor bytes counted after the first update)")
    ax.set_ylabel("eval perplexity after the last update" + (" (mean over seeds)" if n_seeds > 1 else ""))
    ax.set_title(f"Optimizer state against perplexity\n{title}, {seeds}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _over_seeds(series: list[dict[int, tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """The steps every seed logged: their tokens, the mean over seeds and the sample std (0 for one seed)."""
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    tokens = [sum(s[step][0] for s in series) / len(series) for step in steps]
    values = [[s[step][1] for s in series] for step in steps]
    means = [sum(v) / len(v) for v in values]
    stds = [sample_std(v) or 0.0 for v in values]
    return tokens, means, stds


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving mean over `window` points (fewer at the ends)."""
    if window <= 1:
        return list(values)
    half = window // 2
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def plot_curves(summaries: list[dict], runs: dict[str, list[Config]], baseline: Optional[dict], title: str,
                path: Path) -> None:
    """Three panels against tokens: train loss (the logged window means, mean over seeds, smoothed, ± std
    band), eval loss (mean ± std error bars) and the lr (the first seed's; seeds share the schedule)."""
    plt = _pyplot()
    fig, (train_ax, eval_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    colors = plt.get_cmap("tab10" if len(summaries) <= 10 else "tab20")
    base_name = baseline["config"] if baseline else None
    windows, log_every, lrs, seen = set(), set(), [], []
    for i, s in enumerate(summaries):
        configs = runs.get(s["config"], [])
        records = [read_metrics(c.run_dir) for c in configs if (c.run_dir / "metrics.jsonl").exists()]
        if not records:
            continue
        log_every.update(c.train.log_every for c in configs)
        is_base = s["config"] == base_name
        style = dict(color="black" if is_base else colors(i % colors.N), lw=2.0 if is_base else 1.3,
                     ls="--" if is_base else "-")
        label = point_label(s) + (" (baseline)" if is_base else "")
        train = [{r["step"]: (r["tokens"], r["loss"]) for r in rec if r.get("loss") is not None} for rec in records]
        tokens, means, stds = _over_seeds(train)
        if tokens:
            window = max(1, math.ceil(len(tokens) / CURVE_POINTS))
            windows.add(window)
            low = [m - d for m, d in zip(smooth(means, window), smooth(stds, window))]
            high = [m + d for m, d in zip(smooth(means, window), smooth(stds, window))]
            train_ax.plot(tokens, smooth(means, window), label=label, **style)
            train_ax.fill_between(tokens, low, high, color=style["color"], alpha=0.15, lw=0)
        evals = [{r["step"]: (r["tokens"], r["eval_loss"]) for r in rec if r.get("eval_loss") is not None}
                 for rec in records]
        tokens, means, stds = _over_seeds(evals)
        if tokens:  # configurations evaluated at the same tokens are set a little apart, so each bar shows
            dodge = (i - (len(summaries) - 1) / 2) * 0.008 * max(tokens)
            eval_ax.errorbar([t + dodge for t in tokens], means, yerr=stds if len(records) > 1 else None,
                             marker="o", markersize=4, capsize=3, **style)
        seen += [r["tokens"] for rec in records for r in rec if r.get("tokens")]
        lr = [(r["tokens"], r["lr"]) for r in records[0] if r.get("lr") is not None]
        if lr:  # earlier configurations drawn wider, so equal schedules show as nested lines
            extra = 0.0 if is_base else 2.5 * (len(summaries) - 1 - i) / max(len(summaries) - 1, 1)
            wide = dict(style, lw=style["lw"] + extra)
            lr_ax.plot([t for t, _ in lr], [v for _, v in lr], **wide)
            lrs += [v for _, v in lr if v > 0]
    every = "/".join(str(n) for n in sorted(log_every)) or "?"
    smoothed = (f", moving mean of {'/'.join(str(w) for w in sorted(windows))} logs" if windows - {1} else "")
    logged = "every update" if every == "1" else f"mean over each log window of {every} updates"
    train_ax.set_title(f"train loss ({logged}{smoothed})", fontsize=9)
    train_ax.set_ylabel("train loss")
    eval_ax.set_title("eval loss" + (" (bars of one eval set apart)" if len(summaries) > 1 else ""),
                      fontsize=9)
    eval_ax.set_ylabel("eval loss")
    lr_ax.set_title("learning rate (first parameter group; equal schedules nest)", fontsize=9)
    lr_ax.set_ylabel("lr")
    if lrs and max(lrs) / min(lrs) > 30:
        lr_ax.set_yscale("log")
    for ax in (train_ax, eval_ax, lr_ax):
        _token_axis(ax)
        ax.grid(alpha=0.3)
    if seen:
        train_ax.set_xlim(0, max(seen) * 1.03)  # the three panels share it
    n_seeds, seeds = _seeds(summaries)
    spread = (f"lines: mean over {seeds}; band and error bars: ± sample std" if n_seeds > 1
              else f"one run each ({seeds})")
    fig.suptitle(f"{title}: {spread}", fontsize=10)
    handles, labels = train_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.04 * math.ceil(len(labels) / 4)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
