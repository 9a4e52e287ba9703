"""The trainer on several gloo ranks: DDP and DeepSpeed ZeRO give the single-process run on the same global
batch, a checkpoint written by 2 ranks continues on 3 ranks and on 1, a rank that fails ends every rank, and
train.py runs under torchrun."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_config
from dist_harness import free_port, set_rank_env, spawn

from lowmem.train.checkpoint import latest_checkpoint
from lowmem.train.metrics import read_metrics

# Ranks spawned as processes (python -m pytest -m 'not distributed' leaves them out).
pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def train_worker(rank, world, port, tmp, corpus, overrides, stop_at_step):
    set_rank_env(rank, world, port)
    from lowmem.train.trainer import Trainer

    trainer = Trainer(build_tiny_config(Path(tmp), Path(corpus), *overrides))
    trainer.fit(stop_at_step=stop_at_step)
    torch.distributed.barrier()
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, Path(tmp) / "weights.pt")
    sys.stdout.flush()
    os._exit(0)  # leave without the interpreter's teardown (gloo can abort there)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


BASE = ("train.batch_size=1", "train.max_steps=6", "checkpoint.every=3", "train.eval_every=0", "train.grad_clip=1.0")


def single(tmp_path, corpus, *overrides, stop_at_step=None):
    from lowmem.train.trainer import Trainer

    config = build_tiny_config(tmp_path, corpus, *BASE, *overrides)
    trainer = Trainer(config)
    trainer.fit(stop_at_step=stop_at_step)
    return config, trainer


@pytest.mark.parametrize("backend, optimizer", [("ddp", "adamw"), ("deepspeed", "galore"),
                                                ("deepspeed", "adamw8bit")])
def test_ranks_give_the_one_process_run_on_the_same_global_batch(tmp_path, corpus, backend, optimizer):
    overrides = (f"optimizer.name={optimizer}", "train.global_batch_size=4", "optimizer.rank=4",
                 *(("optimizer.update_gap=2",) if optimizer == "galore" else ()))
    overrides = tuple(o for o in overrides if optimizer == "galore" or "rank" not in o)
    config, trainer = single(tmp_path / "one", corpus, *overrides)
    spawn(train_worker, 2, str(tmp_path / "two"), str(corpus), (*BASE, *overrides, f"distributed.backend={backend}"),
          None)
    two = build_tiny_config(tmp_path / "two", corpus, *BASE)
    expected, got = losses(config.run_dir), losses(two.run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    weights = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    for name, p in trainer.model.named_parameters():
        tolerance = 5e-3 if optimizer == "adamw8bit" else 1e-5  # an 8-bit code may flip at a rounding tie
        torch.testing.assert_close(weights[name], p.detach(), atol=tolerance, rtol=0, msg=name)
    memory = read_metrics(two.run_dir)[0]
    assert memory["event"] == "memory" and len(memory["ranks"]) == 2
    single_state = read_metrics(config.run_dir)[0]["optimizer_state_bytes"]
    per_rank = [r["optimizer_state_bytes"] for r in memory["ranks"]]
    if backend == "deepspeed":  # sharded: the ranks hold the single-process state between them
        assert sum(per_rank) == single_state and max(per_rank) < single_state
    else:
        assert per_rank == [single_state, single_state]


def test_a_checkpoint_of_two_ranks_continues_on_three_and_on_one(tmp_path, corpus):
    overrides = ("optimizer.name=galore", "optimizer.rank=4", "optimizer.update_gap=2", "train.global_batch_size=6",
                 "distributed.backend=deepspeed")
    whole, _ = single(tmp_path / "whole", corpus, *overrides[:-1])
    expected = losses(whole.run_dir)
    spawn(train_worker, 2, str(tmp_path / "split"), str(corpus), (*BASE, *overrides), 4)  # checkpoint at step 3
    split = build_tiny_config(tmp_path / "split", corpus, *BASE)
    assert latest_checkpoint(split.run_dir).name == "step_00000003"
    checkpoint = latest_checkpoint(split.run_dir)
    spawn(train_worker, 3, str(tmp_path / "split"), str(corpus), (*BASE, *overrides, "checkpoint.resume=auto"), None)
    on_three = losses(split.run_dir)
    resumed, _ = single(tmp_path / "one", corpus, *overrides[:-1], f"checkpoint.resume={checkpoint}")
    on_one = losses(resumed.run_dir)
    for step in (4, 5, 6):
        assert on_three[step] == pytest.approx(expected[step], rel=1e-5), f"3 ranks, step {step}"
        assert on_one[step] == pytest.approx(expected[step], rel=1e-5), f"1 process, step {step}"


FAILING_RANK = """
import sys
from lowmem import cli
from lowmem.train.trainer import Trainer

