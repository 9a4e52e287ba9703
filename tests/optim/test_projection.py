"""Projection optimizers (GaLore, Fira, FRUGAL, OSD) against slow written-for-the-test implementations of
each paper's math, plus state, memory, config and edge cases."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.optim import build_optimizer, optimizer_state_bytes
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import FiraOptions, FrugalOptions, GaloreOptions, OSDOptions
from lowmem.optim.registry import parse_optimizer_options

from stepping import step_on

SHAPES = [(10, 6), (6, 10), (8, 8)]
STEPS, GAP, RANK = 7, 3, 3  # refreshes at updates 0, 3, 6
B1, B2 = 0.9, 0.999


def fixed_problem(shapes=SHAPES, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return weights, grads


def run_ours(options, weights, grads, dense=None, dense_grads=None):
    """`weights` projected (and `dense`, when given, on the dense path), stepped on their gradients."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": params, "projected": True}] + ([{"params": [dense]}] if dense is not None else [])
    opt = PipelineOptimizer(groups, options)
    every = params + ([dense] if dense is not None else [])
    step_on(opt, every, [g + [d] for g, d in zip(grads, dense_grads)] if dense is not None else grads)
    return [p.detach() for p in params], opt


# ---------------------------------------------------------------------------------------------------------
# Reference math, written out in each paper's own orientation (GaLore "left" / "right" projection).


def svd_basis(G, r):
    """Right: Q = Vh[:r] (r x n), R = G Q^T. Left: P = U[:, :r] (m x r), R = P^T G."""
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[:r] if G.shape[0] >= G.shape[1] else U[:, :r]


def down(P, G):
    return G @ P.T if G.shape[0] >= G.shape[1] else P.T @ G


def up(P, N, shape):
    return N @ P if shape[0] >= shape[1] else P @ N


def rank_dim(shape):
    return 1 if shape[0] >= shape[1] else 0  # the core is m x r (right) or r x n (left)


def reference_galore_fira(W, grads, lr, wd, eps, scale, fira=None, gamma=1.01):
    """GaLore, or Fira as its paper writes it (Alg. 1): N bias-corrected, S = (I - PP^T) G, alpha on P N + S."""
    assert fira in (None, "paper")
    W = W.clone()
    M = V = P = prev_norm = None
    for t, G in enumerate(grads):
        if t % GAP == 0:
            P = svd_basis(G, RANK)
        R = down(P, G)
        M = (1 - B1) * R if M is None else B1 * M + (1 - B1) * R
        V = (1 - B2) * R * R if V is None else B2 * V + (1 - B2) * R * R
        k = t + 1
        N = M / (V.sqrt() + eps) * math.sqrt(1 - B2 ** k) / (1 - B1 ** k)
        U = scale * up(P, N, G.shape)
        if fira is not None:
            d = rank_dim(G.shape)
            S = G - up(P, R, G.shape)
            phi = N.norm(dim=d, keepdim=True) / (R.norm(dim=d, keepdim=True) + 1e-8)
            S = S * phi
            if prev_norm is not None:  # the paper's limiter, S * gamma / max(||S|| / (||S_prev|| + eps), gamma)
                ratio = S.norm() / (prev_norm + 1e-8)
                if ratio > gamma:
                    S = S * gamma / ratio
            prev_norm = S.norm()
            U = U + scale * S
        W = W - lr * U
        W = W - lr * wd * W
    return W


