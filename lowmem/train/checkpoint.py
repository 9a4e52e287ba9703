"""Checkpoints: the model as `save_pretrained` safetensors (plus tokenizer), everything else as tensor-only state.

Layout of one checkpoint directory `checkpoints/step_00000100/`:
    model/       config.json, model.safetensors, tokenizer files  (AutoModelForCausalLM.from_pretrained reads it)
    state.pt     optimizer, scheduler, RNG, data position, trainer counters, config  (torch.load(weights_only=True)),
                 one entry per Stateful part the trainer lists (Trainer.parts)
A checkpoint is written under a temporary name and renamed when complete, so an interrupted write never
replaces or damages the previous one. A directory is a checkpoint only when both parts are there; whether
they load (and hold finite weights) is checked by `verify_checkpoint` / `last_good_checkpoint`.
After each write only the newest `keep_last` checkpoints at or before the written step are kept.
"""
from __future__ import annotations

import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lowmem.errors import OUT_OF_SPACE, CheckpointError, EnvironmentProblem, error_summary

CHECKPOINT_PREFIX = "step_"
TEMP_PREFIX = ".tmp-"
ABANDONED_PREFIX = "abandoned-"
# What every reader of a state.pt relies on: the counters and the config it was made with. The trainer's other
# parts (optimizer, scheduler, data position, RNG) are its own mapping of Stateful parts (Trainer.parts).
STATE_KEYS = ("trainer", "config")


class Stateful(Protocol):
    """A checkpointed part: what it saves (tensors, numbers, strings, lists and dicts of them) and restores."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class StateOf:
    """A Stateful part made of two callables, for state that lives in several objects or must be gathered
    (the data position of every rank, the RNGs); `load` None: recorded only (the config, checked on resume)."""

    save: Callable[[], Any]
    load: Optional[Callable[[Any], None]] = None

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state: Any) -> None:
        if self.load is not None:
            self.load(state)


def save_parts(parts: dict[str, Stateful]) -> dict[str, Any]:
    """state.pt's contents: each part's state under its name, in order (every rank calls each part)."""
    return {name: part.state_dict() for name, part in parts.items()}


def restore_parts(parts: dict[str, Stateful], state: dict[str, Any], path: Path) -> None:
    """Load each part from its saved state; CheckpointError naming the checkpoint when a part is missing."""
    missing = [name for name in parts if name not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}': state.pt lacks {', '.join(missing)}")
    for name, part in parts.items():
        part.load_state_dict(state[name])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    """The update number in a checkpoint directory's name (`step_00000100` -> 100)."""
    return int(Path(path).name.removeprefix(CHECKPOINT_PREFIX))


def _has_both_parts(path: Path) -> bool:
    return (path / "state.pt").is_file() and (path / "model").is_dir()


