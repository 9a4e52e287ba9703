"""The Adafactor core against transformers' and torch's Adafactor where their settings coincide, and against a
written-out reference of the paper's formulas where they do not (GaLore-Adafactor on a projected core)."""
from __future__ import annotations

import math

import pytest
import torch

from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import AdafactorOptions, GaloreOptions

from stepping import stepped

SHAPES = [(12, 20), (20, 12), (9,), (3, 4, 5)]


def problem(steps=8, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * (0.5 + t % 3) for s in shapes] for t in range(steps)]
    return weights, grads


def run(make, weights, grads, lrs=None):
    """The weights after one update per entry of `grads` (with `lrs`: an lr schedule, lowmem's `stepped`)."""
    return stepped(make, weights, grads, lrs)[0]


HF_CASES = {
    # the paper's defaults: relative step, parameter scaling, no first moment
    "paper": (dict(), dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False)),
    "warmup_init": (dict(warmup_init=True), dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True)),
    # the GaLore benchmark: external constant lr, no relative step, no parameter scaling, a first moment
    "galore_benchmark": (dict(lr=0.01, relative_step=False, scale_parameter=False, betas=(0.9, 0.999)),
                         dict(lr=0.01, relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9)),
    "decay_clip": (dict(lr=0.02, relative_step=False, scale_parameter=True, weight_decay=0.1, clip_threshold=0.5),
                   dict(lr=0.02, relative_step=False, scale_parameter=True, warmup_init=False, weight_decay=0.1,
                        clip_threshold=0.5)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_transformers_adafactor_at_a_constant_lr(case):
    from transformers.optimization import Adafactor

    ours_kwargs, hf_kwargs = HF_CASES[case]
    weights, grads = problem()
    ours = run(lambda ps: PipelineOptimizer([{"params": ps}], AdafactorOptions(**ours_kwargs)), weights, grads)
    theirs = run(lambda ps: Adafactor(ps, **hf_kwargs), weights, grads)
    for a, b, w in zip(ours, theirs, weights):
        assert (b - w).abs().max() > 1e-5  # they moved (warmup_init moves by 1e-6 * t per update)
        torch.testing.assert_close(a - w, b - w, atol=5e-7, rtol=1e-5)  # atol: rounding of weights near 1


def test_matches_torch_adafactor_where_the_settings_coincide():
    """torch.optim.Adafactor always uses the relative step, capped at its lr (1e-2 = the paper's cap), and
    parameter scaling, without a first moment; its eps1 clamps where the paper adds 1e-30 (no difference
    on these gradients)."""
    weights, grads = problem(steps=10)
    ours = run(lambda ps: PipelineOptimizer([{"params": ps}], AdafactorOptions()), weights, grads)
    theirs = run(lambda ps: torch.optim.Adafactor(ps, lr=1e-2), weights, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def reference_galore_adafactor(w, grads, rank, gap, scale, lr, beta1, eps1=1e-30, eps2=1e-3, clip=1.0):
    """GaLore-Adafactor from the formulas: P = top-`rank` singular vectors of the smaller side of G
    (refreshed every `gap` updates), R = P^T G (or G P for a tall weight), Adafactor on R with the factored
    second moment and the step scaled by the full weight's RMS (scale_parameter, no relative step), then
    W -= lr * scale * P U."""
    w = w.clone()
    m_rows, n_cols = w.shape
    tall = m_rows >= n_cols
    row = col = m = None
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = vh[:rank].T if tall else u[:, :rank]  # basis of the smaller side
        r = (p.T @ g.T) if tall else (p.T @ g)  # rank x larger side
        beta2 = 1 - t ** -0.8
        sq = r * r + eps1
        row_mean, col_mean = sq.mean(dim=1), sq.mean(dim=0)
        row = row_mean if row is None else beta2 * row + (1 - beta2) * row_mean
        col = col_mean if col is None else beta2 * col + (1 - beta2) * col_mean
        v_hat = torch.outer(row, col) / row.mean()
        update = r / v_hat.sqrt()
        update = update / max(1.0, float(update.pow(2).mean().sqrt()) / clip)
        update = update * max(eps2, float(w.pow(2).mean().sqrt()))
        m = (1 - beta1) * update if m is None else beta1 * m + (1 - beta1) * update
        back = (p @ m).T if tall else p @ m
        w = w - lr * scale * back
    return w


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["wide", "tall"])
def test_galore_adafactor_matches_the_written_out_formulas(shape):
    weights, grads = problem(steps=7, shapes=[shape])
    options = GaloreOptions(rank=4, update_gap=3, core="adafactor", scale_parameter=True, lr=0.05,
                            betas=(0.9, 0.999))
    ours = run(lambda ps: PipelineOptimizer([{"params": ps, "projected": True}], options), weights, grads)
    expected = reference_galore_adafactor(weights[0], [g[0] for g in grads], rank=4, gap=3, scale=0.25, lr=0.05,
                                          beta1=0.9)
    torch.testing.assert_close(ours[0], expected, atol=1e-6, rtol=1e-5)


def test_factored_state_is_rows_plus_columns():
    weights, grads = problem(steps=1, shapes=[(64, 96)])
    params = [torch.nn.Parameter(weights[0].clone())]
    opt = PipelineOptimizer([{"params": params}], AdafactorOptions())
    params[0].grad = grads[0][0]
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg_sq_row"].shape == (64,) and state["exp_avg_sq_col"].shape == (96,)
    assert "exp_avg" not in state and "exp_avg_sq" not in state
    assert opt.expected_state_bytes() == 4 * (64 + 96)
    assert math.isclose(opt.expected_state_bytes() / (2 * 4 * 64 * 96), (64 + 96) / (2 * 64 * 96))


def warmup_cosine(peak: float, steps: int, warmup: int = 3) -> list[float]:
    return [peak * (t + 1) / warmup if t < warmup else
            peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))) for t in range(steps)]


