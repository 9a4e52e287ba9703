"""Our galore preset against the published galore-torch GaLoreAdamW on identical gradients."""
from __future__ import annotations

import pytest
import torch

galore_torch = pytest.importorskip("galore_torch")

from lowmem.optim.presets import GaloreOptions  # noqa: E402
from lowmem.optim.pipeline import PipelineOptimizer  # noqa: E402


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_galore_adamw(weight_decay):
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 8), (8, 12), (10, 10)]
    start = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(6, generator=g)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    theirs = [torch.nn.Parameter(w.clone()) for w in start]
    rank, gap, scale, lr = 4, 3, 0.25, 0.01
    opt = PipelineOptimizer([{"params": ours[:3], "projected": True}, {"params": ours[3:]}],
                        GaloreOptions(rank=rank, update_gap=gap, scale=scale, lr=lr, weight_decay=weight_decay))
    ref = galore_torch.GaLoreAdamW([{"params": theirs[3:]},
                                    {"params": theirs[:3], "rank": rank, "update_proj_gap": gap, "scale": scale,
                                     "proj_type": "std"}], lr=lr, weight_decay=weight_decay,
                                   no_deprecation_warning=True)
    for _ in range(8):  # SVD refreshes at updates 0, 3, 6
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)
