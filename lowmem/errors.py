"""The errors lowmem reports to a user as one line instead of a traceback, in one place.

Each class carries the words the command line prints before the message (`kind`) and its exit status.
An input or environment problem is a `ConfigError` (or a subclass) whose message names the key, file, row
or value at fault; an OSError that escapes (a full disk, a file that vanished) is an environment problem too,
reported with its file (exit 2). Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import errno
import signal
import sys
import typing
from pathlib import Path


class LowmemError(Exception):
    kind = "error"
    exit_code = 1
    # On many ranks the same fault is met by every rank and reported by rank 0; a fault only the rank that
    # raised it knows of (its own share of the data) is set rank_local, and that rank reports it.
    rank_local = False


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


class EnvironmentProblem(ConfigError):
    """The machine refused what the run needs: the disk is full, a file or directory cannot be written."""

    kind = "environment error"


def os_error_text(err: OSError) -> str:
    """An OSError as one line naming the file: "no space left on device: 'runs/a/state.pt'"."""
    reason = (err.strerror or str(err) or type(err).__name__).strip()
    reason = reason[:1].lower() + reason[1:]
    if err.filename is None:
        return reason
    return f"{reason}: '{err.filename}'" + (f" -> '{err.filename2}'" if err.filename2 is not None else "")


def error_summary(err: BaseException) -> str:
    """`Type: first line of the message` (200 characters at most), to quote a library's error in one line."""
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:200]}"


# What a full disk or an exhausted quota report as errno.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


# The failures a command reports as one line; anything else is a bug and keeps its traceback.
REPORTED = (LowmemError, OSError, KeyboardInterrupt)


def interrupt_signal(err: KeyboardInterrupt) -> int:
    """The signal a KeyboardInterrupt stands for: the one StopOnSignal raised it for, else Ctrl-C's SIGINT."""
    return err.args[0] if err.args and isinstance(err.args[0], int) else int(signal.SIGINT)


def report_line(err: BaseException) -> tuple[str, int]:
    """The one line a command prints for a failure in REPORTED, and its exit status: the error's own for a
    LowmemError, 2 for an environment problem (OSError), 128 + the signal's number for an interrupt."""
    if isinstance(err, LowmemError):
        return f"{err.kind}: {err}", err.exit_code
    if isinstance(err, OSError):
        return f"{EnvironmentProblem.kind}: {os_error_text(err)}", EnvironmentProblem.exit_code
    signum = interrupt_signal(err)
    return f"interrupted: {signal.Signals(signum).name}", 128 + signum


def report(err: BaseException, more: str = "") -> int:
    """Print a failure in REPORTED as its one line on stderr (with `more` after it); its exit status."""
    line, status = report_line(err)
    print(line + more, file=sys.stderr)
    return status


def closest(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