def is_complete(path: Path) -> bool:
    """Both parts of a checkpoint are present (what an interrupted write never leaves under a final name)."""
    path = Path(path)
    name = path.name
    return (path.is_dir() and name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit()
            and _has_both_parts(path))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first by step (temporary, half-written directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity, with one device sync.

    A tensor's sum is non-finite when any entry is (or when finite entries overflow float32, which weights and
    moments never approach), and unlike `isfinite(t).all()` it needs no temporary as large as the tensor."""
    names, sums = [], []
    for name, tensor in tensors:
        if tensor.is_floating_point() and tensor.numel():
            names.append(name)
            sums.append(tensor.detach().sum(dtype=torch.float32))
    if not sums:
        return []
    finite = torch.isfinite(torch.stack(sums)).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict[str, Any], keep_last: int) -> Path:
    """Write model + tokenizer + `state` for `step` atomically, then drop the checkpoints before `step` beyond
    the newest `keep_last` (one of a higher step is never counted, so it can never push out the new one).
    A write that fails (a full disk) leaves nothing behind and every earlier checkpoint as it was."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(run_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    temp = root / f"{TEMP_PREFIX}{final.name}"
    try:
        write_model(model, temp / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(temp / "model")
        torch.save(state, temp / "state.pt")
        share_weight_files(temp)
    except BaseException as err:
        full = _out_of_space(err, root)  # measured before the partial write's space is freed
        shutil.rmtree(temp, ignore_errors=True)
        if full:
            raise EnvironmentProblem(
                f"no space left on device while writing the checkpoint '{final}'; the partial write was "
                f"removed and the earlier checkpoints are kept: free space on that disk, then continue with "
                f"checkpoint.resume=auto") from err
        raise
    if final.exists():  # the same step saved again: replace it whole
        old = root / f"{TEMP_PREFIX}old-{final.name}"
        os.replace(final, old)  # killed from here to the next line: the next save or resume restores `old`
        os.replace(temp, final)
        shutil.rmtree(old)
    else:
        os.replace(temp, final)
    for stale in [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step][:-keep_last]:
        shutil.rmtree(stale)
    return final


# Less free space than this after a failed write means the write failed for want of it.
LOW_SPACE_BYTES = 16 * 2**20


def _out_of_space(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of disk space. safetensors names the errno in its message; torch.save
    reports it as a RuntimeError of its zip writer ("unexpected pos ..."), so the free space tells."""
    if isinstance(err, OSError):
        return err.errno in OUT_OF_SPACE
    if not isinstance(err, Exception):  # an interrupt
        return False
    if "No space left on device" in str(err) or "os error 28" in str(err):
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE_BYTES
    except OSError:
        return False


def recover_interrupted_saves(run_dir: Path) -> list[Path]:
    """Finish what a killed save left in `checkpoints/`: a `.tmp-step_N` (a write that never completed) is
    removed, and so is a `.tmp-old-step_N` beside its `step_N` (a replace killed while removing the old one);
    a whole `.tmp-old-step_N` without `step_N` (a replace killed between its two renames) is the only copy
    of that checkpoint, so it is renamed back to `step_N`. Only the run holding the directory's lock may call
    this. Returns the checkpoints restored."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    restored = []
    for path in sorted(root.glob(f"{TEMP_PREFIX}*")):
        name = path.name.removeprefix(TEMP_PREFIX)
        final = root / name.removeprefix("old-")
        if name.startswith("old-") and not final.exists() and _has_both_parts(path):
            os.replace(path, final)
            restored.append(final)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return restored


def write_model(model, directory: Path) -> None:
    """The model as a plain Hugging Face directory; a LoRA model merged, with its adapter beside (lowmem.model.lora)."""
    from lowmem.library_output import no_transformers_progress
    from lowmem.model.lora import is_lora, save_merged

    with no_transformers_progress():  # the run's own bar or log line says a checkpoint is written
        if is_lora(model):
            save_merged(model, directory)
        else:
            model.save_pretrained(directory, safe_serialization=True)


def share_weight_files(directory: Path) -> None:
    """Give the weight files under `directory` the mode any other file gets (0666 less the umask, readable by
    the group): safetensors creates them 0600."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*.safetensors"):
        os.chmod(path, mode)


def _umask() -> int:
    """This process's umask (reading it means setting it; put back at once)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def set_aside_newer(run_dir: Path, step: int) -> Path | None:
    """Move the checkpoints of a step after `step` into `checkpoints/abandoned-<time>/`, where nothing lists,
    resumes from or rotates them. A run resumed from `step` writes its own checkpoints for those steps: the
    old ones (an abandoned future, or corrupt ones a resume skipped) must not be taken for its newest, nor
    outlive its new ones under `keep_last`. Moved rather than deleted: they may be all a user has of that
    future. Returns the folder they went to, or None when there were none."""
    newer = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    if not newer:
        return None
    folder = checkpoint_dir(run_dir) / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-from-step-{step}"
    folder.mkdir(exist_ok=True)
    for path in newer:
        os.replace(path, folder / path.name)
    return folder


def error_reason(err: Exception) -> str:
    if isinstance(err, pickle.UnpicklingError):
        return "not a readable torch file"
    return error_summary(err)


def load_state(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The tensor-only training state of a checkpoint (`mmap`: map the tensors instead of reading them, to
    check a checkpoint cheaply). Raises CheckpointError naming the checkpoint when it cannot be used."""
    state_file = Path(path) / "state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no state.pt (incomplete or not a checkpoint)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # a truncated or overwritten file fails in many ways; each means "unreadable"
        raise CheckpointError(f"checkpoint '{path}': state.pt cannot be read ({error_reason(err)})") from err
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{path}': state.pt lacks {', '.join(missing)}")
    return state


def _weight_files(path: Path) -> list[Path]:
    files = sorted((Path(path) / "model").glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint '{path}' has no model/*.safetensors")
    return files


def check_weights(path: Path) -> None:
    """Read every weight of a checkpoint, one tensor at a time; raise CheckpointError if a file cannot be read
    or a weight is not finite."""
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as weights:
                bad = non_finite((key, weights.get_tensor(key)) for key in weights.keys())
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint '{path}': {file.name} cannot be read ({error_reason(err)})") from err
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise CheckpointError(f"checkpoint '{path}': non-finite weights in {shown}")


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless the checkpoint's state loads and its weights load and are finite."""
    load_state(path, mmap=True)
    check_weights(path)


def last_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads and holds finite weights (what a user can resume from), or None."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's safetensors weights into `model` in place (keeps its dtype and device)."""
    weights: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint '{path}': {file.name} cannot be read ({error_reason(err)})") from err
    if "lm_head.weight" not in weights and getattr(model.config, "tie_word_embeddings", False):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{path}' does not match the model: missing {missing}, "
                              f"unexpected {unexpected}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
