"""Fake 4-bit quantization (model.quant) against references written out here from the formulas, never against
the code under test: the quantizers, the straight-through linear, a whole tiny LLaMA, config errors, and
training, resume and export through the Trainer."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lowmem.errors import ConfigError
from lowmem.export import main as export_main
from lowmem.model.build import build_model
from lowmem.model.config import ModelConfig, QuantConfig
from lowmem.model.quant.fake import fp4_e1m2, int4_activation, int4_weight
from lowmem.model.quant.linear import FakeQuantLinear, apply_fake_quant
from lowmem.train.checkpoint import latest_checkpoint
from lowmem.train.metrics import read_metrics
from lowmem.train.trainer import Trainer

# E1M2 (1 sign, 1 exponent, 2 mantissa bits, bias 1): subnormals 0.mm x 2^0, normals 1.mm x 2^0.
E1M2_MAGNITUDES = [m / 4 for m in range(4)] + [1 + m / 4 for m in range(4)]
# The reference scales the group absmax onto 1.0, so only the magnitudes up to 1.0 are produced.
FP4_LEVELS = torch.tensor(sorted({s * v for v in E1M2_MAGNITUDES if v <= 1.0 for s in (1, -1)}))


# ---------------------------------------------------------------------------------------------------------
# References: one group at a time, fp32, straight from the formulas


def ref_int4_weight(w, group_size):
    out = torch.empty(w.numel() // group_size, group_size)
    for i, g in enumerate(w.float().reshape(-1, group_size)):
        scale = (g.max() - g.min()).clamp(min=1e-5) / 15
        zero = (-torch.round(g.min() / scale)).clamp(0, 15)
        out[i] = ((torch.round(g / scale) + zero).clamp(0, 15) - zero) * scale
    return out.reshape(w.shape).to(w.dtype)


def top_indices(g, k):
    """Positions of the k largest |g|, by sorting (not topk)."""
    return torch.sort(g.abs(), descending=True).indices[:k]


def ref_int4_activation(x, group_size, keep):
    out = torch.empty(x.numel() // group_size, group_size)
    for i, g in enumerate(x.float().reshape(-1, group_size)):
        outliers = top_indices(g, keep)
        rest = g.clone()
        rest[outliers] = 0.0
        scale = rest.abs().max().clamp(min=1e-6)
        out[i] = torch.round(rest * (7 / scale)).clamp(-8, 7) * scale / 7
        out[i, outliers] = g[outliers]
    return out.reshape(x.shape).to(x.dtype)


def ref_fp4(x, group_size, keep):
    out = torch.empty(x.numel() // group_size, group_size)
    for i, g in enumerate(x.float().reshape(-1, group_size)):
        outliers = top_indices(g, keep)
        rest = g.clone()
        rest[outliers] = 0.0
        absmax = rest.abs().max().clamp(min=1e-6)
        nearest = (rest[:, None] / absmax - FP4_LEVELS[None, :]).abs().argmin(dim=1)  # nearest grid value
        out[i] = FP4_LEVELS[nearest] * absmax
        out[i, outliers] = g[outliers]
    return out.reshape(x.shape).to(x.dtype)


REF_QUANTIZERS = {
    "weights": {"int4": lambda w, q: ref_int4_weight(w, q.group_size),
                "fp4": lambda w, q: ref_fp4(w, q.group_size, q.keep_outliers), "none": lambda w, q: w},
    "activations": {"int4": lambda x, q: ref_int4_activation(x, q.group_size, q.keep_outliers),
                    "fp4": lambda x, q: ref_fp4(x, q.group_size, q.keep_outliers), "none": lambda x, q: x},
}


# ---------------------------------------------------------------------------------------------------------
# The quantizers


def test_int4_weight_values_lie_on_each_groups_16_level_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 64) * 0.05
    w[1, :32] = torch.rand(32) + 0.5  # a group of one sign: the zero point clamps to 0
    w[2, 32:] = 0.3  # a constant group: the scale floor 1e-5
    out = int4_weight(w, 32)
    assert out.dtype == w.dtype and out.shape == w.shape
    torch.testing.assert_close(out, ref_int4_weight(w, 32), rtol=0, atol=0)
    for g, q in zip(w.reshape(-1, 32), out.reshape(-1, 32)):
        scale = max(float(g.max() - g.min()), 1e-5) / 15
        zero = min(max(-round(float(g.min()) / scale), 0), 15)
        k = q / scale + zero  # the level of each value
        assert torch.all((k - k.round()).abs() < 1e-4) and k.round().min() >= 0 and k.round().max() <= 15
        assert len(torch.unique(q)) <= 16
        inside = (g >= (0 - zero) * scale) & (g <= (15 - zero) * scale)
        assert torch.all((q - g)[inside].abs() <= scale / 2 * (1 + 1e-5))  # nearest level
    assert torch.unique(out[0]).numel() > 8  # a normal group spreads over many of its levels


def test_int4_weight_groups_run_along_the_input_dimension():
    w = torch.zeros(2, 8)
    w[0, :4] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # group (0, 0..3)
    w[1, 4:] = torch.tensor([0.0, 10.0, 20.0, 30.0])  # group (1, 4..7): its own scale
    out = int4_weight(w, 4)
    torch.testing.assert_close(out[0, :4], torch.tensor([0.0, 1.0, 2.0, 3.0]))  # 3/15 divides every value
    torch.testing.assert_close(out[1, 4:], torch.tensor([0.0, 10.0, 20.0, 30.0]))
    # 8 does not divide a row of 10: groups of the flattened tensor, as the reference's view(-1, 8), the tail
    # group (4 values) padded with copies of its last value
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    flat = w.reshape(-1)
    expected = torch.cat([ref_int4_weight(flat[:16].reshape(2, 8), 8).reshape(-1),
                          ref_int4_weight(torch.cat([flat[16:], flat[-1:].expand(4)]).reshape(1, 8), 8).reshape(-1)[:4]])
    torch.testing.assert_close(int4_weight(w, 8).reshape(-1), expected)


@pytest.mark.parametrize("keep", [0, 2, 3])
def test_int4_activations_symmetric_with_outliers_kept_exactly(keep):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64)
    x[..., 7] = 40.0  # planted outliers in each of the two groups of a row
    x[..., 40] = -55.0
    x[..., 41] = 30.0
    out = int4_activation(x, 32, keep)
    torch.testing.assert_close(out, ref_int4_activation(x, 32, keep), rtol=0, atol=0)
    planted = {0: [], 2: [7, 40, 41], 3: [7, 40, 41]}[keep]
    assert torch.equal(out[..., planted], x[..., planted])
    for g, q in zip(x.reshape(-1, 32), out.reshape(-1, 32)):
        rest = torch.ones(32, dtype=torch.bool)
        rest[top_indices(g, keep)] = False
        scale = float(g[rest].abs().max())
        k = q[rest] * 7 / scale
        assert torch.all((k - k.round()).abs() < 1e-4) and k.round().abs().max() <= 7
        assert torch.all((q - g)[rest].abs() <= scale / 14 * (1 + 1e-5))
        assert torch.equal(q[~rest], g[~rest])


@pytest.mark.parametrize("keep", [0, 2])
def test_fp4_values_lie_on_the_e1m2_grid_times_the_group_absmax(keep):
    torch.manual_seed(2)
    x = torch.randn(4, 64) * 3
    x[:, 5] = 100.0
    out = fp4_e1m2(x, 32, keep)
    torch.testing.assert_close(out, ref_fp4(x, 32, keep), rtol=0, atol=0)
    for g, q in zip(x.reshape(-1, 32), out.reshape(-1, 32)):
        rest = torch.ones(32, dtype=torch.bool)
        rest[top_indices(g, keep)] = False
        absmax = g[rest].abs().max()
        on_grid = ((q[rest] / absmax)[:, None] - FP4_LEVELS[None, :]).abs().min(dim=1).values
        assert torch.all(on_grid < 1e-6)
        assert torch.all((q - g)[rest].abs() <= absmax / 8 * (1 + 1e-5))  # half the 0.25 step
        assert torch.equal(q[~rest], g[~rest])


def test_quantizers_return_the_input_dtype_and_keep_bf16_outliers_exactly():
    torch.manual_seed(3)
    x = (torch.randn(4, 64) * 2).bfloat16()
    for out in (int4_weight(x, 32), int4_activation(x, 32, 2), fp4_e1m2(x, 32, 2)):
        assert out.dtype == torch.bfloat16
    out = int4_activation(x, 32, 2)
    for g, q in zip(x.float().reshape(-1, 32), out.float().reshape(-1, 32)):
        idx = top_indices(g, 2)
        assert torch.equal(q[idx], g[idx])


N_DRAWS = 4000


@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbouring_level(kind):
    torch.manual_seed(4)
    base = torch.randn(4, 16)  # 4 groups of 16
    base[:, 0] = torch.tensor([-2.5, 2.2, -1.9, 3.1])  # the same extremes in every copy: the same grid
    draws = base.repeat(N_DRAWS, 1)  # N_DRAWS copies of each group: independent draws on the same grid
    if kind == "weight":
        out = int4_weight(draws, 16, stochastic=True).reshape(N_DRAWS, 4, 16)
        low, high = base.amin(1, keepdim=True), base.amax(1, keepdim=True)
        scale = (high - low) / 15
        zero = torch.round(-low / scale)
        level = base / scale + zero  # fractional level of each value on the grid (k - zero) * scale
        inside = (level >= 0) & (level <= 15)  # the clamp at the grid's ends biases values beyond them
    else:
        out = int4_activation(draws, 16, keep_outliers=0, stochastic=True).reshape(N_DRAWS, 4, 16)
        scale = base.abs().amax(1, keepdim=True) / 7
        zero = torch.zeros(4, 1)
        level = base / scale
        inside = torch.ones_like(base, dtype=torch.bool)
    levels = out / scale + zero
    assert torch.all((levels - levels.round()).abs() < 1e-3)
    assert torch.all((levels.round() == level.floor()) | (levels.round() == level.ceil()))
    # Each draw is one of two levels `scale` apart, so by Hoeffding P(|mean - x| >= t) <= 2 exp(-2 N t^2 / s^2);
    # over the 64 values, t = s * sqrt(ln(2 * 64 / 1e-6) / (2 N)) fails with probability below 1e-6.
    bound = scale * math.sqrt(math.log(2 * 64 / 1e-6) / (2 * N_DRAWS))
    error = (out.mean(0) - base).abs()
    assert torch.all(error[inside] <= bound.expand_as(base)[inside] + 1e-6)
    assert inside.sum() >= 60
    rounded = int4_weight(draws, 16) if kind == "weight" else int4_activation(draws, 16, 0)
    assert (out != rounded.reshape(out.shape)).any()  # it is not round-to-nearest


# ---------------------------------------------------------------------------------------------------------
# The straight-through linear


class StraightThrough(torch.autograd.Function):
    """forward: quantizer(x); backward: identity."""

    @staticmethod
    def forward(ctx, x, quantizer):
        return quantizer(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@pytest.mark.parametrize("weights, activations", [("int4", "int4"), ("fp4", "fp4"), ("int4", "none"),
                                                  ("none", "fp4")])
def test_linear_gradients_use_the_quantized_tensors_straight_through(weights, activations):
    torch.manual_seed(5)
    quant = QuantConfig(weights=weights, activations=activations, group_size=16, keep_outliers=2)
    linear = torch.nn.Linear(32, 24, bias=True)
    layer = FakeQuantLinear.from_linear(linear, quant)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 5, 32, requires_grad=True)
    grad_out = torch.randn(3, 5, 24)
    out = layer(x)
    qx = REF_QUANTIZERS["activations"][activations](x.detach(), quant)
    qw = REF_QUANTIZERS["weights"][weights](linear.weight.detach(), quant)
    torch.testing.assert_close(out, qx @ qw.t() + linear.bias, rtol=1e-6, atol=1e-6)
    out.backward(grad_out)
    rows = grad_out.reshape(-1, 24)
    torch.testing.assert_close(linear.weight.grad, rows.t() @ qx.reshape(-1, 32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_out @ qw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear.bias.grad, rows.sum(0))


def test_bf16_autocast_multiplies_in_bf16_and_keeps_fp32_master_gradients():
    torch.manual_seed(9)
    quant = QuantConfig(weights="int4", activations="int4", group_size=16)
    linear = torch.nn.Linear(32, 24, bias=False)
    layer = FakeQuantLinear.from_linear(linear, quant)
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert linear.weight.grad.dtype == torch.float32
    qx = ref_int4_activation(x, 16, 2).bfloat16().float()
    expected = torch.ones(10, 24).t() @ qx.reshape(10, 32)
    torch.testing.assert_close(linear.weight.grad, expected, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------
# A whole tiny LLaMA


def tiny_llama(seed=6):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def quantize_by_hand(model, quant):
    """The reference model: each attention/MLP linear computes F.linear(Q(x), Q(W)) with straight-through Q."""
    aq, wq = REF_QUANTIZERS["activations"][quant.activations], REF_QUANTIZERS["weights"][quant.weights]
    for layer in model.model.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            def forward(x, linear=linear):
                qx = StraightThrough.apply(x, lambda t: aq(t, quant))
                qw = StraightThrough.apply(linear.weight, lambda t: wq(t, quant))
                return F.linear(qx, qw, linear.bias)
            linear.forward = forward


@pytest.mark.parametrize("weights, activations", [("int4", "int4"), ("fp4", "fp4"), ("fp4", "int4")])
def test_tiny_quantized_llama_matches_a_written_out_reference(weights, activations):
    quant = QuantConfig(weights=weights, activations=activations, group_size=16, keep_outliers=2)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    replaced = apply_fake_quant(model, quant)
    assert len(replaced) == 14 and "lm_head" not in replaced
    assert not any(isinstance(m, FakeQuantLinear) for m in (model.lm_head, model.model.embed_tokens))
    quantize_by_hand(reference, quant)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(7))
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    assert not torch.allclose(out.logits, tiny_llama()(ids).logits, atol=1e-3)  # quantization changed it
    out.loss.backward()
    ref.loss.backward()
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():  # master weights: same names as the plain model
        torch.testing.assert_close(param.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-7, msg=name)
        assert param.dtype == torch.float32


def test_quant_off_changes_nothing():
    cfg = ModelConfig(preset="llama_9m", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, quant=QuantConfig(target_modules=["no_such_layer"]))
    model = build_model(cfg, vocab_size=50)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert apply_fake_quant(model, None) == [] and apply_fake_quant(model, cfg.quant) == []


# ---------------------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("override, message", [
    ("model.quant.weights=int5", "model.quant.weights: 'int5' is not one of ['int4', 'fp4', 'none'] "
                                 "(did you mean 'int4'?)"),
    ("model.quant.activations=fp8", "model.quant.activations: 'fp8' is not one of"),
    ("model.quant.group_size=0", "model.quant.group_size: must be at least 1, got 0"),
    ("model.quant.keep_outliers=-1", "model.quant.keep_outliers: must be >= 0, got -1"),
    ("model.quant.keep_outliers=16", "model.quant.keep_outliers: 16 leaves nothing to quantize in a group of "
                                     "model.quant.group_size 16"),
    ("model.quant.target_modules=[]", "model.quant.target_modules: list at least one"),
    ("model.quant.stochastic=true", "unknown key 'model.quant.stochastic' (did you mean 'stochastic_rounding'?)"),
])
def test_bad_quant_values_fail_naming_the_key(tmp_path, corpus, override, message):
    with pytest.raises(ConfigError) as err:
        build_tiny_config(tmp_path, corpus, "model.quant.weights=int4", "model.quant.group_size=16", override)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("model.quant.group_size=24", "model.quant.group_size: 24 does not divide the hidden size 32; group sizes "
                                  "that do: [1, 2, 4, 8, 16, 32]"),
    ("model.quant.target_modules=[q_proj,gate_prj]", "model.quant.target_modules: 'gate_prj' matches no linear "
                                                     "layer of the model (did you mean 'gate_proj'?)"),
    ("model.quant.target_modules=[lm_head]", "'model.layers.*.mlp.down_proj', 'model.layers.*.mlp.gate_proj'"),
])
def test_quant_that_does_not_fit_the_model_fails_before_any_work(tmp_path, corpus, override, message):
    config = build_tiny_config(tmp_path, corpus, "model.quant.weights=int4", override)
    with pytest.raises(ConfigError) as err:
        Trainer(config)
    assert message in str(err.value)
    assert not config.run_dir.exists()  # found on the meta model, before the tokenizer or any weight


# ---------------------------------------------------------------------------------------------------------
# Training, resume and export through the Trainer

QUANT_RUN = ("model.quant.weights=int4", "model.quant.activations=int4", "model.quant.group_size=16",
             "model.quant.stochastic_rounding=true")


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, corpus):
    """A finished 12-step run with int4 weights and activations (stochastic rounding) and its trainer."""
    config = build_tiny_config(tmp_path_factory.mktemp("quant"), corpus, *QUANT_RUN)
    trainer = Trainer(config)
    trainer.fit()
    return trainer


def test_quantized_run_trains_master_weights(quantized_run):
    replaced = [n for n, m in quantized_run.model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(replaced) == 14
    steps = losses(quantized_run.run_dir)
    assert steps[12] < steps[1] - 0.5
    assert all(p.dtype == torch.float32 for p in quantized_run.model.parameters())


def test_quantized_checkpoint_loads_as_a_plain_model_of_master_weights(quantized_run):
    plain = AutoModelForCausalLM.from_pretrained(latest_checkpoint(quantized_run.run_dir) / "model")
    assert not any(isinstance(m, FakeQuantLinear) for m in plain.modules())
    trained = quantized_run.model.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_quantized_resume_repeats_the_uninterrupted_losses(tmp_path, corpus, quantized_run):
    expected = losses(quantized_run.run_dir)
    split = build_tiny_config(tmp_path, corpus, *QUANT_RUN)
    Trainer(split).fit(stop_at_step=5)  # "interrupted" after step 5; last checkpoint at step 4
    resumed = Trainer(build_tiny_config(tmp_path, corpus, *QUANT_RUN, "checkpoint.resume=auto"))
    assert resumed.step == 4
    assert sum(isinstance(m, FakeQuantLinear) for m in resumed.model.modules()) == 14
    resumed.fit()
    got = losses(split.run_dir)
    for step in range(1, 13):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    with pytest.raises(ConfigError, match=r"model.quant.activations: 'int4' -> 'fp4'"):
        Trainer(build_tiny_config(tmp_path, corpus, *QUANT_RUN, "model.quant.activations=fp4",
                                  "checkpoint.resume=auto"))


def test_export_writes_plain_and_fake_quantized_models(tmp_path, quantized_run, capsys):
    checkpoint = latest_checkpoint(quantized_run.run_dir)
    master = quantized_run.model.state_dict()
    assert export_main([str(checkpoint), str(tmp_path / "plain")]) == 0
    assert export_main([str(checkpoint), str(tmp_path / "fq"), "--fake-quant"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    fq = AutoModelForCausalLM.from_pretrained(tmp_path / "fq")
    assert AutoTokenizer.from_pretrained(tmp_path / "fq").get_vocab() == quantized_run.tokenizer.get_vocab()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, master[name]), name
    quant = QuantConfig(weights="int4", group_size=16)
    for name, tensor in fq.state_dict().items():
        projection = any(f".{p}." in name for p in quant.target_modules)
        expected = ref_int4_weight(master[name], 16) if projection else master[name]
        assert torch.equal(tensor, expected), name
    # The exported plain model computes what the weight-quantized model computes.
    cfg = ModelConfig(preset=None, pretrained=str(checkpoint / "model"), quant=quant)
    ids = torch.randint(0, fq.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(fq(ids).logits, build_model(cfg)(ids).logits, rtol=0, atol=1e-6)


def test_export_errors_name_the_problem(tmp_path, corpus, quantized_run, capsys):
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert export_main([str(latest_checkpoint(quantized_run.run_dir)), str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    plain_run = build_tiny_config(tmp_path / "plain", corpus, "train.max_steps=1")
    Trainer(plain_run).fit()
    checkpoint = latest_checkpoint(plain_run.run_dir)
    assert export_main([str(checkpoint), str(tmp_path / "out"), "--fake-quant"]) == 2
    err = capsys.readouterr().err
    assert "was trained without quantized weights" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
