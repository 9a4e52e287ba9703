import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lowmem.errors import EnvironmentProblem
from lowmem.train import checkpoint as ckpt


def tiny_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=30))


def state_of(step: int, **extra) -> dict:
    """A training state with every part a checkpoint must hold (contents do not matter here)."""
    return {**{key: {} for key in ckpt.STATE_KEYS}, "trainer": {"step": step}, **extra}


def test_save_load_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        model = tiny_model(step)
        ckpt.save_checkpoint(tmp_path, step, model, None, state_of(step, t=torch.arange(step)),
                             keep_last=2)
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000002", "step_00000003"]
    state = ckpt.load_state(found[-1])  # weights_only=True inside
    assert state["trainer"]["step"] == 3 and torch.equal(state["t"], torch.arange(3))
    restored = tiny_model(99)
    ckpt.load_model_weights(restored, found[-1])
    for a, b in zip(restored.state_dict().values(), tiny_model(3).state_dict().values()):
        assert torch.equal(a, b)
    # The model directory is a plain Hugging Face checkpoint.
    plain = AutoModelForCausalLM.from_pretrained(found[-1] / "model")
    assert torch.equal(plain.model.embed_tokens.weight, tiny_model(3).model.embed_tokens.weight)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 5, tiny_model(5), None, state_of(5), keep_last=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 6, tiny_model(6), None, state_of(6), keep_last=1)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000005"
    assert ckpt.load_state(latest)["trainer"]["step"] == 5
    restored = tiny_model(0)
    ckpt.load_model_weights(restored, latest)
    assert torch.equal(restored.lm_head.weight, tiny_model(5).lm_head.weight)
    # The next successful save cleans the half-written directory and rotates normally.
    ckpt.save_checkpoint(tmp_path, 6, tiny_model(6), None, state_of(6), keep_last=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000006"]


def test_incomplete_checkpoint_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        ckpt.load_state(tmp_path / "empty")


def test_last_good_checkpoint_skips_unreadable_and_non_finite_ones(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, tiny_model(step), None, state_of(step), keep_last=3)
    first, second, third = ckpt.list_checkpoints(tmp_path)
    assert ckpt.last_good_checkpoint(tmp_path) == third
    (third / "state.pt").write_bytes(b"garbage")
    assert ckpt.last_good_checkpoint(tmp_path) == second
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000003': state.pt cannot be read"):
        ckpt.verify_checkpoint(third)
    bad = tiny_model(2)
    with torch.no_grad():
        bad.lm_head.weight[1, 1] = float("nan")
    bad.save_pretrained(second / "model")  # what a checkpoint of a diverged run would hold
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights in lm_head.weight"):
        ckpt.verify_checkpoint(second)
    assert ckpt.last_good_checkpoint(tmp_path) == first


def test_keep_last_never_counts_a_checkpoint_of_a_later_step(tmp_path):
    """A checkpoint numbered after the one being written belongs to another history: it can neither push the
    new one out nor be kept instead of it."""
    ckpt.save_checkpoint(tmp_path, 9, tiny_model(9), None, state_of(9), keep_last=1)
    for step in (3, 6):
        ckpt.save_checkpoint(tmp_path, step, tiny_model(step), None, state_of(step), keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000009"]
    moved = ckpt.set_aside_newer(tmp_path, 6)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006"]
    assert [p.name for p in moved.iterdir()] == ["step_00000009"]
    assert ckpt.set_aside_newer(tmp_path, 6) is None


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (99_999_999, 100_000_000):
        ckpt.save_checkpoint(tmp_path, step, tiny_model(1), None, state_of(step), keep_last=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_100000000"


def test_recovery_removes_killed_writes_and_restores_an_interrupted_replace(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, tiny_model(step), None, state_of(step), keep_last=3)
    root = ckpt.checkpoint_dir(tmp_path)
    os.replace(root / "step_00000002", root / ".tmp-old-step_00000002")  # killed between the two renames
    shutil.copytree(root / "step_00000003", root / ".tmp-old-step_00000003")  # killed removing the old copy
    (root / ".tmp-old-step_00000007").mkdir()  # a removal that got as far as the parts: not a checkpoint
    (root / ".tmp-step_00000004" / "model").mkdir(parents=True)  # killed while writing
    assert ckpt.recover_interrupted_saves(tmp_path) == [root / "step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002", "step_00000003"]
    ckpt.verify_checkpoint(root / "step_00000002")
    # The next save mends the directory the same way before writing.
    os.replace(root / "step_00000003", root / ".tmp-old-step_00000003")
    ckpt.save_checkpoint(tmp_path, 4, tiny_model(4), None, state_of(4), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


def test_a_full_disk_while_saving_removes_the_partial_write(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, tiny_model(1), None, state_of(1), keep_last=1)

    def no_space(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(EnvironmentProblem,
                       match=r"no space left on device while writing the checkpoint '.*step_00000002'"):
        ckpt.save_checkpoint(tmp_path, 2, tiny_model(2), None, state_of(2), keep_last=1)
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step_00000001"]


def test_weight_files_are_readable_by_the_group(tmp_path):
    previous = os.umask(0o027)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, tiny_model(1), None, state_of(1), keep_last=1)
    finally:
        os.umask(previous)
    assert (path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o640
