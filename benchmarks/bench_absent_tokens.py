"""Largest |move| of an embedding element per update (x lr) and embedding drift from fp32 AdamW, for quantized
states on the absent-token problem of tests/test_absent_tokens.py (rare rows seen once with a tiny gradient).
Run: python benchmarks/bench_absent_tokens.py"""
import pathlib
import sys

import torch
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from test_absent_tokens import SmallLM, feed, build_optimizer, parse_optimizer_options
for tree in [{"name": "adamw8bit"}, {"name": "adamw", "state_dtype": "int4"}, {"name": "galore", "state_dtype": "int8"}]:
    torch.manual_seed(0); model = SmallLM()
    opt = build_optimizer(model, parse_optimizer_options(dict(tree, weight_decay=0.0)))
    torch.manual_seed(0); ref = SmallLM(); ropt = torch.optim.AdamW(ref.parameters(), lr=opt.param_groups[0]["lr"], weight_decay=0.0)
    lr = opt.param_groups[0]["lr"]; worst = []
    for step in range(10):
        b = model.embed.weight.detach().clone(); feed(model, step); opt.step(); feed(ref, step); ropt.step()
        worst.append(round(float((model.embed.weight.detach() - b).abs().max()) / lr, 1))
    drift = float((model.embed.weight - ref.embed.weight).norm())
    print(tree, "max |move|/lr per update:", worst, "embedding drift from fp32 AdamW: %.4f" % drift)
