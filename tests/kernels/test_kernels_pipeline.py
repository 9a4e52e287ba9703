"""`optimizer.kernels`: whole PipelineOptimizer updates with the Triton kernels (interpreted, tiny CPU tensors)
against the same optimizer on the pure-torch path, and the option's validation.

With `kernels: triton` the Adam core runs `lowmem.kernels.adam`: the fused direction for projected cores and
the fused step-and-update for dense weights, weight by weight (`step_param`) or in multi-tensor launches
(`step()`, lowmem.optim.batched). Tolerances as in test_kernels_adam: rtol 1e-5 on fp32 weights
(relative to the weights' scale for the differences that cancelling moments carry), one bf16 unit on bf16
weights; quantized moments compared through their codes, which may differ by one level at a tie."""
import pytest
import torch

from lowmem.errors import ConfigError
from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.presets import (
    AdafactorOptions,
    AdamW4bitOptions,
    AdamW8bitOptions,
    FiraOptions,
    FrugalOptions,
    GaloreOptions,
    MicroAdamOptions,
    SpamOptions,
    StableSpamOptions,
)
from lowmem.optim.registry import parse_optimizer_options
from stepping import update

# Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by conftest).
pytestmark = pytest.mark.interpreter


def make_params(dtype=torch.float32):
    """Two projected matrices (wide and tall: 32 x 160 cores of 5,120 elements, so int8 / int4 cores are
    quantized), an embedding-sized dense matrix (quantized too) and a norm vector (always fp32 moments)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in ((64, 160), (160, 64))]
    dense = [torch.nn.Parameter((torch.randn(80, 64, generator=gen) * 0.1).to(dtype)),
             torch.nn.Parameter(torch.ones(64, dtype=dtype))]
    return mats, dense


def run(options, dtype=torch.float32, steps=2, optimizer=None, params=None, first_step=0, per_weight=False):
    """`steps` updates by step() (per_weight: begin_update and step_param, weight by weight)."""
    mats, dense = params or make_params(dtype)
    opt = optimizer or PipelineOptimizer([{"params": mats, "projected": True, "weight_decay": 0.1},
                                          {"params": dense, "weight_decay": 0.0}], options)
    gen = torch.Generator().manual_seed(1)
    for step in range(first_step + steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in mats + dense]
        if step < first_step:
            continue
        for p, g in zip(mats + dense, grads):
            p.grad = g
        update(opt, mats + dense, per_weight)
    return opt, mats + dense


def assert_same_run(ours, theirs, dtype):
    for p, q in zip(ours[1], theirs[1]):
        if dtype == torch.bfloat16:
            torch.testing.assert_close(p.float(), q.float(), rtol=2 ** -7, atol=1e-4)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours[1], theirs[1]):
        a, b = ours[0].state[p], theirs[0].state[q]
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                differ = (a[key].int() - value.int()).abs()
                assert (differ > 0).float().mean() <= 1e-3, key
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                scale = float(value.float().abs().max())
                rtol = 2 ** -7 if value.dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(a[key].float(), value.float(), rtol=rtol, atol=rtol * scale)
            else:
                assert a[key] == value if not isinstance(value, torch.Tensor) else torch.equal(a[key], value)


@pytest.mark.parametrize("options", [
    GaloreOptions(rank=32, state_dtype="int8"),
    GaloreOptions(rank=32, state_dtype="int4"),
    FiraOptions(rank=32),
    FrugalOptions(projector="svd", rank=32, state_dtype="int8"),
    AdamW8bitOptions(weight_decay=0.1),
    AdamW4bitOptions(),
], ids=["galore-int8", "galore-int4", "fira-fp32", "frugal-svd-int8", "adamw8bit", "adamw4bit"])
@pytest.mark.parametrize("per_weight", [True, False], ids=["per-weight", "batched"])
def test_triton_kernels_match_the_reference_path(options, per_weight, monkeypatch):
    from lowmem.kernels import adam

    names = ("adam_update", "adam_direction", "adam_update_multi", "adam_direction_multi")
    calls = dict.fromkeys(names, 0)
    for name in calls:
        def counted(*args, name=name, original=getattr(adam, name), **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(adam, name, counted)
    reference = run(type(options)(**{**options.__dict__, "kernels": "torch"}), per_weight=True)
    assert calls == dict.fromkeys(names, 0)
    triton = run(type(options)(**{**options.__dict__, "kernels": "triton"}), per_weight=per_weight)
    # 2 updates: projected cores take the fused direction, dense weights the fused step-and-update; step()
    # batches each update into one multi-tensor launch for the cores and one for the dense weights
    projected, dense = (2, 2) if options.projects else (0, 4)
    expected = (dict(adam_update=2 * dense, adam_direction=2 * projected) if per_weight else
                dict(adam_update_multi=2, adam_direction_multi=2 if projected else 0))
    assert calls == dict(dict.fromkeys(names, 0), **expected)
    assert_same_run(triton, reference, torch.float32)


def test_bf16_weights_with_bf16_moments():
    options = GaloreOptions(rank=32)  # state_dtype auto: bf16 moments for bf16 weights
    triton = run(GaloreOptions(**{**options.__dict__, "kernels": "triton"}), torch.bfloat16)
    reference = run(GaloreOptions(**{**options.__dict__, "kernels": "torch"}), torch.bfloat16)
    assert triton[0].state[triton[1][2]]["exp_avg"].dtype == torch.bfloat16
    assert_same_run(triton, reference, torch.bfloat16)


def test_a_checkpoint_moves_between_the_paths():
    """Two updates with the kernels, the state loaded into a reference-path optimizer, one more update: the
    same as three updates on the reference path (the kernels keep the storage's own tensors)."""
    options = AdamW8bitOptions(weight_decay=0.1)
    first, _ = run(AdamW8bitOptions(**{**options.__dict__, "kernels": "triton"}), steps=2)
    params = make_params()
    resumed = PipelineOptimizer([{"params": params[0], "projected": True, "weight_decay": 0.1},
                                 {"params": params[1], "weight_decay": 0.0}],
                                AdamW8bitOptions(**{**options.__dict__, "kernels": "torch"}))
    for p, q in zip(params[0] + params[1], [p for g in first.param_groups for p in g["params"]]):
        p.data.copy_(q.data)
    resumed.load_state_dict(first.state_dict())
    resumed_run = run(None, optimizer=resumed, params=params, steps=1, first_step=2)
    reference = run(AdamW8bitOptions(**{**options.__dict__, "kernels": "torch"}), steps=3)
    assert_same_run(resumed_run, reference, torch.float32)


def test_kernels_option_is_validated(monkeypatch):
    with pytest.raises(ConfigError, match="optimizer.kernels: unknown value 'trition' \\(did you mean 'triton'"):
        parse_optimizer_options({"name": "galore", "kernels": "trition"})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="need CUDA tensors"):
            parse_optimizer_options({"name": "galore", "kernels": "triton"})
    assert parse_optimizer_options({"name": "adamw8bit", "kernels": "torch"}).kernels == "torch"