real = Trainer.train_step
def train_step(self, batches):
    if self.dist.rank == 1 and self.step == 2:
        raise RuntimeError("injected failure on rank 1")
    return real(self, batches)
Trainer.train_step = train_step
sys.exit(cli.main(sys.argv[1:]))
"""


def torchrun(tmp_path, script_args, world=2, timeout=240):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(free_port()), *script_args]
    start = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


@pytest.mark.subprocess
def test_a_rank_that_fails_ends_every_rank_with_its_cause(tmp_path, corpus):
    build_tiny_config(tmp_path, corpus, *BASE, "distributed.backend=ddp", "distributed.timeout_s=120")
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    done, seconds = torchrun(tmp_path, [str(script), str(tmp_path / "config.yaml"), *BASE,
                                        "distributed.backend=ddp", "distributed.timeout_s=120"])
    assert done.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure on rank 1" in done.stderr
    assert seconds < 100  # ended by the failure, not by the 120 s collective timeout


@pytest.mark.subprocess
def test_train_py_under_torchrun(tmp_path, corpus):
    build_tiny_config(tmp_path, corpus, *BASE)
    done, _ = torchrun(tmp_path, [str(ROOT / "train.py"), str(tmp_path / "config.yaml"), *BASE,
                                  "distributed.backend=deepspeed", "train.global_batch_size=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 6") == 1  # only rank 0 speaks
    assert "distributed: deepspeed on 2 ranks, global batch 2 sequences = 1 x 1 accumulation x 2 ranks" in done.stdout
    assert "memory per rank" in done.stdout
    config = build_tiny_config(tmp_path, corpus, *BASE)
    steps = [r["step"] for r in read_metrics(config.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and math.isfinite(read_metrics(config.run_dir)[-1]["eval_loss"])


def test_zero3_refuses_matrix_optimizers_at_start(tmp_path, corpus):
    from lowmem.distributed.launch import DistContext
    from lowmem.distributed.runtime import DeepSpeedRuntime
    from lowmem.errors import ConfigError
    from lowmem.optim import build_optimizer
    from lowmem.optim.registry import parse_optimizer_options

    config = build_tiny_config(tmp_path, corpus, "optimizer.name=galore", "optimizer.rank=4",
                               "distributed.zero_stage=3")
    model = torch.nn.ModuleDict({"mlp": torch.nn.Linear(4, 4)})
    runtime = DeepSpeedRuntime(DistContext(0, 0, 2, "deepspeed"), config)
    with pytest.raises(ConfigError, match="ZeRO-3 splits every weight over the ranks, and 'galore' has matrix rules"):
        runtime.prepare(model, build_optimizer(model, parse_optimizer_options({"name": "galore", "rank": 2})))


def test_zero3_adamw_trains_saves_and_resumes_as_one_process(tmp_path, corpus):
    overrides = ("optimizer.name=adamw", "train.global_batch_size=4")
    whole, trainer = single(tmp_path / "whole", corpus, *overrides)
    expected = losses(whole.run_dir)
    zero3 = (*BASE, *overrides, "distributed.backend=deepspeed", "distributed.zero_stage=3")
    spawn(train_worker, 2, str(tmp_path / "split"), str(corpus), zero3, 4)  # checkpoint at step 3
    split = build_tiny_config(tmp_path / "split", corpus, *BASE)
    checkpoint = latest_checkpoint(split.run_dir)
    assert checkpoint.name == "step_00000003"
    # the HF model rank 0 wrote holds whole weights (gathered from the partitions)
    from transformers import AutoModelForCausalLM

    at_three, _ = single(tmp_path / "three", corpus, *overrides, stop_at_step=3)
    written = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    reference = AutoModelForCausalLM.from_pretrained(latest_checkpoint(at_three.run_dir) / "model")
    for (name, got), (_, want) in zip(written.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
    spawn(train_worker, 2, str(tmp_path / "split"), str(corpus), (*zero3, "checkpoint.resume=auto"), None)
    resumed, _ = single(tmp_path / "one", corpus, *overrides, f"checkpoint.resume={checkpoint}")
    on_two, on_one = losses(split.run_dir), losses(resumed.run_dir)
    for step in range(1, 7):
        assert on_two[step] == pytest.approx(expected[step], rel=1e-5), f"ZeRO-3, step {step}"
    for step in (4, 5, 6):
        assert on_one[step] == pytest.approx(expected[step], rel=1e-5), f"1 process from ZeRO-3, step {step}"


def test_a_zero_stage_given_to_accelerate_that_the_config_contradicts_is_refused(tmp_path, corpus, monkeypatch):
    from lowmem.distributed.launch import DistContext
    from lowmem.distributed.runtime import DeepSpeedRuntime
    from lowmem.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match=r"ACCELERATE_DEEPSPEED_ZERO_STAGE=1 \(accelerate launch --zero_stage\) "
                                          r"conflicts with distributed.zero_stage=2"):
        build_tiny_config(tmp_path, corpus, "distributed.zero_stage=2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    config = build_tiny_config(tmp_path, corpus, "distributed.zero_stage=2")
    assert DeepSpeedRuntime(DistContext(0, 0, 2, "deepspeed"), config).deepspeed_config()["zero_optimization"][
        "stage"] == 2


def test_resuming_on_two_ranks_sets_the_newer_checkpoints_aside_once(tmp_path, corpus):
    run = tmp_path / "run"
    config, _ = single(run, corpus, "train.global_batch_size=2")  # checkpoints at steps 3 and 6
    root = config.run_dir / "checkpoints"
    resume = f"checkpoint.resume={root / 'step_00000003'}"
    spawn(train_worker, 2, str(run), str(corpus), (*BASE, "train.global_batch_size=2", "distributed.backend=ddp", resume),
          None)
    aside = [p for p in root.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and [p.name for p in aside[0].iterdir()] == ["step_00000006"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000003", "step_00000006"]


LOCAL_DATA_FAULT = """
import sys
from lowmem import cli
from lowmem.errors import DataError
from lowmem.train.trainer import Trainer

