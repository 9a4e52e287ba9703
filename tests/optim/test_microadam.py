"""The MicroAdam core against a slow dense reimplementation of its window math: the last `window` sparse
gradients kept as dense vectors, truncated EMAs summed over them, and the 4-bit error feedback written out."""
from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import GaloreOptions, MicroAdamOptions

from stepping import stepped

B1, B2, EPS = 0.9, 0.999, 1e-8


def ef_round_trip(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """4-bit asymmetric quantization per bucket: min and max kept in bf16, 15 steps between them, rounding
    half up; returns the dequantized values."""
    out = torch.empty_like(x)
    for start in range(0, x.numel(), bucket):
        chunk = x[start:start + bucket]
        low = chunk.min().to(torch.bfloat16).float()
        high = chunk.max().to(torch.bfloat16).float()
        unit = (high - low) / 15
        codes = torch.floor((chunk - low) / unit + 0.5).clamp(0, 15) if unit > 0 else torch.zeros_like(chunk)
        out[start:start + bucket] = low + codes * unit
    return out


def reference_microadam(w, grads, lr, wd, window, k_init, block, bucket, value_dtype, alpha=0.0):
    w = w.clone().reshape(-1)
    d = w.numel()
    error = torch.zeros(d)
    history: list[torch.Tensor] = []
    for t, g in enumerate(grads, start=1):
        a = g.reshape(-1) + error
        kept = torch.zeros(d, dtype=torch.bool)
        for start in range(0, d, block):
            chunk = a[start:start + block]
            k = math.ceil(chunk.numel() * k_init)
            kept[start + chunk.abs().topk(k).indices] = True
        history = (history + [torch.where(kept, a.to(value_dtype).float(), torch.zeros(d))])[-window:]
        error = ef_round_trip(torch.where(kept, torch.zeros(d), a), bucket)
        m = sum(B1 ** age * h for age, h in enumerate(reversed(history)))
        v = sum(B2 ** age * h * h for age, h in enumerate(reversed(history)))
        c1, c2 = (1 - B1) / (1 - B1 ** t), (1 - B2) / (1 - B2 ** t)
        update = c1 * m / ((c2 * v).sqrt() + EPS)
        if alpha > 0:  # the released code's pretraining branch: alpha of the feedback joins the update
            update = update + alpha * error
            error = ef_round_trip((1 - alpha) * error, bucket)
        w = w * (1 - lr * wd) - lr * update
    return w


@pytest.mark.parametrize("alpha", [0.0, 0.1], ids=["sparse", "densified"])
@pytest.mark.parametrize("state_dtype, value_dtype", [("auto", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("shape", [(23, 10), (230,)], ids=["matrix", "vector"])
def test_matches_the_dense_window_reference(state_dtype, value_dtype, shape, alpha):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * (1 + t % 3) for t in range(9)]  # window 3 wraps twice
    options = MicroAdamOptions(lr=0.01, weight_decay=0.1, window=3, k_init=0.1, topk_block=50, ef_block=16,
                               state_dtype=state_dtype, ef_alpha=alpha)
    (weight,), opt = stepped(lambda params: PipelineOptimizer([{"params": params}], options), [w0],
                             [[grad] for grad in grads])
    expected = reference_microadam(w0, grads, 0.01, 0.1, 3, 0.1, 50, 16, value_dtype, alpha)
    torch.testing.assert_close(weight.reshape(-1), expected, atol=1e-6, rtol=0)
    state = opt.state[opt.param_groups[0]["params"][0]]
    # 5 blocks of 50 minus the last short one (30): 4 x ceil(5) + ceil(3) = 23 kept entries per update
    assert state["window_indices"].shape == (3, 23) and state["window_indices"].dtype == torch.int16
    assert state["window_values"].dtype == value_dtype
    assert state["ef_codes"].numel() == 115 and state["ef_min"].dtype == torch.bfloat16


def test_coordinates_outside_every_kept_set_do_not_move():
    """The sparse update: with k_init small, most coordinates are in none of the window's top-k sets and keep
    their value (no weight decay)."""
    p = torch.nn.Parameter(torch.randn(400))
    before = p.detach().clone()
    opt = PipelineOptimizer([{"params": [p]}], MicroAdamOptions(window=2, k_init=0.01, lr=0.1))
    kept = set()
    for row in range(2):
        p.grad = torch.randn(400)
        opt.step()
        kept |= set(opt.state[p]["window_indices"][row].long().tolist())  # one block: local = global index
    moved = set((p.detach() != before).nonzero().reshape(-1).tolist())
    assert moved == kept and len(moved) <= 8


def test_bf16_weights_and_a_projected_core():
    """MicroAdam also runs on bf16 weights and as the core of a projection (GaLore's R compressed)."""
    g = torch.Generator().manual_seed(1)
    mat = torch.nn.Parameter(torch.randn(32, 48, generator=g).to(torch.bfloat16))
    opt = PipelineOptimizer([{"params": [mat], "projected": True}],
                            GaloreOptions(rank=8, core="microadam", k_init=0.25, window=4))
    start = mat.detach().float().clone()
    for _ in range(5):
        mat.grad = torch.randn(32, 48, generator=g).to(torch.bfloat16)
        opt.step()
    assert mat.dtype == torch.bfloat16 and torch.isfinite(mat.float()).all()
    assert (mat.detach().float() - start).abs().max() > 0
    assert opt.state[mat]["window_values"].shape == (4, math.ceil(8 * 48 * 0.25))


def test_densified_update_moves_every_coordinate_the_sparse_one_leaves():
    """alpha > 0 (the released pretraining branch): coordinates in no kept set move too."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(400, generator=g)
    moved = {}
    for alpha in (0.0, 0.2):
        p = torch.nn.Parameter(w0.clone())
        opt = PipelineOptimizer([{"params": [p]}], MicroAdamOptions(lr=0.01, k_init=0.01, window=2, ef_alpha=alpha))
        for _ in range(2):
            p.grad = torch.randn(400, generator=g)
            opt.step()
        moved[alpha] = int((p.detach() != w0).sum())
    assert moved[0.0] <= 4 * 2 and moved[0.2] > 390


@pytest.mark.parametrize("options, message", [
    ({"name": "microadam", "ef_alpha": 1.0}, "optimizer.ef_alpha: MicroAdam's densification fraction"),
    ({"name": "galore", "ef_alpha": 0.1},
     "optimizer.ef_alpha: applies to core microadam; this optimizer's core is adam"),
])
def test_bad_densification_is_refused(options, message):
    from lowmem.errors import ConfigError
    from lowmem.optim.registry import parse_optimizer_options

    with pytest.raises(ConfigError, match=message):
        parse_optimizer_options(options)
