"""One optimizer step of every registered optimizer on llama_60m's weight shapes, against torch's fused AdamW.

Shapes: `--layers` layers (8 in llama_60m) of q, k, v, o 512x512, gate, up 1376x512 and down 512x1376, projected
by the projection presets; the embeddings and the head, 32000x512, and the norms on every optimizer's dense path.
Baseline: torch.optim.AdamW(fused=True), the fastest step torch offers on CPU; AdamW(foreach=True) for reference.
Rows: our pipeline's dense fp32 AdamW (`adamw`), every other name in lowmem.optim.OPTIMIZERS (the registry
decides the list), and galore-torch's GaLoreAdamW when it is installed. Every optimizer steps its own copy of
the weights from the same gradients, with the registry's defaults (weight decay 0, rank 128 = a quarter of 512).

Timing: the optimizers step in turns, round after round, and each one's median over `--rounds` is reported, so
drifting machine load hits all of them alike. Ordinary steps (no projector refresh: update_gap beyond the run)
and refresh steps (update_gap 1: every step refreshes) are timed separately and combined into the amortized
step at update_gap `--gap` (200), (refresh + (gap - 1) ordinary) / gap. The first step of each optimizer, timed
apart, holds its state allocation, its first refresh and any kernel build (the quantized moments' CPU kernel is
built afresh into a temporary cache here, so its compile time shows in that column).

Floor: what an ordinary step costs at least on this machine: its GEMM FLOPs (counted with torch's
FlopCounterMode over one ordinary step) at the GEMM rate torch.matmul reaches on the projection shapes, plus its
element-wise bytes at the bandwidth of a tensor copy (its destination counted twice: the cache fetches its lines
before writing them, as an in-place step's reads do), both measured in the same run, three times in each round
of the steps, the best rate seen taken.
Element-wise bytes: weights read and written, gradients read (12 bytes a parameter), and every state tensor read
and written once (2 x the state bytes; a projector's basis, only read, is counted twice). time/floor is the
ordinary step over that floor; every ratio "/fused" is over torch's fused AdamW's ordinary step.

    python benchmarks/bench_step.py [--layers 8] [--rounds 5] [--threads N] [--presets galore,adamw8bit] [--json out.json]
    python benchmarks/bench_step.py --profile galore   # where an ordinary step's time goes (torch profiler)

The machine may be shared (other processes change the figures by tens of percent between runs): compare rows of
one run, not runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from lowmem.optim import OPTIMIZERS, optimizer_state_bytes
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import DenseOptions

HIDDEN, INTERMEDIATE, VOCAB = 512, 1376, 32000
RANK = 128
NEVER = 10 ** 9  # an update_gap no run reaches: every step after the first is an ordinary one
BASELINE = "torch_fused"
ELEMENTWISE_BYTES = 12  # per parameter: the weight read and written, the gradient read (fp32)


def llama_60m_params(layers: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(projected weights, dense weights) with fixed random values and gradients."""
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
    projected = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _ in range(layers) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.02) for _ in range(2)]
    dense += [torch.nn.Parameter(torch.ones(HIDDEN)) for _ in range(2 * layers + 1)]
    for p in projected + dense:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return projected, dense


# ---------------------------------------------------------------------------------------------------------
# The optimizers


Builder = Callable[[list, list, int], torch.optim.Optimizer]


def _registered(name: str) -> tuple[Builder, bool]:
    entry = OPTIMIZERS[name]
    projects = bool(getattr(entry.options(), "projects", False))

    def build(projected, dense, gap):
        options = entry.options(update_gap=gap) if projects else entry.options()
        return entry.build([{"params": projected, "projected": True}, {"params": dense}], options)

    return build, projects


def _galore_torch(projected, dense, gap):
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW([{"params": dense}, {"params": projected, "rank": RANK, "update_proj_gap": gap,
                                            "scale": 0.25, "proj_type": "std"}], lr=1e-3,
                       weight_decay=0.0, no_deprecation_warning=True)


def optimizers() -> dict[str, tuple[Builder, bool]]:
    """name -> (builder(projected, dense, update_gap), whether it refreshes a projector)."""
    found: dict[str, tuple[Builder, bool]] = {
        "torch_fused": (lambda p, d, gap: torch.optim.AdamW(p + d, lr=1e-3, weight_decay=0.0, fused=True), False),
        "torch_foreach": (lambda p, d, gap: torch.optim.AdamW(p + d, lr=1e-3, weight_decay=0.0, foreach=True),
                          False),
        # the registry's "adamw" is torch's AdamW itself: the pipeline's dense fp32 AdamW instead
        "adamw": (lambda p, d, gap: PipelineOptimizer([{"params": p + d}], DenseOptions()), False),
    }
    for name in sorted(OPTIMIZERS):
        if name != "adamw":
            found[name] = _registered(name)
    try:
        import galore_torch  # noqa: F401
        found["galore_torch"] = (_galore_torch, True)
    except ImportError:
        pass
    return found