def reference_fira_released_code(W, grads, lr, wd, eps, alpha, gamma=1.01):
    """Fira's released code, transcribed from the reference's section 3.1 pseudo-code, in Fira's own
    orientation: the Adam direction N is NOT bias-corrected, project_back multiplies by alpha (so the
    residual is G - alpha P R), the limiter state `scaling_grad` holds the post-limit norm in those
    uncorrected units, and the bias-correction factor multiplies alpha P N + S after limiting.
    Returns the weights and how many updates the limiter actually scaled down."""
    W = W.clone()
    exp_avg = exp_avg_sq = P = None
    lim_state = {}
    limited = 0
    for t, G in enumerate(grads):
        if t % GAP == 0:
            P = svd_basis(G, RANK)
        R = down(P, G)
        if exp_avg is None:
            exp_avg, exp_avg_sq = torch.zeros_like(R), torch.zeros_like(R)
        exp_avg = exp_avg * B1 + R * (1 - B1)
        exp_avg_sq = exp_avg_sq * B2 + R * R * (1 - B2)
        step = t + 1
        norm_grad = exp_avg / (exp_avg_sq.sqrt() + eps)  # N, no bias correction
        sub = alpha * up(P, R, G.shape)  # Fira's project_back(R) includes alpha
        d = 0 if norm_grad.shape[0] < norm_grad.shape[1] else 1
        factor = norm_grad.norm(dim=d) / (R.norm(dim=d) + 1e-8)
        if d == 1:
            factor = factor.unsqueeze(1)  # one factor per row of an m x r core (right projection)
        S = (G - sub) * factor
        if "scaling_grad" in lim_state:
            before = S.norm()
            lim = max(before / (lim_state["scaling_grad"] + 1e-8), gamma) / gamma
            limited += int(lim > 1)
            S = S / lim
            lim_state["scaling_grad"] = before / lim
        else:
            lim_state["scaling_grad"] = S.norm()
        U = alpha * up(P, norm_grad, G.shape) + S
        W = W - lr * math.sqrt(1 - B2 ** step) / (1 - B1 ** step) * U
        W = W * (1 - lr * wd)  # weight decay after the update, as GaLore/Fira
    return W, limited


def test_fira_code_variant_matches_released_code_with_limiter_active():
    g = torch.Generator().manual_seed(3)
    shapes = SHAPES
    weights = [torch.randn(s, generator=g) for s in shapes]
    # gradients whose size jumps now and then, so the growth limiter binds on several updates
    grads = [[torch.randn(s, generator=g) * (4.0 if t % 3 == 2 else 1.0) for s in shapes] for t in range(9)]
    options = FiraOptions(rank=RANK, update_gap=GAP, weight_decay=0.1)  # the preset's default: the released code
    ours, _ = run_ours(options, weights, grads)
    for i, w in enumerate(weights):
        expected, limited = reference_fira_released_code(w, [gr[i] for gr in grads], 0.01, 0.1, 1e-6, 0.25)
        assert limited >= 2
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)


def test_fira_limiter_restarts_after_an_all_zero_gradient():
    """After a zero gradient the stored norm is 0: the next update is unlimited (like a first update)
    instead of being pinned near gamma * 1e-8."""
    g = torch.Generator().manual_seed(1)
    grads = [[torch.zeros(10, 6)]] + [[torch.randn(10, 6, generator=g)] for _ in range(3)]
    weights = [torch.randn(10, 6, generator=g)]
    for variant in ("paper", "code"):
        limited_run, opt = run_ours(FiraOptions(rank=RANK, update_gap=100, fira_variant=variant), weights, grads[:2])
        free_run, free_opt = run_ours(FiraOptions(rank=RANK, update_gap=100, fira_variant=variant, fira_gamma=1e12),
                                      weights, grads[:2])
        norm = opt.state[opt.param_groups[0]["params"][0]]["fira_norm"]
        assert norm > 1e-3
        torch.testing.assert_close(norm, free_opt.state[free_opt.param_groups[0]["params"][0]]["fira_norm"])
        torch.testing.assert_close(limited_run[0], free_run[0], atol=1e-7, rtol=0)


@pytest.mark.parametrize("residual,variant", [("drop", "paper"), ("fira", "paper")])
def test_galore_and_fira_match_reference(residual, variant):
    weights, grads = fixed_problem()
    cls = GaloreOptions if residual == "drop" else FiraOptions
    options = cls(rank=RANK, update_gap=GAP, lr=0.01, weight_decay=0.1, fira_variant=variant)
    ours, _ = run_ours(options, weights, grads)
    for i, w in enumerate(weights):
        expected = reference_galore_fira(w, [g[i] for g in grads], 0.01, 0.1, 1e-6, 0.25,
                                         fira=None if residual == "drop" else variant)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)


# FRUGAL's block windows written out: with 4 weights and density 0.5, refresh k activates the k-th pair of
# the order (cycling), as FRUGAL's BAdam-style block switching does.
BLOCK_WINDOWS = {"ascending": [{0, 1}, {2, 3}], "descending": [{2, 3}, {0, 1}]}


@pytest.mark.parametrize("wd, scale, inactive, order", [(0.1, 1.0, 1.0, "descending"), (0.0, 0.5, 0.3, "ascending")],
                         ids=["decay-descending", "scales-ascending"])
