"""The memory planner: predicted bytes equal the counted ones for parameters, gradients and optimizer state of
every registered optimizer, and the activation estimate is within 15% of the activations measured on CPU
(the bytes of every tensor a real forward saves for backward, counted once per storage by a saved-tensors
hook, the model's own weights excluded)."""
from __future__ import annotations

import json
import re

import pytest

from lowmem.errors import ConfigError
from lowmem.memory.planner import main, measure_one_update, parse_gpu_size, plan_memory
from lowmem.optim import OPTIMIZERS

VARIANTS = [[f"optimizer.name={name}"] + (["optimizer.lr=null"] if name == "adafactor" else ["optimizer.lr=0.001"])
            for name in sorted(OPTIMIZERS)] + [
    ["optimizer.name=galore", "optimizer.state_dtype=int4"], ["optimizer.name=fira", "optimizer.core=adafactor"],
    ["optimizer.name=adamw", "train.precision=bf16"], ["optimizer.name=galore", "train.precision=bf16_autocast"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_prediction_equals_one_counted_update(tmp_path, corpus, make_config, overrides):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "train.batch_size=4", "data.seq_len=32",
                         *overrides)
    plan = plan_memory(config)
    counted = measure_one_update(config)
    rows = plan.per_rank()
    assert rows["parameters"] == counted["params_bytes"]
    assert rows["gradients"] == counted["grads_bytes"]
    assert rows["optimizer state"] == counted["optimizer_state_bytes"]
    assert abs(rows["activations"] - counted["activations_bytes"]) <= 0.15 * counted["activations_bytes"]


def test_update_in_backward_holds_one_gradient_and_checkpointing_fewer_activations(tmp_path, corpus, make_config):
    base = make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore")
    plan = plan_memory(base)
    hooked = plan_memory(make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore",
                                     "optimizer.update_in_backward=true", "train.grad_clip=0"))
    largest = 300 * 32 * 4  # the embedding (and the head): vocab 300 x hidden 32, fp32
    assert hooked.gradients == largest < plan.gradients
    checkpointed = plan_memory(make_config(tmp_path, corpus, "model.vocab_size=300",
                                           "model.activation_checkpointing=true"))
    assert checkpointed.activations < plan.activations


