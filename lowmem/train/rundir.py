"""What guards a run while it trains: the run directory's lock and the stop-on-signal handlers."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO

from lowmem.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run directory, so two runs never interleave their metrics or overwrite each
    other's checkpoints: `run_dir/.lock`, held with flock and holding the holder's pid, host and start time.

    The kernel drops a flock when its process ends, however it ends, so a lock file left by a killed run
    never blocks the next one. `acquire` also creates the run directory: an unusable `run.out_dir` fails
    here, before any tokenizer, data or model is built."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._file: IO[str] | None = None
        self._created: list[Path] = []  # the directories acquire created, innermost first

    def acquire(self) -> None:
        if self._file is not None:
            return
        try:
            self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            file = open(self.run_dir / LOCK_FILE, "a+")  # not "w": that would erase a holder's details
        except OSError as err:
            raise ConfigError(f"run.out_dir: cannot create or write the run directory '{self.run_dir}' "
                              f"({err.strerror or err}); choose another run.out_dir or run.name") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that has not written its details yet"
            file.close()
            raise ConfigError(f"run.name: the run directory '{self.run_dir}' is in use by another run ({holder}); "
                              "wait for it to finish, or choose another run.name") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self._file = file

    def release(self, discard: bool = False) -> None:
        """Unlock. `discard`: the run never started, so the directories `acquire` created are removed again
        (when nothing but the lock is in them)."""
        if self._file is None:
            return
        self._file.truncate(0)  # still held: no other run can be reading it
        if discard and self._created:
            (self.run_dir / LOCK_FILE).unlink()
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                for directory in self._created:
                    directory.rmdir()
        self._file.close()  # closing drops the flock
        self._file = None


class StopOnSignal:
    """While entered (in the main thread), the first SIGINT or SIGTERM only records its number in `signum`:
    the training loop finishes the current update, writes a checkpoint and stops. A second one raises
    KeyboardInterrupt(signum) at once. The previous handlers are put back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            # None: a handler not installed from Python, which cannot be put back; the default is the closest
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(signum)
        self.signum = signum
        # os.write, not print: the handler may run in the middle of a print (the progress bar's) to stderr
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this update, then writing a checkpoint "
                    f"and stopping (Ctrl-C again stops at once, without a checkpoint)\n".encode())
