"""Every input or environment fault ends with one line naming its cause and a non-zero exit, never a traceback.

One table: each row is a fault, how to set it up, the words its message must hold (and any it must not), and
the exit status. A new class of fault is one more row.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import WORDS, write_tiny_config
from lowmem.cli import main
from lowmem.config import BPEConfig
from lowmem.rundir import RunLock
from lowmem.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parent.parent
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


def config_not_utf8(s: Setup) -> list[str]:
    path = s.tmp / "latin1.yaml"
    path.write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    return [str(path)]


def out_dir_is_a_file(s: Setup) -> list[str]:
    (s.tmp / "a-file").write_text("")
    return s.config(f"run.out_dir={s.tmp / 'a-file' / 'runs'}")


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
     ["environment error: [Errno 28] No space left on device:", "state.pt"], [], 1),
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
    for word in words[1:]:
        assert word in out + err, f"{word!r} not in:\n{out + err}"
    for word in absent:
        assert word not in out + err
