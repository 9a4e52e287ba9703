"""CPU optimizer-step time of each projection preset against torch AdamW(foreach=True), on llama_60m's weight
shapes (8 layers of q,k,v,o 512x512, gate,up 1376x512, down 512x1376 projected; embeddings and head 32000x512
and the norms on the dense path), measured side by side in one run.

Ordinary steps (between projector refreshes) and refresh steps are timed separately: a refresh runs an SVD per
weight (or draws a new block set), which no batching removes. The optimizers are timed in turns, round after
round, and each one's median is reported, so drifting machine load hits all of them alike.

    python benchmarks/bench_step.py [--layers 8] [--rounds 5] [--threads N] [--presets galore,fira]
    python benchmarks/bench_step.py --profile galore   # where an ordinary step's time goes (torch profiler)
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import FiraOptions, FrugalOptions, GaloreOptions, OSDOptions

HIDDEN, INTERMEDIATE, VOCAB = 512, 1376, 32000
GAP = 10 ** 9  # an update_gap no run reaches: every step after the first is an ordinary one
PRESETS: dict[str, Callable[..., object]] = {
    "galore": lambda gap: GaloreOptions(rank=128, update_gap=gap, kernels="torch"),
    "fira": lambda gap: FiraOptions(rank=128, update_gap=gap, kernels="torch"),
    "frugal": lambda gap: FrugalOptions(update_gap=gap, kernels="torch"),
    "osd": lambda gap: OSDOptions(rank=128, update_gap=gap, kernels="torch"),
}


def llama_60m_params(layers: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
    projected = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _ in range(layers) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.02) for _ in range(2)]
    dense += [torch.nn.Parameter(torch.ones(HIDDEN)) for _ in range(2 * layers + 1)]
    for p in projected + dense:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return projected, dense


def timed(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def build(name: str, projected, dense, gap: int) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(projected + dense, lr=1e-3, weight_decay=0.0, foreach=True)
    return PipelineOptimizer([{"params": projected, "projected": True}, {"params": dense}], PRESETS[name](gap))


def profile(name: str, projected, dense) -> None:
    opt = build(name, projected, dense, GAP)
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
    parser.add_argument("--refresh-rounds", type=int, default=1, help="timed refresh steps of each preset")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--profile", default=None, help="profile one preset's ordinary step instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    projected, dense = llama_60m_params(args.layers)
    if args.profile:
        profile(args.profile, projected, dense)
        return
    names = ["adamw", *args.presets.split(",")]
    total = sum(p.numel() for p in projected + dense)
    print(f"llama_60m shapes, {args.layers} layers, {total / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    # each optimizer steps its own copy of the weights (they all read the same gradients)
    copies = {}
    for name in names:
        mine = [torch.nn.Parameter(p.detach().clone()) for p in projected], [torch.nn.Parameter(p.detach().clone())
                                                                             for p in dense]
        for p, q in zip(mine[0] + mine[1], projected + dense):
            p.grad = q.grad
        copies[name] = mine
    optimizers = {name: build(name, *copies[name], GAP) for name in names}
    for opt in optimizers.values():
        opt.step()  # state allocation and the first refresh
        opt.step()
    ordinary: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, opt in optimizers.items():
            ordinary[name].append(timed(opt))
    del optimizers
    refresh: dict[str, list[float]] = {name: [] for name in names[1:]}
    refreshing = {name: build(name, *copies[name], 1) for name in names[1:]} if args.refresh_rounds else {}
    for opt in refreshing.values():
        opt.step()
    for _ in range(args.refresh_rounds):
        for name, opt in refreshing.items():
            refresh[name].append(timed(opt))
    base = statistics.median(ordinary["adamw"])
    print(f"{'optimizer':10s} {'ordinary ms':>11s} {'/AdamW':>7s} {'refresh ms':>10s}")
    print(f"{'adamw':10s} {base * 1e3:11.1f} {1.0:7.2f} {'-':>10s}")
    for name in names[1:]:
        step = statistics.median(ordinary[name])
        again = f"{statistics.median(refresh[name]) * 1e3:10.1f}" if refresh[name] else f"{'-':>10s}"
        print(f"{name:10s} {step * 1e3:11.1f} {step / base:7.2f} {again}")


if __name__ == "__main__":
    main()