def test_frugal_blocks_match_reference(wd, scale, inactive, order):
    """FRUGAL blocks: active weights get AdamW (torch convention, state and bias correction reset at each
    refresh) at lr * scale, inactive ones signSGD at lr * scale * inactive_lr_scale; decay before the step.
    The active set comes from the written-out block order, not from the optimizer."""
    weights, grads = fixed_problem(shapes=[(6, 4), (5, 7), (4, 4), (3, 6)])
    lr, eps = 0.01, 1e-8
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = PipelineOptimizer([{"params": params, "projected": True}],
                        FrugalOptions(update_gap=GAP, lr=lr, weight_decay=wd, density=0.5, scale=scale,
                                      inactive_lr_scale=inactive, block_order=order,
                                      moments_on_refresh="keep"))  # FRUGAL resets at a refresh regardless
    ref = [w.clone() for w in weights]
    moments = [None] * len(weights)
    for t, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        windows = BLOCK_WINDOWS[order]
        active = windows[(t // GAP) % len(windows)]
        for i, G in enumerate(step_grads):
            ref[i] = ref[i] * (1 - lr * wd)
            if t % GAP == 0:
                moments[i] = (torch.zeros_like(G), torch.zeros_like(G), 0)
            if i in active:
                M, V, k = moments[i]
                M, V, k = B1 * M + (1 - B1) * G, B2 * V + (1 - B2) * G * G, k + 1
                moments[i] = (M, V, k)
                ref[i] = ref[i] - lr * scale * (M / (1 - B1 ** k)) / (V.sqrt() / math.sqrt(1 - B2 ** k) + eps)
            else:
                ref[i] = ref[i] - lr * scale * inactive * torch.sign(G)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=0)


def test_frugal_svd_rank_from_density_matches_reference():
    """FRUGAL with projector svd: rank = round(density * b), reset at refresh, signSGD on (I - PP^T) G."""
    weights, grads = fixed_problem(shapes=[(12, 8)])
    lr = 0.01
    options = FrugalOptions(projector="svd", density=0.25, update_gap=GAP, lr=lr)
    ours, opt = run_ours(options, weights, grads)
    W = weights[0].clone()
    for t, step in enumerate(grads):
        G = step[0]
        if t % GAP == 0:
            P, M, V, k = svd_basis(G, 2), 0.0, 0.0, 0
        R = down(P, G)
        M, V, k = B1 * M + (1 - B1) * R, B2 * V + (1 - B2) * R * R, k + 1
        N = (M / (1 - B1 ** k)) / (V.sqrt() / math.sqrt(1 - B2 ** k) + 1e-8)
        W = W - lr * (up(P, N, G.shape) + torch.sign(G - up(P, R, G.shape)))
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == (2, 12)
    torch.testing.assert_close(ours[0], W, atol=1e-6, rtol=0)


def reference_osd(w, grads, lrs, initial_lr, scale=0.25, eps=1e-6):
    """OSD written out: P from SVD of the first gradient, then one AdamW step (lr (1/T) * lr_t / initial_lr,
    wd 0.01, autograd on the online-PCA loss) per later update, used from the next update; Adam core with
    moments kept; the weight step at lr_t."""
    W, M, V, P, p_opt = w.clone(), 0.0, 0.0, None, None
    for t, G in enumerate(grads):
        if P is None:
            P = torch.nn.Parameter(svd_basis(G, RANK).clone())
            p_opt = torch.optim.AdamW([P], lr=1 / GAP, weight_decay=0.01)
        else:
            X = G / G.norm()
            with torch.enable_grad():
                proj = X @ P.T @ P if G.shape[0] >= G.shape[1] else P @ P.T @ X
                ((proj - X) ** 2).sum().backward()
        R = down(P.detach(), G)
        M, V, k = B1 * M + (1 - B1) * R, B2 * V + (1 - B2) * R * R, t + 1
        N = M / (V.sqrt() + eps) * math.sqrt(1 - B2 ** k) / (1 - B1 ** k)
        W = W - lrs[t] * scale * up(P.detach(), N, G.shape)
        for group in p_opt.param_groups:
            group["lr"] = (1 / GAP) * lrs[t] / initial_lr
        p_opt.step()
        p_opt.zero_grad()
    return W


def test_osd_matches_reference():
    weights, grads = fixed_problem()
    lr = 0.01
    ours, _ = run_ours(OSDOptions(rank=RANK, update_gap=GAP, lr=lr), weights, grads)
    for i, w in enumerate(weights):
        expected = reference_osd(w, [step[i] for step in grads], [lr] * len(grads), lr)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)


