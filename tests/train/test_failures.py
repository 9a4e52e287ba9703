"""Every input or environment fault ends with one line naming its cause and a non-zero exit, never a traceback.

One table: each row is a fault, how to set it up, the words its message must hold (and any it must not), and
the exit status. A new class of fault is one more row.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import yaml
from conftest import WORDS, write_tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem.cli import main
from lowmem.data.config import BPEConfig
from lowmem.data.tokenizer import train_bpe
from lowmem.export import main as export_main
from lowmem.train import checkpoint as ckpt
from lowmem.train.metrics import read_metrics
from lowmem.train.rundir import RunLock

ROOT = Path(__file__).resolve().parents[2]
SHAPE_NULLS = [f"model.{key}=null" for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads")]


@dataclass
class Setup:
    tmp: Path
    corpus: Path
    monkeypatch: pytest.MonkeyPatch  # to inject a fault
    held: list = field(default_factory=list)  # objects that must outlive the run (a lock another run holds)

    def config(self, *overrides: str) -> list[str]:
        """argv for the tiny run of conftest, with overrides."""
        return [str(write_tiny_config(self.tmp, self.corpus)), *overrides]

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / "t"

    def jsonl(self, rows: list, name: str = "bad.jsonl") -> Path:
        path = self.tmp / "data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    def saved_tokenizer(self) -> Path:
        path = self.tmp / "tokenizer"
        docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(50)) for i in range(30)]
        train_bpe(BPEConfig(vocab_size=300, min_frequency=1), iter(docs)).save_pretrained(str(path))
        return path


def good_rows(count: int) -> list[dict]:
    return [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40))} for i in range(count)]


def bad_row_in_stream(s: Setup) -> list[str]:
    """The bad row comes after the rows the eval set reads (one tokenizer chunk of held-out rows), so only
    training meets it, mid-run."""
    path = s.jsonl(good_rows(3000) + [{"title": "no text"}])
    return s.config(f"data.files=[{path}]", "data.streaming=true", f"tokenizer.name={s.saved_tokenizer()}",
                    "tokenizer.train_bpe=null", "train.eval_tokens=64", "data.eval_fraction=0.5")


def prepared_without_tokenizer(s: Setup) -> list[str]:
    path = s.tmp / "prepared"
    path.mkdir()
    (path / "meta.json").write_text("{}")
    return s.config("data.source=prepared", f"data.path={path}", "data.files=[]")


def pretrained_smaller_than_tokenizer(s: Setup) -> list[str]:
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_hidden_layers=1, vocab_size=40))
    model.save_pretrained(s.tmp / "small-model")
    return s.config(f"model.pretrained={s.tmp / 'small-model'}", f"tokenizer.name={s.saved_tokenizer()}",
                    "tokenizer.train_bpe=null", *SHAPE_NULLS)


def unreadable_checkpoint(s: Setup) -> Path:
    path = s.run_dir / "checkpoints" / "step_00000004"
    (path / "model").mkdir(parents=True)
    (path / "state.pt").write_bytes(b"not a checkpoint" * 8)
    return path


def run_dir_locked(s: Setup) -> list[str]:
    lock = RunLock(s.run_dir)
    lock.acquire()
    s.held.append(lock)
    return s.config()


def disk_full_at_the_first_checkpoint(s: Setup) -> list[str]:
    def no_space(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    s.monkeypatch.setattr(torch, "save", no_space)
    return s.config()


def cuda_absent(s: Setup) -> list[str]:
    s.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return s.config("train.device=cuda")


def cuda_absent_index(s: Setup) -> list[str]:
    s.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    s.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return s.config("train.device=cuda:3")


def mps_absent(s: Setup) -> list[str]:
    s.monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    return s.config("train.device=mps")


def binary_data_file(s: Setup) -> list[str]:
    path = s.tmp / "random.bin"
    path.write_bytes(bytes([0xF0, 0x28, 0x8C, 0x28]) * 256)
    return s.config(f"data.files=[{path}]")


def include_a_directory(s: Setup) -> list[str]:
    (s.tmp / "models").mkdir()
    path = s.tmp / "with-include.yaml"
    path.write_text("include: models\n")
    return [str(path), *s.config()]


def damaged_tokenizer(s: Setup) -> list[str]:
    path = s.tmp / "damaged-tokenizer"
    path.mkdir()
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')  # lacks the rest
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return s.config(f"tokenizer.name={path}", "tokenizer.train_bpe=null")


def truncated_pretrained_weights(s: Setup) -> list[str]:
    path = s.tmp / "truncated-model"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                 vocab_size=400)).save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    return s.config(f"model.pretrained={path}", f"tokenizer.name={s.saved_tokenizer()}", "tokenizer.train_bpe=null",
                    *SHAPE_NULLS)


def metrics_log_is_a_directory(s: Setup) -> list[str]:
    (s.run_dir / "metrics.jsonl").mkdir(parents=True)
    return s.config()


def config_not_utf8(s: Setup) -> list[str]:
    path = s.tmp / "latin1.yaml"
    path.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    return [str(path)]


def out_dir_is_a_file(s: Setup) -> list[str]:
    (s.tmp / "a-file").write_text("")
    return s.config(f"run.out_dir={s.tmp / 'a-file' / 'runs'}")


def zero_fragment_map_disagrees(s: Setup) -> list[str]:
    """ZeroShardedOptimizer's own check of DeepSpeed's fp32 partition (a fragment map that does not say where
    the weight's values are, as with round_robin_gradients), met while the run builds its optimizer."""
    from lowmem.distributed.zero import ZeroShardedOptimizer

    def refused(model, options):
        weight = torch.nn.Parameter(torch.ones(4))
        weight._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=4),
                                             hp_fragment=torch.zeros(4))
        ZeroShardedOptimizer._check_fragments(SimpleNamespace(names={weight: "layers.0.mlp.up_proj.weight"}))

    s.monkeypatch.setattr("lowmem.train.trainer.build_optimizer", refused)
    return s.config()


