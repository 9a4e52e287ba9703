"""The trainer end to end on a tiny model and a corpus the test writes."""
import json
import math

import pytest
import torch
import yaml

from lowmem.checkpoint import latest_checkpoint, list_checkpoints, load_state
from lowmem.config import ConfigError
from lowmem.metrics import read_metrics
from lowmem.trainer import Trainer, TrainingDiverged

def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_run_writes_checkpoint_metrics_and_eval(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus)
    trainer = Trainer(config)
    final = trainer.fit()
    assert final["step"] == 12 and math.isfinite(final["eval_ppl"]) and final["eval_tokens"] > 0
    records = read_metrics(config.run_dir)
    memory = records[0]
    num_tensors = sum(1 for _ in trainer.model.parameters())
    # AdamW: two fp32 moments per weight plus one fp32 step counter per tensor.
    assert memory["event"] == "memory"
    assert memory["optimizer_state_bytes"] == 2 * memory["params_bytes"] + 4 * num_tensors
    assert memory["grads_bytes"] == memory["params_bytes"]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in steps[0]
    assert {r["step"] for r in records if "eval_loss" in r} == {6, 12}
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [p.name for p in list_checkpoints(config.run_dir)] == ["step_00000008", "step_00000012"]
    saved = yaml.safe_load((config.run_dir / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.01 and saved["data"]["seq_len"] == 32


def test_resumed_run_repeats_the_uninterrupted_losses(tmp_path, corpus, make_config):
    whole = make_config(tmp_path / "a", corpus)
    Trainer(whole).fit()
    expected = losses(whole.run_dir)

    split = make_config(tmp_path / "b", corpus)
    Trainer(split).fit(stop_at_step=5)  # "interrupted" after step 5; last checkpoint at step 4
    assert latest_checkpoint(split.run_dir).name == "step_00000004"
    resumed = make_config(tmp_path / "b", corpus, "checkpoint.resume=auto")
    trainer = Trainer(resumed)
    assert trainer.step == 4
    trainer.fit()
    got = losses(split.run_dir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    a = torch.load(latest_checkpoint(whole.run_dir) / "state.pt", weights_only=True)
    b = torch.load(latest_checkpoint(split.run_dir) / "state.pt", weights_only=True)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])


def test_gradient_accumulation_matches_the_big_batch(tmp_path, corpus, make_config):
    big = make_config(tmp_path / "big", corpus, "train.max_steps=3", "train.batch_size=4")
    small = make_config(tmp_path / "small", corpus, "train.max_steps=3", "train.batch_size=2",
                        "train.grad_accum=2")
    a, b = Trainer(big), Trainer(small)
    a.fit()
    b.fit()
    la, lb = losses(big.run_dir), losses(small.run_dir)
    for step in (1, 2, 3):
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus)
    trainer = Trainer(config)
    trainer.fit(stop_at_step=4)
    good = latest_checkpoint(config.run_dir)
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 5"):
        trainer.fit()
    assert latest_checkpoint(config.run_dir) == good
    assert load_state(good)["trainer"]["step"] == 4


@pytest.mark.parametrize("precision", ["bf16_autocast", "bf16"])
def test_bf16_modes_train(tmp_path, corpus, make_config, precision):
    config = make_config(tmp_path, corpus, f"train.precision={precision}", "train.max_steps=6", "checkpoint.every=0")
    trainer = Trainer(config)
    final = trainer.fit()
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert trainer.model.model.embed_tokens.weight.dtype == expected
    assert math.isfinite(final["eval_loss"])


def test_update_in_backward_matches_the_ordinary_step(tmp_path, corpus, make_config):
    ordinary = make_config(tmp_path / "o", corpus, "train.max_steps=4", "train.grad_accum=2", "train.grad_clip=0")
    hooked = make_config(tmp_path / "h", corpus, "train.max_steps=4", "train.grad_accum=2", "train.grad_clip=0",
                         "optimizer.update_in_backward=true")
    a, b = Trainer(ordinary), Trainer(hooked)
    a.fit()
    b.fit()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in b.model.parameters())
    assert [r["lr"] for r in read_metrics(a.run_dir) if "lr" in r] == \
        [r["lr"] for r in read_metrics(b.run_dir) if "lr" in r]


def test_cli_reports_config_errors(tmp_path, corpus, capsys):
    from lowmem.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"train": {"max_stepz": 3}}))
    assert main([str(path)]) == 2
    assert "unknown key 'train.max_stepz' (did you mean 'max_steps'?)" in capsys.readouterr().err


def test_tensorboard_scalars_are_written_when_asked(tmp_path, corpus, make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(tmp_path, corpus, "log.tensorboard=true", "train.max_steps=3", "checkpoint.every=0")
    Trainer(config).fit()
    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert "eval_ppl" in events.Tags()["scalars"]


def test_a_fresh_run_refuses_a_directory_holding_checkpoints(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "train.max_steps=4")
    Trainer(config).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints.*checkpoint.resume=auto"):
        Trainer(make_config(tmp_path, corpus, "train.max_steps=6"))
    assert [p.name for p in list_checkpoints(config.run_dir)] == ["step_00000004"]


def test_resume_refuses_a_changed_config_and_allows_a_longer_run(tmp_path, corpus, make_config):
    Trainer(make_config(tmp_path, corpus, "train.max_steps=4")).fit()
    with pytest.raises(ConfigError, match=r"optimizer.lr: 0.01 -> 0.1"):
        Trainer(make_config(tmp_path, corpus, "train.max_steps=4", "checkpoint.resume=auto", "optimizer.lr=0.1"))
    with pytest.raises(ConfigError, match=r"model.hidden_size: 32 -> 64"):
        Trainer(make_config(tmp_path, corpus, "checkpoint.resume=auto", "model.hidden_size=64"))
    longer = Trainer(make_config(tmp_path, corpus, "train.max_steps=6", "checkpoint.resume=auto"))
    assert longer.step == 4
    assert longer.fit()["step"] == 6


def test_resuming_a_finished_run_evaluates_and_says_so(tmp_path, corpus, make_config, capsys):
    config = make_config(tmp_path, corpus, "train.max_steps=3")
    first = Trainer(config).fit()
    again = Trainer(make_config(tmp_path, corpus, "train.max_steps=3", "checkpoint.resume=auto")).fit()
    assert "nothing to train" in capsys.readouterr().out
    assert again["step"] == 3 and again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=30", "model: the preset 'llama_9m' with these overrides is not a valid LlamaConfig"),
    ("model.pretrained=/nonexistent/model", "model.pretrained: cannot load '/nonexistent/model'"),
    ("tokenizer.name=./no-such-tokenizer", "tokenizer.name: cannot load './no-such-tokenizer'"),
    ("data.seq_len=4096", "data.seq_len: 4096 exceeds the model's max_position_embeddings 1024"),
])
def test_bad_values_found_while_building_name_the_key(tmp_path, corpus, make_config, override, message):
    overrides = [override] + (["tokenizer.train_bpe=null"] if override.startswith("tokenizer.name") else [])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(make_config(tmp_path, corpus, *overrides))