def odd_params(dtype=torch.float32):
    """Projected matrices of sizes that are no multiple of any tile (wide and tall), a dense matrix and a vector."""
    gen = torch.Generator().manual_seed(2)
    mats = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in ((37, 90), (90, 37), (45, 70))]
    dense = [torch.nn.Parameter((torch.randn(67, 29, generator=gen) * 0.1).to(dtype)),
             torch.nn.Parameter(torch.ones(29, dtype=dtype))]
    return mats, dense


def with_kernels(options, kernels):
    return type(options)(**{**options.__dict__, "kernels": kernels})


@pytest.mark.parametrize("options", [
    GaloreOptions(rank=8),
    GaloreOptions(rank=8, state_dtype="int8", adam_convention="torch"),
    FiraOptions(rank=8),
    FiraOptions(rank=8, fira_variant="paper"),
    FrugalOptions(density=0.5, update_gap=2),
    FrugalOptions(projector="svd", rank=8, residual="sgd"),
    AdafactorOptions(),
    AdafactorOptions(betas=(0.9, 0.999), lr=1e-2, relative_step=False),
    MicroAdamOptions(window=3, topk_block=512, k_init=0.05),
], ids=["galore", "galore-int8-torch", "fira-code", "fira-paper", "frugal-blocks", "frugal-svd-sgd", "adafactor",
        "adafactor-momentum", "microadam"])
def test_presets_on_the_kernels_match_the_torch_path(options):
    """A few whole updates of each preset: the projected epilogue (back-projection, Fira's / FRUGAL's residual,
    decay), Adafactor's and MicroAdam's kernels, against kernels: torch (rtol 1e-5 on fp32 weights)."""
    triton = run(with_kernels(options, "triton"), steps=3, params=odd_params())
    reference = run(with_kernels(options, "torch"), steps=3, params=odd_params())
    assert_same_run(triton, reference, torch.float32)


def test_projected_epilogue_is_the_path_taken(monkeypatch):
    from lowmem.kernels import residual

    calls = []
    original = residual.epilogue
    monkeypatch.setattr(residual, "epilogue", lambda *a, **k: calls.append(1) or original(*a, **k))
    for per_weight in (True, False):
        run(with_kernels(FiraOptions(rank=8), "triton"), steps=2, params=odd_params(), per_weight=per_weight)
    assert len(calls) == 2 * 2 * 3


def test_bf16_weights_through_the_epilogue():
    triton = run(with_kernels(FiraOptions(rank=8), "triton"), torch.bfloat16, params=odd_params(torch.bfloat16))
    reference = run(with_kernels(FiraOptions(rank=8), "torch"), torch.bfloat16, params=odd_params(torch.bfloat16))
    assert_same_run(triton, reference, torch.bfloat16)


@pytest.mark.parametrize("options", [
    SpamOptions(reset_interval=3, spam_clip_delay=1, reset_warmup=2, spam_theta=2.0),
    SpamOptions(reset_interval=3, spam_clip_delay=1, spam_theta=2.0, state_dtype="int8"),
    StableSpamOptions(reset_interval=3, reset_with_old_moments=True),
    GaloreOptions(rank=8, transforms=["spam"], reset_interval=3, spam_clip_delay=1, spam_theta=2.0),
], ids=["spam", "spam-int8", "stable-spam-quirk", "galore-spam"])
def test_spam_transforms_fused_with_adam(options, monkeypatch):
    """SPAM's clip and moment reset run inside the fused Adam pass (dense weights: the whole update; projected
    cores: the direction), AdaClip / AdaGN in torch before it: the same run as kernels: torch, and the fused
    kernels are the ones taken."""
    from lowmem.kernels import adam

    clips = []
    original = adam._launch
    monkeypatch.setattr(adam, "_launch", lambda *a, **k: clips.append(a[-1] if len(a) > 13 else k.get("clip"))
                        or original(*a, **k))
    triton = run(with_kernels(options, "triton"), steps=5, params=odd_params())
    assert len(clips) == 5 * 5 and any(c is not None for c in clips) == ("spam" in options.transforms)
    reference = run(with_kernels(options, "torch"), steps=5, params=odd_params())
    assert_same_run(triton, reference, torch.float32)
