"""Who am I in a distributed run: rank, world size and device from the launcher's environment (torchrun,
deepspeed, accelerate launch all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the process
group (NCCL on GPUs, gloo on CPU), and failures that end every rank instead of leaving the others waiting.

A rank that raises prints its cause and leaves at once (os._exit: no atexit handler may wait on a
collective); the other ranks' next collective then fails on the closed connection (gloo) or the watchdog
(NCCL), and they too print and leave. A rank that hangs is caught by the process group's timeout
(distributed.timeout_s).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from lowmem.console import log
from lowmem.errors import ConfigError, error_summary


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "none"  # none | ddp | deepspeed

    @property
    def distributed(self) -> bool:
        return self.backend != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; (0, 0, 1) when not launched."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def resolve_backend(requested: str, world_size: int) -> str:
    """`auto`: none on one process, deepspeed when accelerate was told to use it, else ddp."""
    if requested != "auto":
        return requested
    if world_size == 1:
        return "none"
    return "deepspeed" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else "ddp"


def init(backend: str, timeout_s: float, device: torch.device) -> DistContext:
    """Join the launcher's process group (nothing on one process with backend none)."""
    rank, local_rank, world = launcher_world()
    backend = resolve_backend(backend, world)
    if backend == "none":
        return DistContext()
    # No launcher's rendezvous address (nor mpirun's, which DeepSpeed reads): it would fail deep inside torch
    if "MASTER_ADDR" not in os.environ and not (backend == "deepspeed" and "OMPI_COMM_WORLD_SIZE" in os.environ):
        raise ConfigError(f"distributed.backend: '{backend}' joins the ranks a launcher started (torchrun, "
                          "deepspeed, accelerate launch set RANK, WORLD_SIZE and MASTER_ADDR), and none did; "
                          "start the run with one, or set distributed.backend=auto on one process")
    timeout = datetime.timedelta(seconds=timeout_s)
    comm = "nccl" if device.type == "cuda" else "gloo"
    if backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=comm, timeout=timeout)
    elif not dist.is_initialized():
        dist.init_process_group(comm, timeout=timeout, rank=rank, world_size=world)
    return DistContext(rank, local_rank, world, backend)


def device_for(name: str, local_rank: int) -> str:
    """`auto` on a rank of a GPU job is that rank's GPU."""
    if name == "auto" and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return name


def reports_here(error: BaseException) -> bool:
    """Whether this rank prints a failure's line: a fault every rank meets alike (a config value, a checkpoint,
    a signal) is printed by rank 0 alone, one only this rank met (`rank_local`) by this rank."""
    rank, _, world = launcher_world()
    return world == 1 or rank == 0 or getattr(error, "rank_local", False)


REPORTER_GRACE_S = 5.0


def wait_for_the_reporter() -> None:
    """A rank that leaves a failure's line to rank 0 waits a moment before it exits: a launcher (torchrun) ends
    every rank as soon as the first one exits, which could stop rank 0 before it has printed the line."""
    time.sleep(REPORTER_GRACE_S)


def collective_failed(error: BaseException) -> bool:
    """Whether `error` is a collective that failed under this rank (gloo's connection reset when a peer left,
    a timeout), not a fault of this rank's own."""
    if isinstance(error, dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__) if isinstance(error, RuntimeError) else []
    return bool(frames) and "torch/distributed/" in frames[-1].filename.replace(os.sep, "/")


class ExitStatus:
    status: int = 0


@contextlib.contextmanager
def leave_together() -> Iterator[ExitStatus]:
    """Around a whole command on many ranks (a launcher's WORLD_SIZE > 1): whatever ends it, this rank leaves at
    once with its status, so no rank is left waiting in a collective for one that failed (and gloo's threads
    cannot abort a finished run at interpreter exit). An unexpected error is printed with the rank first.
    On one process: nothing. The command sets the status it wants on the yielded holder."""
    outcome = ExitStatus()
    if launcher_world()[2] == 1:
        yield outcome
        return
    try:
        yield outcome
    except SystemExit as stop:
        outcome.status = stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:  # noqa: BLE001 (every failure must end this rank, whatever it is)
        if collective_failed(error):  # the rank that left printed why; this one only says it followed
            log.error(f"rank {launcher_world()[0]} stopped: a collective failed, another rank has ended or hangs (its "
                      f"own message says why): {error_summary(error)}")
        else:
            log.error(f"rank {launcher_world()[0]} failed: {type(error).__name__}: {error}")
            traceback.print_exc(file=sys.stderr)
        outcome.status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(outcome.status)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0:
        raise ConfigError(f"train.device: '{name}' asked for, but this machine has no {device.type} device; "
                          "use auto or cpu")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"train.device: '{name}' asked for, but this machine has {count} {device.type} "
                          f"device{'s' if count > 1 else ''} (indices 0 to {count - 1})")
    return device