def bad_rows():
    raise DataError("data.text_field: line 9 of 'part-1.jsonl' has no text in 'text'")
    yield

real = Trainer._next_batches
def next_batches(self, batches):  # only rank 1's share of the data holds the bad row
    return real(self, bad_rows() if self.dist.rank == 1 and self.step == 2 else batches)
Trainer._next_batches = next_batches
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.subprocess
def test_a_fault_on_two_ranks_is_printed_once_on_one_line(tmp_path, corpus):
    build_tiny_config(tmp_path, corpus, *BASE)
    args = [str(tmp_path / "config.yaml"), *BASE, "distributed.backend=ddp", "distributed.timeout_s=120"]
    done, _ = torchrun(tmp_path, [str(ROOT / "train.py"), *args, "optimizer.lr=.inf"])  # met alike by every rank
    assert done.stderr.count("config error: optimizer.lr: must be a finite number, got inf") == 1, done.stderr
    script = tmp_path / "local_fault.py"
    script.write_text(LOCAL_DATA_FAULT)
    done, _ = torchrun(tmp_path, [str(script), *args])  # met by rank 1 alone, which says so
    assert done.stderr.count("data error: data.text_field: line 9 of 'part-1.jsonl'") == 1, done.stderr
    assert "rank 0 stopped: a collective failed" in done.stderr and "rank 0 failed" not in done.stderr