# ---------------------------------------------------------------------------------------------------------
# Machine rates, measured in turns with the steps


def gemm_seconds() -> tuple[Callable[[], float], float]:
    """A function timing the projection GEMMs of one layer (P^T G, r x b by b x a, and P D, b x r by r x a, for
    each projected shape), and their FLOPs."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for b, a in ((HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE)):
        basis, grad = torch.randn(b, RANK, generator=g), torch.randn(b, a, generator=g)
        core = torch.randn(RANK, a, generator=g)
        cases.append((basis, grad, core, torch.empty(RANK, a), torch.empty(b, a)))
    counts = (4, 3)  # per layer: q, k, v, o are 512 x 512; gate, up, down have 512 x 1376 canonical gradients
    flops = sum(n * 2 * 2 * RANK * grad.numel() for n, (_, grad, *_) in zip(counts, cases))

    def run() -> float:
        start = time.perf_counter()
        for n, (basis, grad, core, projected, back) in zip(counts, cases):
            for _ in range(n):
                torch.matmul(basis.T, grad, out=projected)
                torch.matmul(basis, core, out=back)
        return time.perf_counter() - start

    return run, flops


def copy_seconds() -> tuple[Callable[[], float], int]:
    """A function timing one copy of a 32000 x 512 fp32 tensor into another, and the bytes it moves: the source
    read, the destination written and read before (its cache lines are fetched before they are written: the
    read an in-place step makes anyway, so this is the rate its reads and writes go at)."""
    src, dst = torch.randn(VOCAB, HIDDEN), torch.empty(VOCAB, HIDDEN)
    dst.copy_(src)

    def run() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    return run, 3 * src.numel() * src.element_size()


# ---------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    name: str
    projects: bool
    ordinary: list[float] = field(default_factory=list)
    refresh: list[float] = field(default_factory=list)
    first: Optional[float] = None
    refresh_first: Optional[float] = None
    gemm_flops: float = 0.0
    state_bytes: int = 0
    params: int = 0

    def median(self, kind: str) -> Optional[float]:
        values = getattr(self, kind)
        return statistics.median(values) if values else None

    def amortized(self, gap: int) -> Optional[float]:
        ordinary, refresh = self.median("ordinary"), self.median("refresh")
        if ordinary is None or not self.projects:
            return ordinary
        if refresh is None:
            return None
        return (refresh + (gap - 1) * ordinary) / gap

    def moved_bytes(self) -> int:
        return ELEMENTWISE_BYTES * self.params + 2 * self.state_bytes

    def floor(self, gemm_rate: float, bandwidth: float) -> float:
        return self.gemm_flops / gemm_rate + self.moved_bytes() / bandwidth


def own_copies(projected, dense):
    """Copies of the weights that read the same gradients."""
    mine = [torch.nn.Parameter(p.detach().clone()) for p in projected], [torch.nn.Parameter(p.detach().clone())
                                                                         for p in dense]
    for p, q in zip(mine[0] + mine[1], projected + dense):
        p.grad = q.grad
    return mine


def timed_step(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def _inplace_product_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """addmm_ / baddbmm_, which FlopCounterMode's table lacks (it has addmm and baddbmm)."""
    batch = a_shape[0] if len(a_shape) == 3 else 1
    return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


def counted_flops(opt: torch.optim.Optimizer) -> float:
    """GEMM FLOPs of one step (FlopCounterMode counts matrix products; element-wise work counts nothing)."""
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={aten.addmm_: _inplace_product_flops,
                                                             aten.baddbmm_: _inplace_product_flops})
    with counter:
        opt.step()
    return float(counter.get_total_flops())


def measure(names: list[str], builders, projected, dense, rounds: int,
            refresh_rounds: int) -> tuple[dict[str, Row], float, float]:
    gemm, gemm_flops = gemm_seconds()
    copy, copy_bytes = copy_seconds()
    gemm(), copy()
    gemm_times, copy_times = [], []
    rows = {name: Row(name, builders[name][1]) for name in names}
    copies = {name: own_copies(projected, dense) for name in names}
    built = {}
    for name in names:
        opt = builders[name][0](*copies[name], NEVER)
        rows[name].first = timed_step(opt)  # state allocation, the first refresh, a kernel build
        rows[name].gemm_flops = counted_flops(opt)  # an ordinary step, untimed
        rows[name].state_bytes = optimizer_state_bytes(opt)
        rows[name].params = sum(p.numel() for p in copies[name][0] + copies[name][1])
        built[name] = opt
    for _ in range(rounds):
        gemm_times += [gemm() for _ in range(3)]
        copy_times += [copy() for _ in range(3)]
        for name, opt in built.items():
            rows[name].ordinary.append(timed_step(opt))
    del built
    refreshing = {}
    for name in names:
        if rows[name].projects and refresh_rounds:
            opt = builders[name][0](*copies[name], 1)
            rows[name].refresh_first = timed_step(opt)
            refreshing[name] = opt
    for _ in range(refresh_rounds):
        for name, opt in refreshing.items():
            rows[name].refresh.append(timed_step(opt))
    return rows, gemm_flops / min(gemm_times), copy_bytes / min(copy_times)  # the best rates: a floor stays a floor