def test_lr_in_first_moment_matches_transformers_adafactor_under_a_schedule():
    """transformers folds the lr into U before the first moment: with lr_in_first_moment so do we, exactly;
    without it the two part ways once the lr changes (the default keeps lr outside the moment, as Adam)."""
    from transformers.optimization import Adafactor

    weights, grads = problem(steps=12)
    lrs = warmup_cosine(0.02, 12)
    common = dict(relative_step=False, scale_parameter=False, betas=(0.9, 0.999), weight_decay=0.1)
    theirs = run(lambda ps: Adafactor(ps, lr=0.02, relative_step=False, scale_parameter=False,
                                                warmup_init=False, beta1=0.9, weight_decay=0.1), weights, grads, lrs)
    folded = run(lambda ps: PipelineOptimizer([{"params": ps}], AdafactorOptions(
        lr=0.02, lr_in_first_moment=True, **common)), weights, grads, lrs)
    outside = run(lambda ps: PipelineOptimizer([{"params": ps}], AdafactorOptions(lr=0.02, **common)),
                            weights, grads, lrs)
    for a, b, c, w in zip(folded, theirs, outside, weights):
        torch.testing.assert_close(a - w, b - w, atol=1e-6, rtol=1e-5)
        assert (c - b).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)], ids=["wide", "tall"])
def test_galore_adafactor_matches_galore_torch_with_weight_decay_and_a_schedule(shape):
    """galore-torch's GaLoreAdafactor (the released code): SVD projection, Adafactor on the core with the lr
    folded into its first moment, weight decay before the step; the benchmark's settings."""
    from galore_torch import GaLoreAdafactor

    weights, grads = problem(steps=12, shapes=[shape])
    lrs = warmup_cosine(0.01, 12)
    theirs = run(lambda ps: GaLoreAdafactor(
        [{"params": ps, "rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}], lr=0.01,
        relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9, weight_decay=0.1),
        weights, grads, lrs)
    options = GaloreOptions(rank=4, update_gap=5, core="adafactor", lr=0.01, betas=(0.9, 0.999), weight_decay=0.1,
                            lr_in_first_moment=True)
    ours = run(lambda ps: PipelineOptimizer([{"params": ps, "projected": True}], options),
                         weights, grads, lrs)
    assert (theirs[0] - weights[0]).abs().max() > 1e-3
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-5)


def test_lr_in_first_moment_is_an_adafactor_option():
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer.lr_in_first_moment: applies to core adafactor; this "
                                          "optimizer's core is adam"):
        GaloreOptions(lr_in_first_moment=True).validate()