def test_zero_stages_divide_what_they_shard(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "optimizer.name=galore")
    one = plan_memory(config)
    for stage in (1, 2, 3):
        plan = plan_memory(config, world_size=4, zero_stage=stage)
        rows, base = plan.per_rank(), one.per_rank()
        assert 0 < plan.largest_weight_state < one.optimizer
        assert rows["optimizer state"] == min(-(-one.optimizer // 4) + plan.largest_weight_state, one.optimizer)
        assert rows["gradients"] == (base["gradients"] if stage < 2 else -(-base["gradients"] // 4))
        assert rows["parameters"] == (base["parameters"] if stage < 3 else -(-base["parameters"] // 4))
        assert rows["activations"] == base["activations"]


def test_gpu_sizes_parse_and_bad_ones_are_named():
    assert parse_gpu_size("24GB") == 24 * 2**30 and parse_gpu_size("80GiB") == 80 * 2**30
    assert parse_gpu_size("40") == 40 * 2**30 and parse_gpu_size("512MB") == 512 * 2**20
    with pytest.raises(ConfigError, match="--gpu: cannot read '24 gigs'"):
        parse_gpu_size("24 gigs")


def test_cli_errors_are_one_line(tmp_path, corpus, make_config, capsys):
    make_config(tmp_path, corpus)  # writes tmp_path/config.yaml
    path = str(tmp_path / "config.yaml")
    assert main([path, "--gpu", "lots"]) == 2
    assert "config error: --gpu: cannot read 'lots' as a memory size; write it like 24GB" in capsys.readouterr().err
    assert main([path, "--gpu", "24GB,0GB"]) == 2
    assert "config error: --gpu: '0GB' holds no memory" in capsys.readouterr().err
    assert main([path, "optimizer.nmae=galore"]) == 2
    assert "unknown key 'optimizer.nmae'" in capsys.readouterr().err
    assert main([path, "--world-size", "2", "--max-world-size", "1"]) == 2
    assert "config error: --max-world-size: 1 is below --world-size 2" in capsys.readouterr().err


# A model whose matrices are large enough (64 x 64) for the state settings to change their bytes.
WIDE = ["model.vocab_size=300", "model.hidden_size=64", "model.intermediate_size=128", "data.seq_len=16",
        "optimizer.name=galore", "train.grad_accum=2"]


def planned(capsys, path, *args) -> tuple[int, str]:
    status = main([path, *args])
    return status, capsys.readouterr().out


def mib(text: str) -> int:
    return parse_gpu_size(text)


@pytest.mark.parametrize("budget,flags", [("1.7MB", []), ("1.5MB", []), ("1.2MB", []),
                                          ("1.6MB", ["--max-world-size", "4"])])
def test_a_config_that_does_not_fit_gets_suggestions_that_fit_as_printed(tmp_path, corpus, make_config, capsys,
                                                                          budget, flags):
    from lowmem.distributed.deepspeed_settings import zero_stage_of
    from lowmem.memory.report import format_bytes
    from lowmem.train.config import load_config

    make_config(tmp_path, corpus)
    path = str(tmp_path / "config.yaml")
    status, out = planned(capsys, path, *WIDE, "--gpu", budget, "--json", *flags)
    entry = json.loads(out)["gpus"][budget]
    assert status == 0 and entry["fits"] is False and entry["budget_bytes"] == mib(budget)
    suggestions = entry["suggestions"]
    assert suggestions and len(suggestions) <= 5 and 0 < entry["settings_tried"] <= 60
    # ordered: fewest changes first, then the smallest total
    keys = [(len(s["changes"]), s["total_bytes"]) for s in suggestions]
    assert keys == sorted(keys)
    for s in suggestions:
        # the printed overrides, applied through the config path training uses, give the printed total
        config = load_config(path, WIDE[:] + s["overrides"], s["world_size"])
        plan = plan_memory(config, s["world_size"], zero_stage_of(config))
        assert plan.total() == s["total_bytes"] <= mib(budget)
        assert s["left_bytes"] == mib(budget) - s["total_bytes"]
        assert s["flags"] == ([f"--world-size {s['world_size']}"] if s["world_size"] != 1 else [])
    _, text = planned(capsys, path, *WIDE, "--gpu", budget, *flags)
    assert f"{budget}: does not fit" in text and f"what fits {budget}, the model unchanged" in text
    for i, s in enumerate(suggestions, 1):  # the text says the same, in the same order
        assert f"      {i}. {format_bytes(s['total_bytes']):>10}  {s['changes'][0]}\n" in text
        assert f"+ {' '.join(s['overrides'] + s['flags'])}\n" in text
    if flags:  # more ranks were allowed: the best uses them, and the text says they were allowed
        assert any(s["world_size"] > 1 for s in suggestions)
        assert "on up to 4 ranks, as --max-world-size allows" in text
    else:
        assert "on 1 rank; --max-world-size N allows more" in text


@pytest.mark.parametrize("budget", ["1.5MB", "1.8MB"])
def test_each_suggestion_is_minimal_and_the_gentlest_rung(tmp_path, corpus, make_config, capsys, budget):
    """Without any one of its changes a suggestion no longer fits; a single change is the first rung of its
    ladder that fits (a larger micro-batch, rank or wider moments would not)."""
    from lowmem.memory.suggest import knobs
    from lowmem.train.config import load_config

    make_config(tmp_path, corpus)
    path = str(tmp_path / "config.yaml")
    suggestions = json.loads(planned(capsys, path, *WIDE, "--gpu", budget, "--json")[1])["gpus"][budget]["suggestions"]
    base = load_config(path, WIDE)
    ladders = knobs(base, plan_memory(base).assumptions, 1, 1)
    rung_of = {rung.change: rung for knob in ladders for rung in knob.rungs}

    def total(changes):
        return plan_memory(load_config(path, WIDE + [o for c in changes for o in rung_of[c].overrides])).total()

    for s in suggestions:
        for dropped in s["changes"]:
            assert total([c for c in s["changes"] if c != dropped]) > mib(budget)
    singles = [rung_of[s["changes"][0]] for s in suggestions if len(s["changes"]) == 1]
    not_last = 0
    for rung in singles:
        knob = next(k for k in ladders if rung in k.rungs)
        gentler = knob.rungs[:knob.rungs.index(rung)]
        assert all(total([r.change]) > mib(budget) for r in gentler)
        not_last += rung is not knob.rungs[-1]
    if budget == "1.8MB":  # a single fits short of its ladder's end (micro-batch 2 of 4), then pairs
        assert not_last >= 1 and len(suggestions[0]["changes"]) == 1 and len(suggestions[-1]["changes"]) == 2
    else:  # no single fits: pairs
        assert suggestions and all(len(s["changes"]) == 2 for s in suggestions)


def test_a_config_that_fits_gets_no_suggestions(tmp_path, corpus, make_config, capsys):
    make_config(tmp_path, corpus)
    path = str(tmp_path / "config.yaml")
    status, out = planned(capsys, path, *WIDE, "--gpu", "24GB", "--json")
    assert status == 0 and json.loads(out)["gpus"]["24GB"] == {
        "budget_bytes": 24 * 2**30, "fits": True, "left_bytes": 24 * 2**30 - json.loads(out)["predicted"]["total_bytes"],
        "suggestions": []}
    _, text = planned(capsys, path, *WIDE, "--gpu", "24GB")
    assert "24GB: fits" in text and "what fits" not in text and "nothing the planner" not in text


def test_the_header_lists_the_assumptions(tmp_path, corpus, make_config, capsys):
    make_config(tmp_path, corpus)
    path = str(tmp_path / "config.yaml")
    _, text = planned(capsys, path, *WIDE, "optimizer.state_dtype=int8", "optimizer.rank=8")
    lines = text.splitlines()
    assert lines[0] == "assumptions: llama_9m, 120.6K parameters (all trained); optimizer galore, rank 8"
    assert lines[1] == "  weights fp32, gradients fp32, moments int8 (train.precision=fp32)"
    assert lines[2] == "  batch 4 x 16 tokens per micro-batch, 2 micro-batches per update (8 sequences per update)"
    assert lines[3] == "  activation checkpointing off, update in backward off"
    assert lines[4] == "  1 rank, ZeRO stage 0 (nothing sharded)"
    assert lines[5] == "memory:"
    _, text = planned(capsys, path, *WIDE, "train.precision=bf16", "model.activation_checkpointing=true",
                      "--world-size", "2", "--zero-stage", "1")
    lines = text.splitlines()
    assert lines[1] == "  weights bf16, gradients bf16, moments bf16 (train.precision=bf16)"
    assert lines[2] == "  batch 4 x 16 tokens per micro-batch, 2 micro-batches per update (16 sequences per update)"
    assert lines[3] == "  activation checkpointing on, update in backward off"
    assert lines[4] == "  2 ranks, ZeRO stage 1 (optimizer state sharded)"
    assert lines[5].startswith("memory per rank (what each of the 2 ranks holds; a part is one rank's share)")


def test_parts_per_rank_sum_to_the_rank_state(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, *WIDE)
    whole = plan_memory(config)
    plan = plan_memory(config, world_size=2, zero_stage=1)
    parts = plan.per_rank_parts()
    assert sum(parts.values()) == plan.per_rank()["optimizer state"] < whole.optimizer
    assert parts["moments"] == -(-whole.optimizer_parts["moments"] // 2)
    assert parts["owner imbalance"] > 0
    assert whole.per_rank_parts() == whole.optimizer_parts


def test_json_keys_follow_one_naming_rule(tmp_path, corpus, make_config, capsys):
    """snake_case keys everywhere (the GPU labels aside); every byte count ends in `_bytes`; the predicted and
    measured sections name the same rows alike."""
    make_config(tmp_path, corpus)
    path = str(tmp_path / "config.yaml")
    status, out = planned(capsys, path, *WIDE, "--gpu", "1.5MB,24GB", "--json", "--measure")
    doc = json.loads(out)
    assert status == 0 and list(doc) == ["assumptions", "predicted", "measured", "gpus", "notes"]

    def keys(tree, skip_labels=False):
        for key, value in tree.items():
            if not skip_labels:
                yield key
            if isinstance(value, dict):
                yield from keys(value, skip_labels=key == "gpus")
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        yield from keys(item)

    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", key) for key in keys(doc))
    assert set(doc["gpus"]) == {"1.5MB", "24GB"}

    def byte_counts(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from byte_counts(value)
            else:
                yield key, value

    for section in ("predicted", "measured"):
        assert all(key.endswith("_bytes") and isinstance(value, int) for key, value in byte_counts(doc[section]))
    rows = {"parameters_bytes", "gradients_bytes", "optimizer_state_bytes", "activations_bytes"}
    assert rows <= set(doc["predicted"]) and rows <= set(doc["measured"])
    predicted = doc["predicted"]
    assert predicted["total_bytes"] == sum(predicted[k] for k in rows)
    assert sum(predicted["optimizer_state_parts"].values()) == predicted["optimizer_state_bytes"]
    assert doc["measured"]["parameters_bytes"] == predicted["parameters_bytes"]
    assert doc["assumptions"]["grad_accum"] == 2 and doc["assumptions"]["moments_dtype"] == "fp32"
    for entry in doc["gpus"].values():
        assert {"budget_bytes", "fits", "left_bytes", "suggestions"} <= set(entry)
        for s in entry["suggestions"]:
            assert set(s) == {"changes", "overrides", "flags", "world_size", "total_bytes", "left_bytes"}


def test_update_in_backward_with_accumulation_keeps_every_gradient(tmp_path, corpus, make_config):
    """Accumulated micro-batches sum into every weight's gradient before the last backward steps them: with
    grad_accum > 1 updating in backward frees nothing, so the planner counts them all and suggests folding
    the micro-batches into one (the same sequences per update)."""
    args = ("model.vocab_size=300", "optimizer.update_in_backward=true", "train.grad_clip=0")
    one = plan_memory(make_config(tmp_path, corpus, *args))
    accumulated = plan_memory(make_config(tmp_path, corpus, *args, "train.grad_accum=2"))
    assert accumulated.gradients == accumulated.parameters > one.gradients
    assert any("every gradient exists at once" in note for note in accumulated.notes)
    from lowmem.memory.suggest import knobs

    config = make_config(tmp_path, corpus, "model.vocab_size=300", "train.grad_accum=2")
    knob = next(k for k in knobs(config, plan_memory(config).assumptions, 1, 1) if k.family == "in_backward")
    assert knob.rungs[0].overrides == ("optimizer.update_in_backward=true", "train.grad_clip=0",
                                       "train.batch_size=8", "train.grad_accum=1")


def test_a_model_with_fake_quantized_linears_is_planned_and_measured(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "model.vocab_size=300", "train.batch_size=2", "data.seq_len=32",
                         "model.quant.weights=int4", "model.quant.activations=int4", "model.quant.group_size=16")
    rows = plan_memory(config).per_rank()
    counted = measure_one_update(config)
    assert rows["parameters"] == counted["params_bytes"]
    assert abs(rows["activations"] - counted["activations_bytes"]) <= 0.15 * counted["activations_bytes"]
