"""Helpers for the distributed tests: spawn gloo ranks with a deadline, a tiny model whose matrices straddle
ZeRO partitions (one is larger than a partition at 3 ranks), world-size-independent data, and the
single-process reference."""
from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

# A global batch of 6 micro-batches per update: 1 rank x 6, 2 ranks x 3 or 3 ranks x 2 accumulation steps.
MICRO_PER_UPDATE = 6
VOCAB, WIDTH, INNER = 40, 16, 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args, timeout: float = 240.0) -> None:
    """Run fn(rank, world, port, *args) on `world` processes; fail (never hang) if one fails or time runs out."""
    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # False: some rank still runs
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"distributed test did not finish within {timeout} s")


def set_rank_env(rank: int, world: int, port: int) -> None:
    """This process as rank `rank` of a launcher's job (what torchrun sets), DeepSpeed on CPU."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed.comm  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a CPU speed-up op: skip its 30 s build


def init_rank(rank: int, world: int, port: int, deepspeed: bool = False) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    if deepspeed:
        import deepspeed as ds
        import deepspeed.comm  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a CPU speed-up op: skip its 30 s build
        ds.init_distributed(dist_backend="gloo")
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def finish_rank() -> None:
    """Leave together, and without the interpreter's teardown: gloo's threads destroyed at exit can abort the
    process ('terminate called without an active exception') after all the work is done."""
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Net(torch.nn.Module):
    """Embedding, attention and MLP linears (named as target_modules expect), a norm and a head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.self_attn = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(WIDTH, WIDTH, bias=False)})
        self.mlp = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(WIDTH, INNER, bias=False),
                                        "down_proj": torch.nn.Linear(INNER, WIDTH)})
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.self_attn["q_proj"](h)
        h = h + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))
        logits = self.head(self.norm(h))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.roll(1, dims=1).reshape(-1))


def micro_batch(update: int, index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * update + index)
    return torch.randint(0, VOCAB, (2, 6), generator=g)


def rank_batches(update: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of the update's global batch (index rank, rank + world, ...)."""
    return [micro_batch(update, i) for i in range(rank, MICRO_PER_UPDATE, world)]


def reference(tree: dict, updates: int, clip: float = 0.0, start: dict | None = None) -> tuple[dict, object]:
    """One process, the whole global batch per update (the mean of the micro-batch losses)."""
    from lowmem.optim import build_optimizer
    from lowmem.optim.registry import parse_optimizer_options

    net = Net()
    opt = build_optimizer(net, parse_optimizer_options(tree))
    for update in range(updates):
        for i in range(MICRO_PER_UPDATE):
            (net(micro_batch(update, i)) / MICRO_PER_UPDATE).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in net.named_parameters()}, opt
