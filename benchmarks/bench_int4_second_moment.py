"""How well each 4-bit normalization of the second moment keeps it: 128-element blocks (lowmem's default) or
rank-1 scales (min(row max, column max), the 4-bit-states paper's choice, `optimizer.int4_rank1: true`).

For two kinds of second moment, a heavy-tailed synthetic one (v = r_i c_j x the mean of 10 squared
Student-t(3) draws, rows and columns of log-normal scale) and AdamW's moments of a small LLaMA's matrices after
some updates (random tokens, no download), prints the median and mean relative error |v_hat - v| / v, the mean
relative error of the Adam denominator sqrt(v_hat) against sqrt(v), and the bytes each normalization stores.
The perplexity side of the choice: configs/studies/low_bit_states.yaml with optimizer.int4_rank1 on and off.

    python benchmarks/bench_int4_second_moment.py [--updates 30]
"""
from __future__ import annotations

import argparse

import torch

from lowmem.optim.state.storage import QuantizedStorage


def synthetic(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(torch.randn(rows, 1, generator=g) * 0.5)
    col_scale = torch.exp(torch.randn(1, cols, generator=g) * 0.5)
    t = torch.distributions.StudentT(3.0).sample((10, rows, cols))  # an average of squares, as an EMA is
    return (row_scale * col_scale * (t * t).mean(dim=0) * 1e-6).float()


def trained_moments(updates: int) -> dict[str, torch.Tensor]:
    """AdamW's second moments of the 2-D weights of a small LLaMA after `updates` updates on random tokens of
    the embedded corpus's vocabulary size (the shapes and statistics of a real run, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=4096))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 4096, (8, 128))
    tokens[:, ::7] = tokens[:, :1]  # some structure to learn
    for _ in range(updates):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {name: opt.state[p]["exp_avg_sq"].clone() for name, p in model.named_parameters()
            if p.dim() == 2 and p.numel() >= 4096}


def errors(v: torch.Tensor, rank1: bool) -> tuple[float, float, float, int]:
    storage = QuantizedStorage("int4", rank1_second_moment=rank1)
    state: dict = {}
    storage.write(state, "exp_avg_sq", v, "unsigned")
    back = storage.read(state, "exp_avg_sq", v.shape, "unsigned")
    positive = v > 0
    rel = ((back - v).abs() / v)[positive]
    denom = ((back.sqrt() - v.sqrt()).abs() / v.sqrt())[positive]
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return float(rel.median()), float(rel.mean()), float(denom.mean()), nbytes


def report(label: str, moments: dict[str, torch.Tensor]) -> None:
    print(f"\n{label}")
    print(f"{'normalization':<16}{'median rel err v':>18}{'mean rel err v':>16}{'mean rel err sqrt(v)':>22}"
          f"{'bytes':>12}")
    for name, rank1 in (("blocks of 128", False), ("rank-1", True)):
        rows = [errors(v, rank1) for v in moments.values()]
        weights = [v.numel() for v in moments.values()]
        total = sum(weights)
        med, mean, denom = (sum(r[i] * w for r, w in zip(rows, weights)) / total for i in range(3))
        print(f"{name:<16}{med:>18.3f}{mean:>16.3f}{denom:>22.3f}{sum(r[3] for r in rows):>12,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=30)
    args = parser.parse_args()
    report("synthetic heavy-tailed second moment, 512 x 1376", {"v": synthetic(512, 1376)})
    report(f"AdamW second moments of a small LLaMA's matrices after {args.updates} updates (element-weighted)",
           trained_moments(args.updates))


if __name__ == "__main__":
    main()