def test_dense_groups_get_adamw_math():
    weights, grads = fixed_problem(shapes=[(6, 4)])
    dense = torch.nn.Parameter(torch.randn(5, 3))
    reference = torch.nn.Parameter(dense.detach().clone())
    dense_grads = [torch.randn(5, 3) for _ in grads]
    run_ours(FrugalOptions(weight_decay=0.1, lr=0.01), weights, grads, dense, dense_grads)
    torch_adamw = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1, eps=1e-8)
    for g in dense_grads:
        reference.grad = g.clone()
        torch_adamw.step()
    torch.testing.assert_close(dense.detach(), reference.detach(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Moments at a refresh


def test_rotate_preserves_back_projected_momentum_at_full_rank():
    """With r = b the basis is orthogonal, so rotating M by C = P_new^T P_old keeps P M unchanged."""
    weights, grads = fixed_problem(shapes=[(8, 5)], steps=GAP + 1)
    params = [torch.nn.Parameter(weights[0].clone())]
    opt = PipelineOptimizer([{"params": params, "projected": True}],
                        GaloreOptions(rank=5, update_gap=GAP, moments_on_refresh="rotate"))
    state = opt.state[params[0]]
    for t in range(GAP):
        params[0].grad = grads[t][0].clone()
        opt.step()
    before = state["basis"] @ state["exp_avg"]
    old_basis = state["basis"].clone()
    params[0].grad = grads[GAP][0].clone()
    opt.step()
    assert not torch.allclose(old_basis, state["basis"])
    # undo this update's contribution to M to compare the rotated old momentum
    new_grad_core = state["basis"].T @ grads[GAP][0].T
    rotated_old = (state["exp_avg"] - (1 - B1) * new_grad_core) / B1
    torch.testing.assert_close(state["basis"] @ rotated_old, before, atol=1e-5, rtol=0)


def test_reset_restarts_bias_correction_and_keep_does_not():
    weights, grads = fixed_problem(shapes=[(6, 4)], steps=GAP + 1)
    for policy, expected in (("reset", 1), ("keep", GAP + 1)):
        _, opt = run_ours(GaloreOptions(rank=2, update_gap=GAP, moments_on_refresh=policy), weights, grads)
        state = next(iter(opt.state.values()))
        assert state["adam_step"] == expected and state["step"] == GAP + 1


# ---------------------------------------------------------------------------------------------------------
# State and memory

def _model_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 8), (12, 5), (5, 12), (3, 3)]]
    vec = torch.nn.Parameter(torch.randn(7, generator=g))
    return mats, vec


def _groups(mats, vec):
    return [{"params": mats, "projected": True, "weight_decay": 0.1}, {"params": [vec], "weight_decay": 0.0}]


def _feed(mats, vec, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in mats + [vec]:
        p.grad = torch.randn(p.shape, generator=g)


def test_seeded_random_projector_stores_no_matrix():
    mats, vec = _model_params()
    opt = PipelineOptimizer(_groups(mats, vec), GaloreOptions(rank=3, projector="random"))
    _feed(mats, vec, 0)
    opt.step()
    state = opt.state[mats[0]]
    assert {"seed", "draws"} <= set(state) and "basis" not in state
    moments = sum(2 * 3 * max(p.shape) * 4 for p in mats) + 2 * 7 * 4
    assert optimizer_state_bytes(opt) == moments


def test_bf16_weights_keep_fp32_states_through_a_checkpoint():
    mats = [torch.nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))]
    opt = PipelineOptimizer([{"params": mats, "projected": True}], FiraOptions(rank=2, state_dtype="fp32"))
    for _ in range(2):
        mats[0].grad = torch.randn(8, 6, dtype=torch.bfloat16)
        opt.step()
    assert mats[0].dtype == torch.bfloat16 and opt.state[mats[0]]["exp_avg"].dtype == torch.float32
    opt.load_state_dict(opt.state_dict())
    assert opt.state[mats[0]]["exp_avg"].dtype == torch.float32


