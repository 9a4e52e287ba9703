"""The errors lowmem reports to a user as one line instead of a traceback, in one place.

Each class carries the words the command line prints before the message (`kind`) and its exit status.
An input or environment problem is a `ConfigError` (or a subclass) whose message names the key, file, row
or value at fault; anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal
from pathlib import Path


class LowmemError(Exception):
    kind = "error"
    exit_code = 1


class ConfigError(LowmemError, ValueError):
    """A configuration value is missing, misspelled, of the wrong type or impossible, or the file, directory
    or device it names cannot be used."""

    kind = "config error"
    exit_code = 2


class DataError(ConfigError):
    """A data source cannot be read as configured; the message names the files or dataset and the key."""

    kind = "data error"


class CheckpointError(ConfigError):
    """A checkpoint cannot be loaded (missing or unreadable files, non-finite weights); the message names it."""

    kind = "checkpoint error"


class TrainingDiverged(LowmemError, RuntimeError):
    """The loss, a gradient or a weight stopped being finite; no checkpoint of that state is written."""

    kind = "training stopped"
    exit_code = 1

    def __init__(self, cause: str, step: int):
        super().__init__(f"{cause} at step {step}")
        self.cause, self.step = cause, step


class TrainingInterrupted(LowmemError):
    """SIGINT or SIGTERM asked the run to stop: the current update was finished and a checkpoint written."""

    kind = "interrupted"

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint = step, checkpoint
        # As shells report a process killed by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM).
        self.exit_code = 128 + signum
        super().__init__(f"{self.signal_name} received: stopped after step {step} and wrote the checkpoint "
                         f"{checkpoint}; continue with checkpoint.resume=auto")