# (id, setup returning argv, words the output must hold (the first on stderr), words it must not, exit status).
# "model:" is printed when training starts: a fault found after it was found mid-run.
CASES: list[tuple[str, Callable[[Setup], list[str]], list[str], list[str], int]] = [
    ("override-yaml-syntax", lambda s: s.config("optimizer.betas=[0.9,"),
     ["config error: override 'optimizer.betas=[0.9,'", "optimizer.betas is not valid YAML"], [], 2),
    ("lr-inf", lambda s: s.config("optimizer.lr=.inf"),
     ["config error: optimizer.lr: must be a finite number, got inf"], [], 2),
    ("weight-decay-nan", lambda s: s.config("optimizer.weight_decay=.nan"),
     ["optimizer.weight_decay: must be a finite number, got nan"], [], 2),
    ("eps-nan-string", lambda s: s.config("optimizer.eps=nan"), ["optimizer.eps: must be a finite number"], [], 2),
    ("config-not-utf8", config_not_utf8, ["config error: config file", "latin1.yaml' cannot be read"], [], 2),
    ("jsonl-row-without-text", lambda s: s.config(f"data.files=[{s.jsonl(good_rows(3) + [{'title': 'x'}])}]"),
     ["data error: data.text_field: line 4 of", "bad.jsonl' has no text in 'text' (found null)"], [], 2),
    ("jsonl-row-with-a-number", lambda s: s.config(f"data.files=[{s.jsonl(good_rows(1) + [{'text': 5}])}]"),
     ["data.text_field: line 2 of", "bad.jsonl' has no text in 'text' (found int '5')"], [], 2),
    ("jsonl-row-without-text-streaming-mid-run", bad_row_in_stream,
     ["data error: data.text_field: line 3001 of", "bad.jsonl' has no text in 'text'", "model:"], [], 2),
    ("out-dir-is-a-file", out_dir_is_a_file,
     ["config error: run.out_dir: cannot create or write the run directory", "Not a directory"], ["model:"], 2),
    ("run-dir-locked", run_dir_locked,
     ["config error: run.name: the run directory", "is in use by another run", f"pid {os.getpid()} on host"],
     [], 2),
    ("prepared-without-tokenizer", prepared_without_tokenizer,
     ["data error: data.path:", "has no tokenizer in", "data/prepare.py"], [], 2),
    ("fewer-sequences-than-one-batch", lambda s: s.config("train.batch_size=5000"),
     ["data error: only", "training sequences of data.seq_len 32", "train.batch_size 5000 x 1 ranks"], [], 2),
    ("empty-eval-split-of-files", lambda s: s.config("data.eval_fraction=0.000001"),
     ["data error: the eval split has no documents: raise data.eval_fraction or add documents"],
     ["eval_split"], 2),
    ("vocab-size-below-tokenizer", lambda s: s.config("model.vocab_size=100"),
     ["config error: model.vocab_size: 100 is smaller than the tokenizer's", "tokens"], [], 2),
    ("quickstart-with-pretrained-model", lambda s: [str(ROOT / "configs/quickstart.yaml"),
                                                    f"model.pretrained={s.tmp / 'any-model'}"],
     ["config error: tokenizer.train_bpe:", "set tokenizer.train_bpe=null to train with the model's own tokenizer"],
     [], 2),
    ("pretrained-with-a-larger-tokenizer", pretrained_smaller_than_tokenizer,
     ["config error: tokenizer: tokenizer.name", "tokens but the pretrained model", "has 40 embedding rows"], [], 2),
    ("pretrained-with-shape-overrides", lambda s: s.config(f"model.pretrained={s.tmp}", "tokenizer.train_bpe=null"),
     ["config error: model.hidden_size, model.intermediate_size", "model.hidden_size=null"], [], 2),
    ("resume-from-an-unreadable-checkpoint", lambda s: s.config(f"checkpoint.resume={unreadable_checkpoint(s)}"),
     ["checkpoint error: checkpoint.resume: checkpoint", "step_00000004': state.pt cannot be read"], [], 2),
    ("resume-auto-with-no-loadable-checkpoint",
     lambda s: (unreadable_checkpoint(s), s.config("checkpoint.resume=auto"))[1],
     ["warning: checkpoint", "step_00000004': state.pt cannot be read (not a readable torch file); no older one left",
      "checkpoint error: checkpoint.resume: none of the 1 checkpoints in"], [], 2),
    ("disk-full-while-writing-a-checkpoint", disk_full_at_the_first_checkpoint,
     ["environment error: no space left on device while writing the checkpoint", "step_00000004'",
      "checkpoint.resume=auto"], [], 2),
    *[(f"run-name-{label}", lambda s, name=name: s.config(f"run.name={name}"),
       [f"config error: run.name: {name!r} must be one directory name"], ["model:"], 2)
      for label, name in (("parent", "../x"), ("absolute", "/tmp/x"), ("nested", "a/b"), ("dot", "."),
                          ("dot-dot", ".."), ("empty", ""))],
    ("device-index-not-a-number", lambda s: s.config("train.device=cuda:abc"),
     ["config error: train.device: 'cuda:abc' is not a device"], [], 2),
    ("device-cuda-absent", cuda_absent,
     ["config error: train.device: 'cuda' asked for, but this machine has no cuda device"], [], 2),
    ("device-cuda-index-absent", cuda_absent_index,
     ["config error: train.device: 'cuda:3' asked for, but this machine has 1 cuda device"], [], 2),
    ("device-mps-absent", mps_absent, ["config error: train.device: 'mps' asked for, but this machine has no mps"],
     [], 2),
    ("data-file-is-a-directory", lambda s: s.config(f"data.files=[{s.corpus}]"),
     ["data error: data.files:", "is a directory, not a file", "*.txt"], [], 2),
    ("binary-file-as-text", binary_data_file,
     ["data error: data.files: '", "random.bin' (byte 0) is not UTF-8 text, so it cannot be read as text"], [], 2),
    ("config-file-is-a-directory", lambda s: [str(s.tmp)], ["config error: config file", "is a directory"], [], 2),
    ("include-is-a-directory", include_a_directory,
     ["config error: include: file 'models' is a directory, not a file"], [], 2),
    ("ddp-without-a-launcher", lambda s: s.config("distributed.backend=ddp"),
     ["config error: distributed.backend: 'ddp' joins the ranks a launcher started"], [], 2),
    ("checkpoint-resume-is-a-file", lambda s: s.config(f"checkpoint.resume={s.jsonl([])}"),
     ["config error: checkpoint.resume: checkpoint directory", "bad.jsonl' is a file"], [], 2),
    ("tokenizer-name-is-a-file", lambda s: s.config(f"tokenizer.name={s.jsonl([])}", "tokenizer.train_bpe=null"),
     ["config error: tokenizer.name: cannot load", "bad.jsonl'"], [], 2),
    ("tokenizer-file-damaged", damaged_tokenizer,
     ["config error: tokenizer.name: cannot load", "damaged-tokenizer'", "KeyError"], [], 2),
    ("zero-fragment-map-disagrees", zero_fragment_map_disagrees,
     ["config error: DeepSpeed's fp32 partition does not hold 'layers.0.mlp.up_proj.weight'",
      "round_robin_gradients must be false"], ["Traceback"], 2),
    ("pretrained-weights-truncated", truncated_pretrained_weights,
     ["config error: model.pretrained: cannot load", "truncated-model'"], [], 2),
    ("metrics-log-is-a-directory", metrics_log_is_a_directory,
     ["environment error: is a directory: '", "metrics.jsonl'"], [], 2),
    ("diverging-run", lambda s: s.config("optimizer.lr=1e10"),
     ["training stopped: loss became nan at step", "there is no good checkpoint to resume from"], [], 1),
]


