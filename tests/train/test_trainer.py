"""The trainer end to end on a tiny model and a corpus the test writes."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_config, write_tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from lowmem.data.tokenizer import EOS_TOKEN
from lowmem.errors import ConfigError
from lowmem.optim import OPTIMIZERS
from lowmem.train import checkpoint as ckpt
from lowmem.train.checkpoint import latest_checkpoint, list_checkpoints, load_state
from lowmem.train.metrics import read_metrics
from lowmem.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[2]


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
    assert memory["event"] == "memory" and memory["state_dtype"] == "fp32"
    assert memory["parameters"] == sum(p.numel() for p in trainer.model.parameters())
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


@pytest.mark.parametrize("name, dtype", [("bnb_adamw8bit", "int8"), ("adamw8bit", "int8"), ("galore", "fp32")])
def test_the_memory_record_names_how_the_moments_are_stored(tmp_path, corpus, make_config, name, dtype):
    config = make_config(tmp_path, corpus, f"optimizer.name={name}", "optimizer.lr=0.01", "train.max_steps=1",
                         "train.eval_every=0", "checkpoint.every=0")
    Trainer(config).fit()
    assert read_metrics(config.run_dir)[0]["state_dtype"] == dtype  # after the first update: what is held


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
    assert set(a["optimizer"]["by_name"]) == {n for n, _ in trainer.model.named_parameters()}  # keyed by name
    for name, state in a["optimizer"]["by_name"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["by_name"][name]["exp_avg"])


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
    if override.startswith("model.pretrained"):  # the tiny config's shapes and BPE do not apply to it
        overrides += [f"model.{key}=null" for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads")] + ["tokenizer.train_bpe=null"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(make_config(tmp_path, corpus, *overrides))


# ---------------------------------------------------------------------------------------------------------
# Update-in-backward: exact resume, dropped gradients, the scheduler warning, non-finite gradients

# UpdateInBackward steps any torch optimizer one weight at a time, so every registered optimizer supports it.
IN_BACKWARD_OPTIMIZERS = sorted(OPTIMIZERS)


def in_backward_overrides(name: str) -> list[str]:
    """Update-in-backward with accumulation for optimizer `name`, with a rank the tiny model allows and a
    projection refresh gap short enough to refresh after a resume at step 3."""
    defaults = OPTIMIZERS[name].options()  # the preset's parts decide which keys it reads
    return ([f"optimizer.name={name}", "optimizer.update_in_backward=true", "train.grad_clip=0",
             "train.grad_accum=2"]
            + (["optimizer.rank=8"] if defaults.reads("rank") else [])
            + (["optimizer.update_gap=2"] if defaults.reads("update_gap") else [])
            + (["optimizer.lr=null"] if defaults.lr is None else []))  # its own step size


@pytest.mark.parametrize("name", IN_BACKWARD_OPTIMIZERS)
def test_update_in_backward_resume_repeats_the_uninterrupted_losses(tmp_path, corpus, make_config, name):
    # The lr at the resume point (3) differs from the first warmup lr, which a stale param group would keep.
    overrides = [*in_backward_overrides(name), "train.max_steps=6", "checkpoint.every=3", "train.eval_every=0"]
    whole = make_config(tmp_path / "a", corpus, *overrides)
    Trainer(whole).fit()
    split = make_config(tmp_path / "b", corpus, *overrides)
    Trainer(split).fit(stop_at_step=4)
    resumed = Trainer(make_config(tmp_path / "b", corpus, *overrides, "checkpoint.resume=auto"))
    assert resumed.step == 3
    resumed.fit()
    expected, got = losses(whole.run_dir), losses(split.run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == expected[step], f"{name}, step {step}: {got[step]} != {expected[step]}"


def test_update_in_backward_gives_no_scheduler_order_warning(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, *in_backward_overrides("galore"), "train.max_steps=2",
                         "checkpoint.every=0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(config).fit()
    assert [str(w.message) for w in caught if "lr_scheduler.step()" in str(w.message)] == []


def test_update_in_backward_never_applies_a_non_finite_gradient(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, *in_backward_overrides("adamw"))
    trainer = Trainer(config)
    trainer.fit(stop_at_step=4)
    good = latest_checkpoint(config.run_dir)
    trainer.model.model.norm.weight.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
    with pytest.raises(TrainingDiverged, match="the gradient of model.norm.weight became non-finite at step 5"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert list_checkpoints(config.run_dir) == [good]


# ---------------------------------------------------------------------------------------------------------
# Never a bad "last good" checkpoint

def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus)
    trainer = Trainer(config)
    trainer.fit(stop_at_step=4)
    good = latest_checkpoint(config.run_dir)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite values in lm_head.weight at step 4"):
        trainer.save()  # would have replaced the good step-4 checkpoint
    ckpt.verify_checkpoint(good)
    assert list_checkpoints(config.run_dir) == [good]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus):
    """A finished 12-step run (checkpoints at steps 8 and 12) that tests copy and damage."""
    tmp = tmp_path_factory.mktemp("trained")
    config = build_tiny_config(tmp, corpus)
    Trainer(config).fit()
    return config.run_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def non_finite_weights(checkpoint):
    file = checkpoint / "model" / "model.safetensors"
    weights = load_file(file)
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, file, metadata={"format": "pt"})


DAMAGE = {
    "state-truncated": lambda c: truncate(c / "state.pt"),
    "weights-truncated": lambda c: truncate(c / "model" / "model.safetensors"),
    "weights-non-finite": non_finite_weights,
    "tokenizer-garbled": lambda c: (c / "model" / "tokenizer.json").write_text("{\"added_tokens\": 7"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, corpus, make_config, trained_run, capsys,
                                                                 damage):
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(trained_run, run_dir)
    newest = run_dir / "checkpoints" / "step_00000012"
    DAMAGE[damage](newest)
    trainer = Trainer(make_config(tmp_path, corpus, "checkpoint.resume=auto"))
    err = capsys.readouterr().err
    assert f"warning: checkpoint '{newest}'" in err and "falling back to the checkpoint before it" in err
    assert trainer.step == 8
    trainer.fit()
    assert losses(run_dir) == losses(trained_run)  # the fallback resumes exactly
    assert ckpt.last_good_checkpoint(run_dir) == newest  # rewritten, good
    abandoned = list((run_dir / "checkpoints").glob("abandoned-*"))
    assert [p.name for p in abandoned[0].iterdir()] == ["step_00000012"]  # the damaged one, kept aside


def test_resuming_an_older_checkpoint_by_hand_always_leaves_a_loadable_newest_checkpoint(tmp_path, corpus,
                                                                                       make_config, monkeypatch):
    config = make_config(tmp_path, corpus, "checkpoint.keep_last=3")
    Trainer(config).fit()  # checkpoints 4, 8, 12
    run_dir = config.run_dir
    saves = []
    real_save = ckpt.save_checkpoint

    def save_and_look(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saves.append((path.name, [p.name for p in list_checkpoints(run_dir)], ckpt.last_good_checkpoint(run_dir)))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_look)
    trainer = Trainer(make_config(tmp_path, corpus, f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000004'}",
                                  "checkpoint.keep_last=1"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]  # the abandoned future moved aside
    trainer.fit()
    assert saves == [("step_00000008", ["step_00000008"], run_dir / "checkpoints" / "step_00000008"),
                     ("step_00000012", ["step_00000012"], run_dir / "checkpoints" / "step_00000012")]
    [abandoned] = (run_dir / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000008", "step_00000012"]


# ---------------------------------------------------------------------------------------------------------
# Signals

def signal_after_step(trainer, monkeypatch, step, *signums):
    real_step = trainer.train_step

    def train_step(batches):
        record = real_step(batches)
        if trainer.step == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return record

    monkeypatch.setattr(trainer, "train_step", train_step)


def handlers():
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_update_writes_a_checkpoint_and_stops(tmp_path, corpus, make_config, monkeypatch,
                                                                    signum):
    before = handlers()
    trainer = Trainer(make_config(tmp_path, corpus))
    signal_after_step(trainer, monkeypatch, 3, signum)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert handlers() == before
    assert (stopped.value.step, stopped.value.exit_code) == (3, 128 + signum)
    assert stopped.value.checkpoint == latest_checkpoint(trainer.run_dir)
    assert stopped.value.checkpoint.name == "step_00000003"
    assert Trainer(make_config(tmp_path, corpus, "checkpoint.resume=auto")).step == 3


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, corpus, capsys, monkeypatch):
    from lowmem.cli import main

    before = handlers()
    real_step = Trainer.train_step

    def train_step(self, batches):
        record = real_step(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert main([str(write_tiny_config(tmp_path, corpus))]) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("interrupted: SIGINT after step 2, stopped at once; there is no good checkpoint "
                                    "to resume from")
    assert "Traceback" not in err
    assert handlers() == before
    assert list_checkpoints(tmp_path / "runs" / "t") == []


@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_py_stops_cleanly_on_a_signal_and_resumes_from_its_checkpoint(tmp_path, corpus, signum):
    config = write_tiny_config(tmp_path, corpus)
    run_dir = tmp_path / "runs" / "t"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), str(config), "train.max_steps=100000",
                                "checkpoint.every=0", "train.eval_every=0"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 2:  # training has begun
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    [checkpoint] = list_checkpoints(run_dir)
    step = load_state(checkpoint)["trainer"]["step"]
    name = signal.Signals(signum).name
    assert err.splitlines()[-1] == (f"interrupted: {name} received: stopped after step {step} and wrote the "
                                    f"checkpoint {checkpoint}; continue with checkpoint.resume=auto")
    assert "Traceback" not in err
    resumed = Trainer(build_tiny_config(tmp_path, corpus, "train.max_steps=100000", "checkpoint.every=0",
                                        "train.eval_every=0", "checkpoint.resume=auto"))
    assert resumed.step == step == max(losses(run_dir))
    resumed.close()


# ---------------------------------------------------------------------------------------------------------
# One run per run directory

def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path, corpus, make_config):
    first = Trainer(make_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.every=0"))
    with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()} on host "):
        Trainer(make_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.every=0"))
    first.fit()  # undisturbed by the refused one
    assert sorted(losses(first.run_dir)) == [1, 2]
    Trainer(make_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.resume=auto")).close()  # free again


@pytest.mark.subprocess
def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.every=0")
    config.run_dir.mkdir(parents=True)
    holder = ("import fcntl, os, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
              "f.write('pid 1 on host gone'); f.flush(); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", holder, str(config.run_dir / ".lock")])
    assert "pid 1 on host gone" in (config.run_dir / ".lock").read_text()
    assert Trainer(config).fit()["step"] == 2


# ---------------------------------------------------------------------------------------------------------
# The model and its tokenizer

def test_a_saved_model_stops_generating_at_the_tokenizers_eos(tmp_path, corpus, make_config):
    config = make_config(tmp_path, corpus, "train.max_steps=2", "checkpoint.every=0")
    Trainer(config).fit()
    model_dir = latest_checkpoint(config.run_dir) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    saved = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert saved[key] == generation[key] == getattr(tokenizer, key), key
    assert tokenizer.convert_ids_to_tokens(saved["eos_token_id"]) == EOS_TOKEN

    class OnlyEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, tokenizer.eos_token_id] = 0.0
            return forced

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = torch.tensor([tokenizer.encode("alpha beta")])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                         logits_processor=LogitsProcessorList([OnlyEos()]))
    assert out[0, prompt.shape[1]:].tolist() == [tokenizer.eos_token_id]  # stopped at the first eos


def test_a_pretrained_model_trains_with_its_own_tokenizer(tmp_path, corpus, make_config):
    first = make_config(tmp_path / "a", corpus, "train.max_steps=2", "checkpoint.every=0")
    Trainer(first).fit()
    model_dir = latest_checkpoint(first.run_dir) / "model"
    shape_nulls = [f"model.{key}=null" for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads")]
    config = make_config(tmp_path / "b", corpus, f"model.pretrained={model_dir}", "tokenizer.train_bpe=null",
                         *shape_nulls, "train.max_steps=2")
    assert config.tokenizer.name == str(model_dir)
    trainer = Trainer(config)
    assert trainer.tokenizer.name_or_path == str(model_dir)
    assert trainer.fit()["step"] == 2
