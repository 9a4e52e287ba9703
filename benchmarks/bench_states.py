"""Optimizer state bytes per parameter and step time of every registered optimizer x state_dtype, on llama_60m's
weight shapes (58.1M parameters: 8 layers of q,k,v,o 512x512, gate,up 1376x512, down 512x1376, embeddings and
head 32000x512 on each optimizer's dense path), against torch AdamW (foreach) and bitsandbytes' AdamW8bit,
all measured in one run. Projected presets use rank 128 (the papers' 60M setting).

State bytes are counted tensor by tensor after the first update (which holds every weight's state).
Step time is the mean of `--repeats` ordinary updates after that first one (no projector refresh: the
refresh cost is bench_step.py's subject).

    python benchmarks/bench_states.py [--layers 8] [--repeats 2] [--only galore,adamw8bit] [--threads N]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from bench_step import llama_60m_params
from lowmem.optim import OPTIMIZERS, optimizer_state_bytes
from lowmem.optim.adamw import TorchAdamW
from lowmem.optim.registry import parse_optimizer_options

STATE_DTYPES = ("auto", "fp32", "bf16", "int8", "int4")
RANK = 128


def cases(only: set[str] | None) -> list[dict]:
    """Every registered optimizer with each state_dtype it accepts (the registry decides, not this list)."""
    from lowmem.errors import ConfigError

    found = []
    for name in sorted(OPTIMIZERS):
        if only and name not in only:
            continue
        base = {"name": name}
        if OPTIMIZERS[name].options().reads("rank"):  # not blocks (frugal), not the dense presets
            base["rank"] = RANK
        dtypes = STATE_DTYPES if "state_dtype" in OPTIMIZERS[name].options.__dataclass_fields__ else (None,)
        for dtype in dtypes:
            tree = dict(base, **({"state_dtype": dtype} if dtype else {}))
            try:
                parse_optimizer_options(tree)
            except ConfigError:
                continue
            found.append(tree)
    found.append({"name": "galore", "rank": RANK, "projector": "random", "state_dtype": "int4"})
    return found


def build(tree: dict, projected: list, dense: list) -> torch.optim.Optimizer:
    options = parse_optimizer_options(tree)
    groups = [{"params": projected, "projected": True, "weight_decay": 0.0},
              {"params": dense, "weight_decay": 0.0}]
    return OPTIMIZERS[options.name].build(groups, options)


def timed(opt: torch.optim.Optimizer, repeats: int) -> float:
    opt.step()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - start) / repeats


def label(tree: dict) -> str:
    extra = [f"{k}={v}" for k, v in tree.items() if k not in ("name", "rank", "state_dtype")]
    return " ".join([tree["name"], *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    projected, dense = llama_60m_params(args.layers)
    params = projected + dense
    numel = sum(p.numel() for p in params)
    print(f"llama_60m shapes, {args.layers} layers, {numel / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")

    snapshot = [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)

    adamw = TorchAdamW(params, lr=1e-3, foreach=True)
    adamw_time = timed(adamw, args.repeats)
    adamw_bytes = optimizer_state_bytes(adamw)
    del adamw
    restore()
    bnb = build({"name": "bnb_adamw8bit"}, projected, dense)
    bnb_time = timed(bnb, args.repeats)
    del bnb
    restore()
    print(f"torch AdamW (foreach): {adamw_time * 1e3:.0f} ms/step, state {adamw_bytes / 2**20:.1f} MiB "
          f"({adamw_bytes / numel:.2f} B/param); bnb AdamW8bit: {bnb_time * 1e3:.0f} ms/step")
    print(f"| optimizer | state_dtype | state MiB | bytes/param | state / AdamW | ms/step | time / AdamW | "
          f"time / bnb8bit |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {}
    for tree in cases(set(args.only.split(",")) if args.only else None):
        opt = build(tree, projected, dense)
        seconds = timed(opt, args.repeats)
        state = optimizer_state_bytes(opt)
        del opt
        restore()
        ratios[(label(tree), tree.get("state_dtype"))] = state / adamw_bytes
        print(f"| {label(tree)} | {tree.get('state_dtype', '-')} | {state / 2**20:.1f} | {state / numel:.3f} | "
              f"{state / adamw_bytes:.3f} | {seconds * 1e3:.0f} | {seconds / adamw_time:.2f} | "
              f"{seconds / bnb_time:.2f} |", flush=True)
    for key, target in ((("adamw8bit", "int8"), 0.26), (("galore", "int4"), 0.12),
                        (("galore projector=random", "int4"), 0.09)):
        if key in ratios:
            verdict = "met" if ratios[key] <= target else "MISSED"
            print(f"target {key[0]} {key[1]}: state / AdamW {ratios[key]:.3f} (<= {target}: {verdict})")


if __name__ == "__main__":
    main()