def test_stagger_spreads_refreshes():
    mats = [torch.nn.Parameter(torch.randn(6, 6)) for _ in range(4)]
    opt = PipelineOptimizer([{"params": mats, "projected": True}], GaloreOptions(rank=2, update_gap=4, stagger=True))
    refreshed_at = {i: [] for i in range(4)}
    for step in range(8):
        before = [opt.state[p].get("refreshes", 0) for p in mats]
        for p in mats:
            p.grad = torch.randn(6, 6)
        opt.step()
        for i, p in enumerate(mats):
            if opt.state[p]["refreshes"] > before[i] and step > 0:
                refreshed_at[i].append(step)
    assert refreshed_at == {0: [4], 1: [3, 7], 2: [2, 6], 3: [1, 5]}


def test_svd_failure_falls_back(monkeypatch):
    calls = {"n": 0}
    real_svd = torch.linalg.svd

    def failing_svd(matrix, *args, **kwargs):
        calls["n"] += 1
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    weights, grads = fixed_problem(shapes=[(6, 4)], steps=1)
    ours, opt = run_ours(GaloreOptions(rank=2), weights, grads)
    basis = next(iter(opt.state.values()))["basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)
    assert calls["n"] == 2


def test_svd_double_failure_uses_randomized_fallback_without_touching_global_rng(monkeypatch):
    def failing_svd(matrix, *args, **kwargs):
        calls["n"] += 1
        raise torch.linalg.LinAlgError("did not converge")

    calls = {"n": 0}
    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    g = torch.Generator().manual_seed(0)
    # a clear rank-2 structure plus noise: the fallback must find its subspace
    grad = (torch.randn(20, 2, generator=g) @ torch.randn(2, 12, generator=g)) * 10 + 0.01 * torch.randn(20, 12, generator=g)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    p = torch.nn.Parameter(torch.randn(20, 12, generator=g))
    opt = PipelineOptimizer([{"params": [p], "projected": True, "names": ["layers.0.mlp.up_proj.weight"]}],
                        GaloreOptions(rank=2))
    p.grad = grad.clone()
    with pytest.warns(RuntimeWarning, match=r"layers\.0\.mlp\.up_proj\.weight.*randomized SVD"):
        opt.step()
    assert calls["n"] == 2
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG was neither used nor reseeded
    basis = opt.state[p]["basis"]  # right projection: b = 12
    assert basis.shape == (12, 2) and torch.isfinite(basis).all()
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)
    _, _, vh = torch.linalg.svd.__wrapped__(grad) if hasattr(torch.linalg.svd, "__wrapped__") else (None, None, None)
    monkeypatch.undo()
    top = torch.linalg.svd(grad, full_matrices=False)[2][:2].T
    torch.testing.assert_close(basis @ basis.T, top @ top.T, atol=1e-4, rtol=0)  # same subspace


def test_svd_errors_other_than_linalg_propagate_and_nonfinite_gradients_are_named(monkeypatch):
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = PipelineOptimizer([{"params": [p], "projected": True, "names": ["blocks.3.attn.q.weight"]}],
                        GaloreOptions(rank=2))
    p.grad = torch.randn(6, 4)
    p.grad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"blocks\.3\.attn\.q\.weight' \(shape 6x4\)"):
        opt.step()

    def oom_svd(matrix, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.linalg, "svd", oom_svd)
    p.grad = torch.randn(6, 4)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()


def test_randomized_svd_projector_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    weights, grads = fixed_problem(shapes=[(12, 8)], steps=2)
    _, opt = run_ours(GaloreOptions(rank=2, update_gap=1, projector="randomized_svd"), weights, grads)
    assert torch.equal(torch.get_rng_state(), before)
    basis = next(iter(opt.state.values()))["basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("skip", [(0, 1), (3, 4)], ids=["between-refreshes", "at-a-refresh"])
def test_frugal_blocks_active_set_is_shared_when_a_weight_misses_a_gradient(skip):
    """4 trainable weights (plus a frozen one that must not count), density 0.5, one weight without a
    gradient on one update: exactly 2 active at every update (a weight that misses the refresh update
    joins that refresh's draw at its next update), and the set changes at refreshes and only there."""
    gap, updates = 2, 10
    mats = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(4)]
    frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    opt = PipelineOptimizer([{"params": [frozen] + mats, "projected": True}],
                            FrugalOptions(update_gap=gap, density=0.5))
    history = []
    for t in range(updates):
        for i, m in enumerate(mats):
            m.grad = None if (i, t) == skip else torch.randn(4, 4)
        opt.step()
        flags = tuple(opt.state[m]["active"] for m in mats)
        if (skip[1], skip[1] % gap) != (t, 0):  # the skipped weight's flag is stale only on a skipped refresh
            assert sum(flags) == 2, (t, flags)
        history.append(flags)
    for t in range(1, updates):
        if t % gap and t != skip[1] + 1:
            assert history[t] == history[t - 1], t  # no change between refreshes
    assert any(history[t] != history[t - 1] for t in range(gap, updates, gap))
    assert len(opt.state[frozen]) == 0