@pytest.mark.parametrize("name, setup, words, absent, status", CASES, ids=[case[0] for case in CASES])
def test_fault_ends_with_a_message_naming_its_cause(tmp_path, corpus, capsys, monkeypatch, name, setup, words, absent,
                                                    status):
    s = Setup(tmp_path, corpus, monkeypatch)
    argv = setup(s)
    try:
        assert main(argv) == status
    finally:
        for lock in s.held:
            lock.release()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert words[0] in err, f"{words[0]!r} not on stderr:\n{err}"
    last = err.strip().splitlines()[-1]  # the fault's one line, "<kind>: <message>"
    assert re.match(r"[a-z ]+: ", last) and any(word in last for word in words), last
    for word in words[1:]:
        assert word in out + err, f"{word!r} not in:\n{out + err}"
    for word in absent:
        assert word not in out + err


# Faults whose disk state after the run matters too: each is driven through the command line, then the run
# directory is inspected.


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def no_space(obj, path, *args, **kwargs) -> None:
    """torch.save writing part of the file, then failing as a full disk does: OSError ENOSPC."""
    Path(path).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def zip_writer_failure(obj, path, *args, **kwargs) -> None:
    """torch.save as it fails on a really full disk: a RuntimeError of its zip writer, naming no errno."""
    Path(path).write_bytes(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("fault", [no_space, zip_writer_failure])
def test_disk_full_on_a_later_save_keeps_the_earlier_checkpoint(tmp_path, corpus, capsys, monkeypatch, fault):
    s = Setup(tmp_path, corpus, monkeypatch)
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):  # the first checkpoint (step 4) is written, the second (step 8) fails
        calls.append(path)
        return (real_save if len(calls) == 1 else fault)(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    if fault is zip_writer_failure:  # the free space is what tells a full disk here
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    assert main(s.config("train.max_steps=8")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"environment error: no space left on device while writing the checkpoint "
        f"'{s.run_dir / 'checkpoints' / 'step_00000008'}'")
    assert checkpoint_names(s.run_dir) == ["step_00000004"]  # the partial .tmp-step_00000008 is gone
    ckpt.verify_checkpoint(s.run_dir / "checkpoints" / "step_00000004")
    assert main(s.config("train.max_steps=8", "checkpoint.resume=auto")) == 0  # space freed: it continues
    assert checkpoint_names(s.run_dir) == ["step_00000004", "step_00000008"]


def test_a_killed_save_and_an_interrupted_replace_are_mended_by_the_next_run(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    assert main(s.config("train.max_steps=4")) == 0
    root = s.run_dir / "checkpoints"
    os.replace(root / "step_00000004", root / ".tmp-old-step_00000004")  # killed between a replace's renames
    (root / ".tmp-step_00000008" / "model").mkdir(parents=True)  # killed while writing step 8
    (root / ".tmp-step_00000008" / "state.pt").write_bytes(b"torn")
    capsys.readouterr()
    # A fresh run on the directory sees the restored checkpoint, and refuses to overwrite it.
    assert main(s.config("train.max_steps=8")) == 2
    out, err = capsys.readouterr()
    assert f"restored the checkpoint {root / 'step_00000004'}" in out
    assert "config error: run.name:" in err and "already holds checkpoints" in err
    assert checkpoint_names(s.run_dir) == ["step_00000004"]
    assert main(s.config("train.max_steps=8", "checkpoint.resume=auto")) == 0
    assert f"resumed from {root / 'step_00000004'} at step 4" in capsys.readouterr().out
    assert checkpoint_names(s.run_dir) == ["step_00000004", "step_00000008"]


def test_a_torn_last_metrics_line_does_not_block_a_resume(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    assert main(s.config("train.max_steps=4")) == 0
    with (s.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 2.')  # killed in the middle of a write
    assert main(s.config("train.max_steps=6", "checkpoint.resume=auto")) == 0
    assert [r["step"] for r in read_metrics(s.run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "Traceback" not in capsys.readouterr().err


def test_a_copied_run_directory_resumes_under_its_new_name(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    assert main(s.config("train.max_steps=4")) == 0
    copy = s.run_dir.parent / "b"
    shutil.copytree(s.run_dir, copy)  # cp -r runs/t runs/b
    assert main(s.config("run.name=b", "train.max_steps=6", "checkpoint.resume=auto")) == 0
    assert f"resumed from {copy / 'checkpoints' / 'step_00000004'} at step 4" in capsys.readouterr().out
    assert checkpoint_names(copy) == ["step_00000004", "step_00000006"]
    assert checkpoint_names(s.run_dir) == ["step_00000004"]  # the original is left as it was
    assert yaml.safe_load((copy / "config.yaml").read_text())["run"]["name"] == "b"


def test_export_faults_end_in_a_line_and_exports_are_readable_by_the_group(tmp_path, corpus, capsys, monkeypatch):
    s = Setup(tmp_path, corpus, monkeypatch)
    previous = os.umask(0o022)
    try:
        assert main(s.config("train.max_steps=4")) == 0
        checkpoint = s.run_dir / "checkpoints" / "step_00000004"
        assert (checkpoint / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644
        (tmp_path / "a-file").write_text("")
        capsys.readouterr()
        faults = [  # (argv, the line's start on stderr, more words)
            ([str(checkpoint), str(tmp_path / "a-file")], "config error: output '", "a-file' is a file"),
            ([str(checkpoint), str(tmp_path / "a-file" / "out")], "environment error: cannot write the model to",
             "not a directory"),
        ]
        broken = tmp_path / "broken"
        shutil.copytree(checkpoint, broken)
        weights = broken / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated
        faults.append(([str(broken), str(tmp_path / "out")], f"checkpoint error: checkpoint '{broken}': "
                       "model.safetensors cannot be read", ""))
        for argv, start, words in faults:
            assert export_main(argv) == 2, argv
            err = capsys.readouterr().err
            line = err.strip().splitlines()[-1]  # after the progress bars
            assert line.startswith(start) and words in line and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
        # A run directory exports its newest good checkpoint.
        assert export_main([str(s.run_dir), str(tmp_path / "out")]) == 0
        assert f"exporting {checkpoint}, the newest good checkpoint" in capsys.readouterr().out
        assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


@pytest.mark.subprocess
def test_prepare_script_faults_end_in_a_line(tmp_path, corpus):
    config = write_tiny_config(tmp_path, corpus)
    done = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--config", str(config), "--out",
                           str(tmp_path / "prepared"), f"data.files=[{corpus}]"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"data error: data.files: '{corpus}' is a directory")
