"""Quantized optimizer states on the absent-token problem: how far an embedding element moves per update, and
how far the embeddings drift from fp32 AdamW's.

The model and batches are tests/optim/test_absent_tokens.py's: a small LM in which some token rows are seen once, with
a tiny gradient, and are then absent from every batch. Adam moves an element by about lr per update at most
(bias-corrected), so the largest |move| / lr per update should stay near 1; a second moment stored as 0 beside a
non-zero first moment moves it by m / eps instead (hundreds of lr). Prints, per optimizer, the largest
|move| / lr of any embedding element in each of 10 updates and the Frobenius distance of its embeddings from
fp32 torch AdamW's after them (same init, same batches, same lr; GaLore's dense rule for embeddings keeps its
own Adam convention, eps 1e-6 outside the bias correction, so part of its drift is the convention, not the
storage).

    python benchmarks/bench_absent_tokens.py
"""
from __future__ import annotations

import pathlib
import sys

import torch

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS / "optim"), str(TESTS)]
from test_absent_tokens import SmallLM, build_optimizer, feed, parse_optimizer_options  # noqa: E402

OPTIMIZERS = [{"name": "adamw8bit"}, {"name": "adamw", "state_dtype": "int4"}, {"name": "galore", "state_dtype": "int8"}]
UPDATES = 10


def measure(tree: dict) -> tuple[list[float], float]:
    """(largest |move| / lr of an embedding element per update, embedding distance from fp32 AdamW)."""
    torch.manual_seed(0)
    model = SmallLM()
    opt = build_optimizer(model, parse_optimizer_options(dict(tree, weight_decay=0.0)))
    lr = opt.param_groups[0]["lr"]
    torch.manual_seed(0)
    reference = SmallLM()
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.0)
    moves = []
    for step in range(UPDATES):
        before = model.embed.weight.detach().clone()
        feed(model, step)
        opt.step()
        feed(reference, step)
        reference_opt.step()
        moves.append(float((model.embed.weight.detach() - before).abs().max()) / lr)
    return moves, float((model.embed.weight - reference.embed.weight).detach().norm())


def main() -> None:
    for tree in OPTIMIZERS:
        moves, drift = measure(tree)
        print(f"{tree}: largest |move| / lr per update {[round(m, 1) for m in moves]}; "
              f"embedding drift from fp32 AdamW {drift:.4f}")


if __name__ == "__main__":
    main()
