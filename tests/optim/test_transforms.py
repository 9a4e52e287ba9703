"""Gradient transforms (SPAM, Stable-SPAM, GradientStabilizer) against slow reimplementations of their
formulas over 36 updates with injected gradient spikes and moment resets."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import GaloreOptions, GradNormStabilizerOptions, SpamOptions, StableSpamOptions
from lowmem.optim.registry import parse_optimizer_options
from lowmem.train.config import load_config

B1, B2 = 0.9, 0.999
STEPS, SPIKES = 36, {7: 1e3, 23: 3e2}


def problem(shape=(12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * SPIKES.get(t, 1.0) for t in range(STEPS)]
    return w, grads


def run(options, w, grads, projected=False):
    p = torch.nn.Parameter(w.clone())
    opt = PipelineOptimizer([{"params": [p], "projected": projected}], options)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def reference_stable_spam(w, grads, lr, wd, eps, gamma1, gamma2, gamma3, interval, old_moments=False,
                          steps_follow_reset=False, total_t=None, eta_min=0.5):
    """Stable-SPAM written from its formulas (optimizers.md 8.2), with the code's quirks as switches."""
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    peak_ema = mean_ema = square_ema = 0.0
    k = 0  # the transforms' step (the code's state['step'] when steps_follow_reset)
    adam_k = 0
    for t, g in enumerate(grads, start=1):
        g = g.clone().double()
        scale = 1.0
        if total_t:
            scale = eta_min + (1 - eta_min) * (1 + math.cos(math.pi * min(t, total_t + 1) / (total_t + 1))) / 2
        w = w * (1 - lr * wd)
        k += 1
        adam_k += 1
        peak = g.abs().max().item()
        peak_ema = gamma3 * peak_ema + (1 - gamma3) * peak
        threshold = peak_ema / (1 - gamma3 ** k)
        g = torch.where(g.abs() > threshold, g / peak * threshold, g)
        norm = g.norm().item()
        g1 = gamma1 * scale
        mean_ema = g1 * mean_ema + (1 - g1) * norm
        square_ema = gamma2 * square_ema + (1 - gamma2) * norm ** 2
        target = (mean_ema / (1 - g1 ** k)) / (math.sqrt(square_ema / (1 - gamma2 ** k)) + eps)
        if norm > 0:
            g = g / norm * target
        reset = t % interval == 0
        if reset and not old_moments:
            m, v, adam_k = torch.zeros_like(w), torch.zeros_like(w), 1
        if reset and old_moments:
            adam_k = 1  # this update uses the old moments with step-1 corrections
        beta1 = B1 * scale
        m = beta1 * m + (1 - beta1) * g.float()
        v = B2 * v + (1 - B2) * g.float() ** 2
        w = w - lr / (1 - beta1 ** adam_k) * m / (v.sqrt() / math.sqrt(1 - B2 ** adam_k) + eps)
        if reset and old_moments:
            m, v = torch.zeros_like(w), torch.zeros_like(w)
        if reset and steps_follow_reset:
            k = 1
    return w


@pytest.mark.parametrize("quirks", [{}, {"reset_with_old_moments": True, "transform_steps_follow_reset": True,
                                         "anneal_steps": 30}], ids=["paper", "code-quirks"])
def test_stable_spam_matches_the_written_out_formulas(quirks):
    w, grads = problem()
    options = StableSpamOptions(lr=0.01, weight_decay=0.1, reset_interval=10, **quirks)
    ours, _ = run(options, w, grads)
    expected = reference_stable_spam(w, grads, 0.01, 0.1, 1e-8, 0.7, 0.9, 0.999, 10,
                                     old_moments=quirks.get("reset_with_old_moments", False),
                                     steps_follow_reset=quirks.get("transform_steps_follow_reset", False),
                                     total_t=quirks.get("anneal_steps"))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_the_reset_quirk_changes_the_trajectory():
    """The switches are not no-ops: with the code's reset quirk the weights differ from the paper's reset."""
    w, grads = problem()
    paper, _ = run(StableSpamOptions(lr=0.01, reset_interval=10), w, grads)
    code, _ = run(StableSpamOptions(lr=0.01, reset_interval=10, reset_with_old_moments=True), w, grads)
    assert (paper - code).abs().max() > 1e-4


