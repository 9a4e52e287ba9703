"""Checkpoints: the model as `save_pretrained` safetensors (plus tokenizer), everything else as tensor-only state.

Layout of one checkpoint directory `checkpoints/step_00000100/`:
    model/       config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM.from_pretrained reads it)
    state.pt     optimizer, scheduler, RNG, data position, trainer counters  (torch.load(weights_only=True))
A checkpoint is written under a temporary name and renamed when complete, so an interrupted write never
replaces or damages the previous one; only the newest `keep_last` are kept.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

CHECKPOINT_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary, half-written directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.pt").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict[str, Any], keep_last: int) -> Path:
    """Write model + tokenizer + `state` for `step` atomically, then drop checkpoints beyond `keep_last`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    temp = root / f"{TEMP_PREFIX}{final.name}"
    if temp.exists():
        shutil.rmtree(temp)
    model.save_pretrained(temp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(temp / "model")
    torch.save(state, temp / "state.pt")
    if final.exists():  # the same step saved again (a resumed run re-reaching it): replace it whole
        old = root / f"{TEMP_PREFIX}old-{final.name}"
        if old.exists():  # left by a replace that was interrupted
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(temp, final)
        shutil.rmtree(old)
    else:
        os.replace(temp, final)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def load_state(path: Path) -> dict[str, Any]:
    """The tensor-only training state of a checkpoint."""
    state_file = Path(path) / "state.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' has no state.pt (incomplete or not a checkpoint)")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's safetensors weights into `model` in place (keeps its dtype and device)."""
    files = sorted((Path(path) / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint '{path}' has no model/*.safetensors")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    if "lm_head.weight" not in weights and getattr(model.config, "tie_word_embeddings", False):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not match the model: missing {missing}, unexpected {unexpected}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
