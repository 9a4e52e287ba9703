"""Optimizer-step time and state bytes of each projection preset, relative to torch AdamW, on llama_60m's
weight shapes (8 layers of q,k,v,o 512x512, gate,up 1376x512, down 512x1376; embeddings and head
32000x512 on the dense fallback). Also our galore preset against galore-torch's GaLoreAdamW.

Step time is amortized over update_gap 200: refresh and ordinary steps are timed separately (the refresh
one by running with update_gap 1) and combined as (refresh + 199 * ordinary) / 200.

    python benchmarks/bench_projection.py [--layers 8] [--repeats 2] [--threads N]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from lowmem.optim import optimizer_state_bytes
from lowmem.optim.presets import FiraOptions, FrugalOptions, GaloreOptions, OSDOptions
from lowmem.optim.pipeline import PipelineOptimizer

GAP = 200
HIDDEN, INTERMEDIATE, VOCAB = 512, 1376, 32000


def llama_60m_params(layers: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]
    projected = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _ in range(layers) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.02) for _ in range(2)]
    dense += [torch.nn.Parameter(torch.ones(HIDDEN)) for _ in range(2 * layers + 1)]
    for p in projected + dense:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return projected, dense


def time_steps(opt: torch.optim.Optimizer, repeats: int) -> float:
    opt.step()  # first step: state allocation and the first refresh
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - start) / repeats


def ours(options_cls, **overrides):
    def build(projected, dense, gap):
        return PipelineOptimizer([{"params": projected, "projected": True}, {"params": dense}],
                             options_cls(update_gap=gap, **{"rank": 128, **overrides}))
    return build


def galore_torch_build(projected, dense, gap):
    from galore_torch import GaLoreAdamW

    return GaLoreAdamW([{"params": dense}, {"params": projected, "rank": 128, "update_proj_gap": gap,
                                            "scale": 0.25, "proj_type": "std"}], lr=0.01,
                       no_deprecation_warning=True)


CASES = {
    "galore (svd)": ours(GaloreOptions),
    "galore (randomized_svd)": ours(GaloreOptions, projector="randomized_svd"),
    "galore (random)": ours(GaloreOptions, projector="random"),
    "galore (dct)": ours(GaloreOptions, projector="dct"),
    "fira (svd)": ours(FiraOptions),
    "fira (randomized_svd)": ours(FiraOptions, projector="randomized_svd"),
    "frugal (blocks)": ours(FrugalOptions),
    "frugal (svd)": ours(FrugalOptions, projector="svd"),
    "osd (online_pca)": ours(OSDOptions),
    "galore-torch GaLoreAdamW": galore_torch_build,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    projected, dense = llama_60m_params(args.layers)
    params = sum(p.numel() for p in projected + dense)
    print(f"llama_60m shapes, {args.layers} layers, {params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")

    adamw = torch.optim.AdamW(projected + dense, lr=1e-3)
    adamw_time = time_steps(adamw, args.repeats)
    adamw_bytes = optimizer_state_bytes(adamw)
    del adamw
    print(f"torch AdamW: {adamw_time * 1e3:.1f} ms/step, state {adamw_bytes / 2**20:.1f} MiB")
    print(f"{'optimizer':26s} {'ordinary ms':>11s} {'refresh ms':>10s} {'amortized ms':>12s} "
          f"{'time/AdamW':>10s} {'state/AdamW':>11s}")
    results = {}
    for name, build in CASES.items():
        opt = build(projected, dense, GAP)
        ordinary = time_steps(opt, args.repeats)
        state = optimizer_state_bytes(opt) if isinstance(opt, PipelineOptimizer) else None
        del opt
        opt = build(projected, dense, 1)
        refresh = time_steps(opt, args.repeats)
        del opt
        amortized = (refresh + (GAP - 1) * ordinary) / GAP
        results[name] = amortized
        state_text = f"{state / adamw_bytes:11.3f}" if state is not None else f"{'-':>11s}"
        print(f"{name:26s} {ordinary * 1e3:11.1f} {refresh * 1e3:10.1f} {amortized * 1e3:12.1f} "
              f"{amortized / adamw_time:10.2f} {state_text}")
    ratio = results["galore (svd)"] / results["galore-torch GaLoreAdamW"]
    print(f"ours galore / galore-torch amortized step time: {ratio:.2f} (target <= 1)")


if __name__ == "__main__":
    main()