def reference_spam(w, grads, lr, wd, eps, theta, interval, warmup, delay):
    """SPAM's code (optimizers.md 8.1): reset moments at t = k*interval without restarting the step count,
    clip g^2 > theta*v from update `delay` on except in the first `delay` updates of each window, cosine
    warm-up of the update after each reset, GaLore-convention Adam, decay after."""
    w = w.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.clone()
        position = t % interval
        scale = 1.0
        if t >= interval and position < warmup:
            scale = 1 - 0.99 * (1 + math.cos(math.pi * position / (warmup + 1))) / 2
        if position == 0:
            m, v = torch.zeros_like(w), torch.zeros_like(w)
        if t >= delay and position >= delay:
            spike = g * g > theta * v
            g[spike] = torch.sign(g[spike]) * torch.sqrt(theta * v[spike])
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        w = w - lr * math.sqrt(1 - B2 ** t) / (1 - B1 ** t) * scale * m / (v.sqrt() + eps)
        w = w - lr * wd * w
    return w


def test_spam_matches_the_written_out_formulas():
    w, grads = problem()
    options = SpamOptions(lr=0.01, weight_decay=0.1, reset_interval=10, reset_warmup=4, spam_clip_delay=3,
                          spam_theta=50.0)
    ours, opt = run(options, w, grads)
    expected = reference_spam(w, grads, 0.01, 0.1, 1e-6, 50.0, 10, 4, 3)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    no_clip = reference_spam(w, grads, 0.01, 0.1, 1e-6, 1e12, 10, 4, 3)
    assert (expected - no_clip).abs().max() > 1e-3  # the spikes were clipped


def test_grad_norm_stabilizer_matches_adagn_alone():
    w, grads = problem()
    ours, _ = run(GradNormStabilizerOptions(lr=0.01), w, grads)
    ref, mean_ema, square_ema = w.clone(), 0.0, 0.0
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for k, g in enumerate(grads, start=1):
        norm = g.norm().item()
        mean_ema = 0.6 * mean_ema + 0.4 * norm
        square_ema = 0.999 * square_ema + 0.001 * norm ** 2
        g = g / norm * (mean_ema / (1 - 0.6 ** k)) / (math.sqrt(square_ema / (1 - 0.999 ** k)) + 1e-8)
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
        ref = ref - 0.01 * (m / (1 - B1 ** k)) / (v.sqrt() / math.sqrt(1 - B2 ** k) + 1e-8)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_transforms_in_front_of_galore_act_on_the_whole_gradient():
    """GaLore with AdaClip and AdaGN equals plain GaLore fed the gradients those transforms produce (they act
    before the projection; the reference transforms are written out here)."""
    w, grads = problem(shape=(16, 10))
    ours, opt = run(GaloreOptions(rank=3, update_gap=5, transforms=["adaclip", "adagn"]), w, grads, projected=True)
    transformed, peak_ema, mean_ema, square_ema = [], 0.0, 0.0, 0.0
    for k, g in enumerate(grads, start=1):
        peak = g.abs().max().item()
        peak_ema = 0.999 * peak_ema + 0.001 * peak
        threshold = peak_ema / (1 - 0.999 ** k)
        g = torch.where(g.abs() > threshold, g / peak * threshold, g)
        norm = g.norm().item()
        mean_ema, square_ema = 0.7 * mean_ema + 0.3 * norm, 0.9 * square_ema + 0.1 * norm ** 2
        transformed.append(g / norm * (mean_ema / (1 - 0.7 ** k)) / (math.sqrt(square_ema / (1 - 0.9 ** k)) + 1e-6))
    plain, _ = run(GaloreOptions(rank=3, update_gap=5), w, transformed, projected=True)
    torch.testing.assert_close(ours, plain, atol=1e-6, rtol=0)
    assert opt.expected_state_bytes() == sum(t.numel() * t.element_size() for t in
                                             opt.state[opt.param_groups[0]["params"][0]].values()
                                             if isinstance(t, torch.Tensor))