def test_frugal_inactive_lr_scale_and_scale_match_reference():
    """FRUGAL svd with proj_params_lr_scale (scale) and inactive_lr_scale != 1, both residual rules."""
    weights, grads = fixed_problem(shapes=[(12, 8), (6, 10)])
    lr, scale, inactive = 0.01, 0.5, 0.3
    for rule in ("sign_sgd", "sgd"):
        options = FrugalOptions(projector="svd", density=0.25, update_gap=GAP, lr=lr, scale=scale,
                                inactive_lr_scale=inactive, residual=rule)
        ours, _ = run_ours(options, weights, grads)
        for i, w in enumerate(weights):
            W = w.clone()
            r = round(0.25 * min(w.shape))
            for t, step in enumerate(grads):
                G = step[i]
                if t % GAP == 0:
                    P, M, V, k = svd_basis(G, r), 0.0, 0.0, 0
                R = down(P, G)
                M, V, k = B1 * M + (1 - B1) * R, B2 * V + (1 - B2) * R * R, k + 1
                N = (M / (1 - B1 ** k)) / (V.sqrt() / math.sqrt(1 - B2 ** k) + 1e-8)
                rest = G - up(P, R, G.shape)
                rest = torch.sign(rest) if rule == "sign_sgd" else rest
                W = W - lr * scale * (up(P, N, G.shape) + inactive * rest)
            torch.testing.assert_close(ours[i], W, atol=1e-6, rtol=0)


def test_osd_follows_the_lr_schedule_factor():
    """OSD's P step uses lr = (1/T) * lr_t / initial_lr; the weight step uses lr_t."""
    weights, grads = fixed_problem(shapes=[(10, 6), (6, 10)])
    lrs = [0.01 * f for f in (1.0, 0.5, 0.25, 0.8, 0.1, 0.6, 0.3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = PipelineOptimizer([{"params": params, "projected": True}], OSDOptions(rank=RANK, update_gap=GAP, lr=0.01))
    for t, step in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for i, w in enumerate(weights):
        expected = reference_osd(w, [step[i] for step in grads], lrs, initial_lr=0.01)
        torch.testing.assert_close(params[i].detach(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("options", [GaloreOptions(rank=RANK, update_gap=GAP), FiraOptions(rank=RANK, update_gap=GAP),
                                     FrugalOptions(update_gap=GAP, density=0.5, projector="svd"),
                                     OSDOptions(rank=RANK, update_gap=GAP)], ids=lambda o: o.name)
def test_bf16_weights_track_an_fp32_run(options):
    """bf16 weights are stepped through an fp32 copy: they stay within bf16 rounding of an fp32 run."""
    options = dataclasses.replace(options, state_dtype="fp32")
    weights, grads = fixed_problem(shapes=[(24, 16), (16, 24)], steps=6)
    weights = [(0.02 * w).to(torch.bfloat16).float() for w in weights]  # exactly representable start
    grads = [[g.to(torch.bfloat16).float() for g in step] for step in grads]
    ref, _ = run_ours(options, weights, grads)
    params = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in weights]
    opt = PipelineOptimizer([{"params": params, "projected": True}], options)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    for p, r, w in zip(params, ref, weights):
        assert p.dtype == torch.bfloat16
        moved = (r - w).norm()
        assert moved > 0
        assert (p.detach().float() - r).norm() < 0.05 * moved  # within bf16 rounding of the fp32 run


def test_float64_weights_are_refused_not_downcast():
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\(shape 6x4\) is float64"):
        PipelineOptimizer([{"params": [p], "projected": True}], GaloreOptions(rank=2))


def test_random_projector_draws_one_basis_per_update(monkeypatch):
    calls = {"n": 0}
    real_qr = torch.linalg.qr

    def counting_qr(*args, **kwargs):
        calls["n"] += 1
        return real_qr(*args, **kwargs)

    weights, grads = fixed_problem(shapes=[(10, 6), (6, 10)], steps=4)  # two weights: the cache alternates
    monkeypatch.setattr(torch.linalg, "qr", counting_qr)
    for residual in ("drop", "fira"):
        calls["n"] = 0
        run_ours(GaloreOptions(rank=2, update_gap=100, projector="random", residual=residual), weights, grads)
        assert calls["n"] <= 2 * len(grads), residual  # at most one randn + QR per weight per update


# ---------------------------------------------------------------------------------------------------------
# Edge cases


def test_rank_equal_to_small_side_works_and_tiny_matrix():
    weights, grads = fixed_problem(shapes=[(2, 3), (5, 2)])
    ours, _ = run_ours(FiraOptions(rank=2, update_gap=GAP, fira_variant="paper"), weights, grads)
    for i, w in enumerate(weights):
        expected = reference_galore_fira(w, [g[i] for g in grads], 0.01, 0.0, 1e-6, 0.25, fira="paper")
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)


def test_non_contiguous_gradients_give_the_same_update():
    weights, grads = fixed_problem(shapes=[(6, 9)])
    transposed = [[g[0].T.contiguous().T] for g in grads]  # same values, column-major strides
    assert not transposed[0][0].is_contiguous()
    a, _ = run_ours(FiraOptions(rank=RANK, update_gap=GAP), weights, grads)
    b, _ = run_ours(FiraOptions(rank=RANK, update_gap=GAP), weights, transposed)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


def test_params_without_grad_and_1d_params_in_a_projected_group():
    mat, vec, frozen = (torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4)),
                        torch.nn.Parameter(torch.randn(5, 5)))
    frozen_before = frozen.detach().clone()
    opt = PipelineOptimizer([{"params": [mat, vec, frozen], "projected": True}], GaloreOptions(rank=2))
    mat.grad, vec.grad = torch.randn(6, 4), torch.randn(4)
    opt.step()
    assert torch.equal(frozen, frozen_before) and len(opt.state[frozen]) == 0
    assert opt.state[vec]["exp_avg"].shape == (4,) and opt.state[mat]["exp_avg"].shape == (2, 6)


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def test_rank_too_big_names_key_weight_and_shape():
    model = _tiny_llama()
    with pytest.raises(ConfigError, match=r"optimizer\.rank: 40 exceeds .*self_attn\.q_proj\.weight \(shape 32x32\)"):
        build_optimizer(model, GaloreOptions(rank=40))
    with pytest.raises(ValueError, match="rank 40 exceeds"):
        PipelineOptimizer([{"params": [torch.nn.Parameter(torch.randn(32, 32))], "projected": True}],
                      GaloreOptions(rank=40))


