"""One truthful config: what runs/NAME/config.yaml records is what trained, and a setting given twice (in lowmem's
YAML and in a DeepSpeed JSON, a launcher flag or a planner flag) agrees or the run is refused at config time.

Every refusal goes through both user entry points, `train.py` (lowmem.cli.main) and the memory planner
(`python -m lowmem.memory`), which must say the same one line and exit 2. One table: each row is a way to say
a setting twice, how to set it up and the words the refusal must hold.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import write_tiny_config
from dist_harness import set_rank_env, spawn

from lowmem import cli
from lowmem.distributed import launch
from lowmem.memory import planner
from lowmem.train.metrics import read_metrics

ENTRY_POINTS: dict[str, Callable[[list[str]], int]] = {"train.py": cli.main, "lowmem.memory": planner.main}


@dataclass
class Setup:
    tmp: Path
    corpus: Path
    monkeypatch: pytest.MonkeyPatch

    def config(self, *overrides: str) -> list[str]:
        return [str(write_tiny_config(self.tmp, self.corpus)), *overrides]

    def deepspeed(self, content: dict | str, *overrides: str, env: dict[str, str] | None = None) -> list[str]:
        """argv with distributed.deepspeed_config naming a file holding `content` (a dict is written as JSON)."""
        path = self.tmp / "ds.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return self.launched(env or {}, f"distributed.deepspeed_config={path}", *overrides)

    def launched(self, env: dict[str, str], *overrides: str) -> list[str]:
        """argv for a run whose launcher set `env` (accelerate launch's flags)."""
        for key, value in env.items():
            self.monkeypatch.setenv(key, value)
        return self.config(*overrides)


# (id, setup returning argv, words the one-line refusal must hold)
CASES: list[tuple[str, Callable[[Setup], list[str]], list[str]]] = [
    ("json-bf16-with-fp32", lambda s: s.deepspeed({"bf16": {"enabled": True}}),
     ["config error: distributed.deepspeed_config: bf16.enabled=true in", "ds.json conflicts with train.precision=fp32",
      "set train.precision=bf16"]),
    ("json-bf16-off-with-bf16", lambda s: s.deepspeed({"bf16": {"enabled": False}}, "train.precision=bf16"),
     ["bf16.enabled=false in", "conflicts with train.precision=bf16", "set train.precision=fp32 or bf16_autocast"]),
    ("json-fp16", lambda s: s.deepspeed({"fp16": {"enabled": True}}),
     ["fp16.enabled=true in", "conflicts with train.precision=fp32", "fp16 is not one of lowmem's precisions"]),
    ("json-zero-stage", lambda s: s.deepspeed({"zero_optimization": {"stage": 3}}, "distributed.zero_stage=1"),
     ["zero_optimization.stage=3 in", "conflicts with distributed.zero_stage=1", "set distributed.zero_stage=3"]),
    ("json-clipping", lambda s: s.deepspeed({"gradient_clipping": 0.5}),
     ["gradient_clipping=0.5 in", "conflicts with train.grad_clip=1.0", "set train.grad_clip=0.5"]),
    ("json-micro-batch", lambda s: s.deepspeed({"train_micro_batch_size_per_gpu": 8}),
     ["train_micro_batch_size_per_gpu=8 in", "conflicts with train.batch_size=4"]),
    ("json-accumulation", lambda s: s.deepspeed({"gradient_accumulation_steps": 2}),
     ["gradient_accumulation_steps=2 in", "conflicts with train.grad_accum=1"]),
    ("json-global-batch", lambda s: s.deepspeed({"train_batch_size": 64}),
     ["train_batch_size=64 in", "conflicts with train.batch_size=4 x train.grad_accum=1 x 1 ranks = 4",
      "set train.global_batch_size=64"]),
    ("json-optimizer", lambda s: s.deepspeed({"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}),
     ["distributed.deepspeed_config: optimizer in", "conflicts with optimizer.name=adamw"]),
    ("json-scheduler", lambda s: s.deepspeed({"scheduler": {"type": "WarmupLR"}}),
     ["distributed.deepspeed_config: scheduler in", "conflicts with train.schedule=cosine"]),
    ("json-misspelled-top-level-key", lambda s: s.deepspeed({"zero_optimizaton": {"stage": 2}}),
     ["unknown DeepSpeed key 'zero_optimizaton' in", "(did you mean 'zero_optimization'?)"]),
    ("json-unknown-zero-key", lambda s: s.deepspeed({"zero_optimization": {"stage": 2, "overlap_com": True}}),
     ["unknown key 'zero_optimization.overlap_com' in", "(did you mean 'overlap_comm'?)"]),
    ("json-syntax-error", lambda s: s.deepspeed('{\n  "bf16": {"enabled": true},\n  "steps_per_print": ,\n}'),
     ["distributed.deepspeed_config: '", "ds.json' is not valid JSON", "at line 3, column 22"]),
    ("json-top-level-list", lambda s: s.deepspeed("[1, 2]"),
     ["ds.json' must hold a JSON object ({...}) at top level, got a list"]),
    ("json-stage-two", lambda s: s.deepspeed({"zero_optimization": {"stage": "two"}}),
     ["distributed.deepspeed_config: zero_optimization.stage in", 'got "two"']),
    ("json-deepspeed-refuses", lambda s: s.deepspeed({"nebula": {"enabled": True}}),
     ["distributed.deepspeed_config: DeepSpeed refuses", "ds.json: Nebula checkpointing has been removed"]),
    ("json-under-ddp", lambda s: s.deepspeed({"zero_optimization": {"stage": 2}}, "distributed.backend=ddp"),
     ["distributed.deepspeed_config: set, but distributed.backend is 'ddp'"]),
    ("flag-mixed-precision", lambda s: s.launched({"ACCELERATE_MIXED_PRECISION": "bf16"}),
     ["config error: ACCELERATE_MIXED_PRECISION=bf16 (accelerate launch --mixed_precision) conflicts with "
      "train.precision=fp32: set train.precision=bf16_autocast"]),
    ("flag-fp16", lambda s: s.launched({"ACCELERATE_MIXED_PRECISION": "fp16"}, "train.precision=bf16_autocast"),
     ["ACCELERATE_MIXED_PRECISION=fp16", "train.precision=bf16_autocast", "fp16 is not one of lowmem's precisions"]),
    ("flag-zero-stage", lambda s: s.launched({"ACCELERATE_USE_DEEPSPEED": "true",
                                              "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
     ["ACCELERATE_DEEPSPEED_ZERO_STAGE=3 (accelerate launch --zero_stage) conflicts with distributed.zero_stage=2",
      "set distributed.zero_stage=3"]),
    ("flag-accumulation", lambda s: s.launched({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}),
     ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4", "conflicts with train.grad_accum=1", "set train.grad_accum=4"]),
    ("flag-clipping", lambda s: s.launched({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}),
     ["ACCELERATE_GRADIENT_CLIPPING=0.5", "conflicts with train.grad_clip=1.0"]),
    ("flag-fsdp", lambda s: s.launched({"ACCELERATE_USE_FSDP": "true"}),
     ["ACCELERATE_USE_FSDP=true", "conflicts with distributed.backend=auto", "lowmem has no FSDP backend"]),
    ("flag-deepspeed-with-ddp", lambda s: s.launched({"ACCELERATE_USE_DEEPSPEED": "true"}, "distributed.backend=ddp"),
     ["ACCELERATE_USE_DEEPSPEED=true", "conflicts with distributed.backend=ddp", "set distributed.backend=deepspeed"]),
    ("flag-cpu-with-cuda", lambda s: s.launched({"ACCELERATE_USE_CPU": "True"}, "train.device=cuda"),
     ["ACCELERATE_USE_CPU=True (accelerate launch --cpu) conflicts with train.device=cuda"]),
    ("flag-offload", lambda s: s.launched({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}),
     ["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE=cpu", "zero_optimization.offload_optimizer.device"]),
    ("flag-dynamo", lambda s: s.launched({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}),
     ["ACCELERATE_DYNAMO_BACKEND=INDUCTOR", "--dynamo_backend no"]),
    ("flag-other-deepspeed-file", lambda s: s.deepspeed({}, env={"ACCELERATE_DEEPSPEED_CONFIG_FILE": "other.json"}),
     ["ACCELERATE_DEEPSPEED_CONFIG_FILE=", "other.json", "conflicts with distributed.deepspeed_config=",
      "ds.json"]),
    ("zero3-with-a-matrix-optimizer",
     lambda s: s.config("distributed.backend=deepspeed", "distributed.zero_stage=3", "optimizer.name=galore",
                        "optimizer.rank=4"),
     ["config error: distributed.zero_stage: ZeRO-3 splits every weight over the ranks, and 'galore'"]),
]


def refusal(capsys) -> str:
    """The one `config error:` line on stderr (nothing else may look like an error or a traceback)."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name, setup, words", CASES, ids=[case[0] for case in CASES])
def test_a_setting_given_twice_that_disagrees_is_refused_at_config_time(tmp_path, corpus, capsys, monkeypatch,
                                                                        entry, name, setup, words):
    argv = setup(Setup(tmp_path, corpus, monkeypatch))
    assert ENTRY_POINTS[entry](argv) == 2
    line = refusal(capsys)
    assert line.startswith("config error: ")
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not (tmp_path / "runs" / "t").exists()  # refused before any work


def test_the_planner_refuses_zero3_with_a_matrix_optimizer_as_training_does(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    assert planner.main(s.config("optimizer.name=galore", "optimizer.rank=4", "--world-size", "2",
                                 "--zero-stage", "3")) == 2
    planned = refusal(capsys)
    assert cli.main(s.config("optimizer.name=galore", "optimizer.rank=4", "distributed.backend=deepspeed",
                             "distributed.zero_stage=3")) == 2
    assert refusal(capsys) == planned
    assert "distributed.zero_stage: ZeRO-3 splits every weight" in planned


def test_planner_flags_that_contradict_the_config_are_refused(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    assert planner.main(s.config("distributed.zero_stage=2", "--zero-stage", "3")) == 2
    assert "config error: --zero-stage 3 conflicts with distributed.zero_stage=2" in refusal(capsys)
    assert planner.main(s.config("distributed.backend=ddp", "--world-size", "2", "--zero-stage", "1")) == 2
    assert "--zero-stage 1 conflicts with distributed.backend=ddp" in refusal(capsys)
    # the ranks planned are the ranks validated: a global batch 3 ranks cannot divide, as train.py on 3 ranks
    assert planner.main(s.config("train.global_batch_size=8", "--world-size", "3")) == 2
    assert "train.global_batch_size: 8 is not a multiple of train.batch_size 4 x 3 ranks" in refusal(capsys)


def test_planner_plans_the_stage_the_config_trains_with(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    agreeing = {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "bf16": {"enabled": "auto"}}
    argv = s.deepspeed(agreeing, "distributed.backend=deepspeed", "distributed.zero_stage=1", "model.vocab_size=300")
    assert planner.main([*argv, "--world-size", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["assumptions"]["zero_stage"], plan["assumptions"]["world_size"]) == (1, 2)


def recorded(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_agreeing_settings_train_and_the_record_says_what_trained(tmp_path, corpus, capsys, monkeypatch):
    """accelerate's bf16 is lowmem's bf16_autocast; --cpu fills train.device=auto; an agreeing DeepSpeed JSON
    ("auto" meaning lowmem's value) passes, on one process as under a launcher."""
    s = Setup(tmp_path, corpus, monkeypatch)
    for key, value in {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "True",
                       "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}.items():
        monkeypatch.setenv(key, value)
    agreeing = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2, "overlap_comm": False},
                "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
                "steps_per_print": 100}
    argv = s.deepspeed(agreeing, "train.precision=bf16_autocast", "train.max_steps=2", "train.eval_every=0",
                       "checkpoint.every=0", "model.vocab_size=300")
    assert planner.main(argv) == 0
    assert cli.main(argv) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "t"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    record = recorded(run_dir)
    assert record["train"]["precision"] == "bf16_autocast"
    assert record["train"]["device"] == "cpu"  # applied from accelerate launch --cpu
    assert record["distributed"]["deepspeed_config"] == str(tmp_path / "ds.json")


def deepspeed_worker(rank: int, world: int, port: int, argv: list[str], env: dict[str, str], tmp: str) -> None:
    """One rank of `accelerate launch --use_deepspeed ... train.py ARGV`: writes what DeepSpeed was handed."""
    set_rank_env(rank, world, port)
    os.environ.update(env)
    import deepspeed

    initialize = deepspeed.initialize

    def recording(*args, **kwargs):
        if rank == 0:
            (Path(tmp) / "handed.json").write_text(json.dumps(kwargs["config"]))
        return initialize(*args, **kwargs)

    deepspeed.initialize = recording
    sys.exit(cli.main(argv))  # leaves with os._exit on several ranks


@pytest.mark.distributed
def test_a_deepspeed_run_records_the_settings_deepspeed_trained_with(tmp_path, corpus):
    """Two ranks under accelerate's DeepSpeed flags and an agreeing JSON given by --deepspeed_config_file: the
    recorded config names the backend, stage, file, precision and clipping DeepSpeed was handed."""
    ds_file = tmp_path / "from-accelerate.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto",
                                   "gradient_clipping": 0.5, "bf16": {"enabled": False}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1",
           "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)}
    argv = [str(write_tiny_config(tmp_path, corpus)), "distributed.zero_stage=1", "train.grad_clip=0.5",
            "train.batch_size=1", "train.max_steps=2", "train.eval_every=0", "checkpoint.every=0"]
    spawn(deepspeed_worker, 2, argv, env, str(tmp_path))
    run_dir = tmp_path / "runs" / "t"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    record, handed = recorded(run_dir), json.loads((tmp_path / "handed.json").read_text())
    assert record["distributed"]["backend"] == "deepspeed"  # auto, resolved from accelerate launch --use_deepspeed
    assert record["distributed"]["deepspeed_config"] == str(ds_file)  # applied from --deepspeed_config_file
    assert handed["zero_optimization"]["stage"] == record["distributed"]["zero_stage"] == 1
    assert handed["gradient_clipping"] == record["train"]["grad_clip"] == 0.5
    assert handed["bf16"]["enabled"] is (record["train"]["precision"] == "bf16")
    assert handed["train_micro_batch_size_per_gpu"] == record["train"]["batch_size"] == 1


def test_a_config_refusal_is_reported_by_rank_0_only(tmp_path, corpus, capsys, monkeypatch):
    """Every rank reads the same files and environment, so each would print the same line: only rank 0 does."""
    s = Setup(tmp_path, corpus, monkeypatch)
    argv = s.deepspeed({"bf16": {"enabled": True}})
    exits, waits = [], []
    monkeypatch.setattr(os, "_exit", exits.append)  # on many ranks each leaves at once: keep this process
    # a silent rank gives rank 0 time to print before a launcher ends them all
    monkeypatch.setattr(launch, "wait_for_the_reporter", lambda: waits.append(os.environ["RANK"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(argv) == 2 and exits == [2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(argv) == 2 and exits == [2, 2]
    assert refusal(capsys).startswith("config error: distributed.deepspeed_config:")
    assert waits == ["1"]