def test_a_gradient_spike_derails_adamw_but_not_stable_spam():
    """A tiny LLaMA learns a fixed sequence; at update 15 one gradient is multiplied by 1e4. AdamW's loss
    climbs to several times its pre-spike value and stays above it for the rest of the run (its second
    moment is poisoned); Stable-SPAM (AdaClip bounds the spike, AdaGN its norm) keeps descending."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def train(options_tree):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=64, max_position_embeddings=64))
        from lowmem.optim import build_optimizer

        opt = build_optimizer(model, parse_optimizer_options(options_tree))
        data = torch.tensor([[(7 * i + 3) % 64 for i in range(32)]] * 4)
        losses = []
        for update in range(30):
            loss = model(input_ids=data, labels=data).loss
            loss.backward()
            if update == 15:
                for p in model.parameters():
                    p.grad.mul_(1e4)
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                losses.append(float(model(input_ids=data, labels=data).loss))
        return losses

    adamw = train({"name": "adamw", "lr": 0.01})
    stable = train({"name": "stable_spam", "lr": 0.01})
    assert max(adamw[15:]) > 3 * adamw[14] and min(adamw[15:]) > adamw[14]
    assert max(stable[15:]) <= stable[14] and stable[-1] < stable[14] / 10


@pytest.mark.parametrize("tree, message", [
    ({"name": "galore", "transforms": ["stable_spamm"]}, "unknown transform 'stable_spamm' (did you mean 'stable_spam'?)"),
    ({"name": "microadam", "transforms": ["spam"]},
     "optimizer.transforms: 'spam_clip' clips against the core's second moment, and core 'microadam' keeps none"),
    ({"name": "stable_spam", "transforms": ["stable_spam", "adagn"]}, "'adagn' is listed twice"),
    ({"name": "stable_spam", "gamma1": 1.2}, "optimizer.gamma1: must be in [0, 1)"),
    ({"name": "spam", "reset_interval": 0}, "optimizer.reset_interval: moment_reset needs a positive interval"),
    ({"name": "stable_spam", "anneal_steps": 0}, "optimizer.anneal_steps: must be at least 1"),
])
def test_bad_transform_options_name_the_key(tree, message):
    with pytest.raises(ConfigError) as info:
        parse_optimizer_options(tree)
    assert message in str(info.value)


def test_low_memory_stable_spam_combinations_parse_and_step():
    for tree in ({"name": "stable_spam", "state_dtype": "int4"}, {"name": "galore", "transforms": ["stable_spam"]},
                 {"name": "fira", "transforms": ["stable_spam"], "state_dtype": "int8"},
                 {"name": "adafactor", "transforms": ["spam"]}):
        w, grads = problem(shape=(64, 72))
        options = parse_optimizer_options(dict(tree, reset_interval=4))
        ours, opt = run(options, w, grads[:6], projected=True)
        assert torch.isfinite(ours).all() and (ours - w).abs().max() > 0


ROOT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The configs whose comment says they run Stable-SPAM as its released scripts do (total_T 20000 updates).
STABLE_SPAM_SCRIPTS = [["stable_spam_c4_int4.yaml"], ["c4_pretrain.yaml", "optimizers/stable_spam_bf16.yaml"]]


@pytest.mark.parametrize("files", STABLE_SPAM_SCRIPTS, ids=lambda files: files[-1])
def test_stable_spam_script_configs_step_as_the_released_optimizer(files):
    """Stepped with their own settings (the reset interval shortened so resets happen), these configs follow
    the released optimizer's formulas: old moments on a reset step, transform corrections restarted, beta1 and
    gamma1 annealed over total_T = 20000."""
    options = load_config([ROOT_CONFIGS / f for f in files]).optimizer
    assert options.anneal_steps == 20000
    w, grads = problem()
    ours, _ = run(dataclasses.replace(options, reset_interval=10), w, grads)
    expected = reference_stable_spam(w, grads, options.lr, options.weight_decay, options.eps, options.gamma1,
                                     options.gamma2, options.gamma3, 10, old_moments=True, steps_follow_reset=True,
                                     total_t=20000)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