def test_config_names_and_values_are_checked():
    with pytest.raises(ConfigError, match=r"optimizer\.projector: unknown value 'svdd' \(did you mean 'svd'\?\)"):
        parse_optimizer_options({"name": "galore", "projector": "svdd"})
    with pytest.raises(ConfigError, match=r"optimizer\.residual: .*did you mean 'sign_sgd'"):
        parse_optimizer_options({"name": "frugal", "residual": "signsgd"})
    for key, value in (("rank", 0), ("update_gap", 0), ("density", 1.5), ("scale", 0.0)):
        with pytest.raises(ConfigError, match=rf"optimizer\.{key}"):
            parse_optimizer_options({"name": "galore", key: value})
    options = parse_optimizer_options({"name": "fira", "projector": "random", "rank": 8})
    assert isinstance(options, FiraOptions) and options.residual == "fira" and options.fira_gamma == 1.01


@pytest.mark.parametrize("options", [GaloreOptions(rank=8, update_gap=10), FiraOptions(rank=8, update_gap=10),
                                     FrugalOptions(update_gap=10, lr=3e-3), OSDOptions(rank=8, update_gap=10)],
                         ids=lambda o: o.name)
def test_tiny_llama_training_lowers_eval_loss(options):
    model = _tiny_llama()
    opt = build_optimizer(model, options)
    pattern = torch.tensor([(7 * i + 3) % 64 for i in range(64)])
    train = torch.stack([pattern.roll(-s)[:24] for s in range(0, 48, 2)])
    held_out = torch.stack([pattern.roll(-s)[:24] for s in range(1, 48, 6)])

    def eval_loss():
        with torch.no_grad():
            return model(input_ids=held_out, labels=held_out).loss.item()

    before = eval_loss()
    for _ in range(25):
        model(input_ids=train, labels=train).loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss() < 0.8 * before