# ---------------------------------------------------------------------------------------------------------
# Reporting


def table(rows: dict[str, Row], gap: int, gemm_rate: float, bandwidth: float) -> list[str]:
    base = rows[BASELINE].median("ordinary")
    base_amortized = rows[BASELINE].amortized(gap)

    def ms(value: Optional[float]) -> str:
        return f"{value * 1e3:.1f}" if value is not None else "-"

    def ratio(value: Optional[float], over: Optional[float]) -> str:
        return f"{value / over:.2f}" if value is not None and over else "-"

    lines = [f"| optimizer | ordinary ms | /fused | refresh ms | amortized ms (gap {gap}) | /fused | first step s "
             f"| GEMM GFLOP | MB moved | floor ms | time/floor | state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        ordinary, amortized = row.median("ordinary"), row.amortized(gap)
        floor = row.floor(gemm_rate, bandwidth)
        lines.append(f"| {row.name} | {ms(ordinary)} | {ratio(ordinary, base)} | {ms(row.median('refresh'))} "
                     f"| {ms(amortized)} | {ratio(amortized, base_amortized)} | {row.first:.2f} "
                     f"| {row.gemm_flops / 1e9:.2f} | {row.moved_bytes() / 1e6:.0f} | {ms(floor)} "
                     f"| {ratio(ordinary, floor)} | {row.state_bytes / 2 ** 20:.1f} |")
    return lines


def profile(name: str, builders, projected, dense) -> None:
    opt = builders[name][0](*own_copies(projected, dense), NEVER)
    opt.step()
    opt.step()
    with torch.profiler.profile() as prof:
        for _ in range(2):
            opt.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed ordinary steps of each optimizer")
    parser.add_argument("--refresh-rounds", type=int, default=2, help="timed refresh steps of each projecting one")
    parser.add_argument("--gap", type=int, default=200, help="update_gap the amortized step assumes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--presets", default=None,
                        help="comma-separated optimizers besides the torch baselines (default: all)")
    parser.add_argument("--profile", default=None, help="profile one optimizer's ordinary step instead")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    builders = optimizers()
    projected, dense = llama_60m_params(args.layers)
    if args.profile:
        profile(args.profile, builders, projected, dense)
        return
    chosen = args.presets.split(",") if args.presets else [n for n in builders if not n.startswith("torch_")]
    unknown = [n for n in chosen if n not in builders]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(builders)}")
    names = ["torch_fused", "torch_foreach", *[n for n in chosen if not n.startswith("torch_")]]
    cache = tempfile.mkdtemp(prefix="lowmem-bench-kernels-")
    os.environ["LOWMEM_KERNEL_CACHE"] = cache  # kernels built afresh: their build time shows in the first step
    try:
        rows, gemm_rate, bandwidth = measure(names, builders, projected, dense, args.rounds, args.refresh_rounds)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    total = sum(p.numel() for p in projected + dense)
    print(f"llama_60m shapes, {args.layers} layers, {total / 1e6:.1f}M parameters, {torch.get_num_threads()} "
          f"threads, median of {args.rounds} rounds (refresh: {args.refresh_rounds})")
    fused = rows[BASELINE]
    print(f"measured in the same run: GEMM {gemm_rate / 1e9:.0f} GFLOP/s (projection shapes, rank {RANK}), "
          f"copy {bandwidth / 1e9:.1f} GB/s ({bandwidth / 1.5e9:.1f} GB/s counting source and destination once); "
          f"torch's fused AdamW moves its bytes at "
          f"{fused.moved_bytes() / fused.median('ordinary') / 1e9:.1f} GB/s")
    print()
    print("\n".join(table(rows, args.gap, gemm_rate, bandwidth)))
    if args.json:
        out = {"layers": args.layers, "threads": torch.get_num_threads(), "rounds": args.rounds,
               "gemm_flops_per_s": gemm_rate, "copy_bytes_per_s": bandwidth, "gap": args.gap,
               "optimizers": {name: {"ordinary_s": row.median("ordinary"), "refresh_s": row.median("refresh"),
                                     "amortized_s": row.amortized(args.gap), "first_step_s": row.first,
                                     "ordinary_rounds_s": row.ordinary, "refresh_rounds_s": row.refresh,
                                     "gemm_flops": row.gemm_flops, "moved_bytes": row.moved_bytes(),
                                     "floor_s": row.floor(gemm_rate, bandwidth), "state_bytes": row.state_bytes}
                              for name, row in rows.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
