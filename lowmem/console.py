"""The console: lowmem's one logger, `log`, and where its lines go.

Every module writes its lines through `log` (`log.info` for what a run reports, `log.warning` for what a user
must see, `log.error` for a rank's own failure). `configure(is_main)` says where they go: info lines to stdout
on rank 0 only, warnings and errors to stderr on every rank (a rank's own failure must reach its own stderr).
The handlers look up sys.stdout and sys.stderr when they write, so a redirected stream (a test's capture, a
wrapper's) receives the lines. Messages print as they are, with no prefix: the console reads as before."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("lowmem")


class ConsoleHandler(logging.Handler):
    """Writes records to sys.<stream> as it is at the time of writing."""

    def __init__(self, stream: str, level: int, below: int | None = None):
        super().__init__(level)
        self.stream = stream
        if below is not None:
            self.addFilter(lambda record: record.levelno < below)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging must never end a run; logging's own policy)
            self.handleError(record)


def configure(is_main: bool = True) -> None:
    """Route `log`: info to stdout when `is_main` (rank 0, or one process), warnings and errors to stderr."""
    for handler in [h for h in log.handlers if isinstance(h, ConsoleHandler)]:
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the console is lowmem's own; an application's root handlers would print twice
    if is_main:
        log.addHandler(ConsoleHandler("stdout", logging.INFO, below=logging.WARNING))
    log.addHandler(ConsoleHandler("stderr", logging.WARNING))


configure()
