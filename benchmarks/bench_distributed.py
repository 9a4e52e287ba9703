"""Per-rank optimizer-state bytes, update time and bytes exchanged per update on 1, 2 and 3 ranks, in one run.

    python benchmarks/bench_distributed.py [--model llama_9m] [--ranks 1,2,3] [--optimizers adamw,galore]
                                           [--steps 6] [--rank 32] [--json FILE]

Each setting spawns its ranks (gloo on CPU, NCCL on GPUs), trains `--steps` updates of the same global batch
(random tokens, 4 sequences per rank) through lowmem's runtimes, and reports:
- state/rank: the optimizer-state tensor bytes each rank holds (max over ranks), and its ratio to one process;
- update s: median wall time of one update (forward, backward, gradient exchange, optimizer step) after the
  first two, on the slowest rank. On a CPU with fewer cores than ranks the ranks share cores: compare the
  rows of one run, not with another machine;
- sent/rank: the bytes one rank hands to collectives per update (the payload of all-reduce, reduce-scatter,
  all-gather, broadcast and point-to-point sends, counted at torch.distributed's Python calls), averaged
  over updates. DDP's full all-reduce runs inside its C++ reducer, invisible there: its payload is every
  gradient once (the sum of the trainable weights' bytes), which is what its buckets all-reduce. The median
  over updates: an update that refreshes a projection (the first one here) sends the whole gradient.
No clipping (projected sync cannot clip the whole gradient), the same in every setting. Settings: `none` (one process), `ddp` (full all-reduce), `ddp+projected` (R = P^T G, projection presets
without residual), `zero1` and `zero2` (DeepSpeed, lowmem's owner map).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent

# the collectives whose payload is counted: the argument (keyword, position) that holds what this rank sends
COUNTED = {"all_reduce": ("tensor", 0), "reduce_scatter_tensor": ("input", 1),
           "all_gather_into_tensor": ("input_tensor", 1), "broadcast": ("tensor", 0), "reduce": ("tensor", 0),
           "all_to_all_single": ("input", 1), "send": ("tensor", 0),
           "all_gather": ("tensor", 1), "reduce_scatter": ("input_list", 1)}


REAL_ISEND = dist.isend  # P2POp accepts only the real function: batches are counted, not isend itself


class ByteCounter:
    """Wraps torch.distributed's collectives to add up the tensor bytes this rank sends."""

    def __init__(self) -> None:
        self.bytes = 0
        for name, (keyword, position) in COUNTED.items():
            self._wrap(name, keyword, position)
        real_batch = dist.batch_isend_irecv

        def batch_isend_irecv(ops):
            self.bytes += sum(_nbytes(op.tensor) for op in ops if op.op is REAL_ISEND)
            return real_batch(ops)

        dist.batch_isend_irecv = batch_isend_irecv

    def _wrap(self, name: str, keyword: str, position: int) -> None:
        real = getattr(dist, name)

        def counted(*args, **kwargs):
            payload = kwargs[keyword] if keyword in kwargs else args[position] if len(args) > position else None
            self.bytes += _nbytes(payload)
            return real(*args, **kwargs)

        setattr(dist, name, counted)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


SETTINGS = {  # name: (distributed backend, extra overrides)
    "none": ("none", ()),
    "ddp": ("ddp", ()),
    "ddp+projected": ("ddp", ("distributed.gradient_sync=projected",)),
    "zero1": ("deepspeed", ("distributed.zero_stage=1",)),
    "zero2": ("deepspeed", ("distributed.zero_stage=2",)),
}


def build_config(model: str, optimizer: str, rank: int, backend: str, extra: tuple, world: int):
    from lowmem.train.config import load_config

    overrides = [f"optimizer.name={optimizer}", "train.batch_size=4",
                 f"train.global_batch_size={4 * world}", "train.grad_clip=0.0", f"distributed.backend={backend}",
                 "data.seq_len=128", *extra]
    from lowmem.optim import OPTIMIZERS

    if OPTIMIZERS[optimizer].options().reads("rank"):  # time the steps between refreshes
        overrides += [f"optimizer.rank={rank}", "optimizer.update_gap=1000"]
    return load_config([ROOT / "configs" / "models" / f"{model}.yaml"], overrides)


def worker(rank: int, world: int, port: int, args, optimizer: str, setting: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    backend, extra = SETTINGS[setting]
    if backend == "deepspeed":
        import deepspeed.comm  # noqa: F401  (its CPU shared-memory op takes ~30 s to build and is optional)

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from lowmem.distributed.launch import init
    from lowmem.distributed.runtime import RUNTIMES
    from lowmem.model.build import build_model
    from lowmem.optim import build_optimizer

    config = build_config(args.model, optimizer, args.rank, backend, extra, world)
    device = torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    counter = ByteCounter() if world > 1 else None  # before init: DeepSpeed keeps references to the functions
    ctx = init(backend, 300.0, device)
    torch.manual_seed(0)
    vocab = 4096
    model = build_model(config.model, vocab, device)
    runtime = RUNTIMES[ctx.backend](ctx, config)
    runtime.prepare(model, build_optimizer(model, config.optimizer))
    generator = torch.Generator().manual_seed(1000 + rank)
    times, sent = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (config.train.batch_size, config.data.seq_len), generator=generator).to(device)
        tokens = torch.tensor(ids[:, 1:].numel() * world, device=device)
        if counter is not None:
            dist.barrier()
            counter.bytes = 0
        start = time.perf_counter()
        with runtime.micro_batch(True):
            loss = runtime.model(input_ids=ids, labels=ids, num_items_in_batch=tokens).loss
            runtime.backward(loss)
        runtime.step(config.train.grad_clip)
        runtime.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if counter is not None:
            sent.append(counter.bytes)
    state_bytes = runtime.optimizer_state_bytes()
    if setting == "ddp":  # DDP's reducer all-reduces every gradient in C++ (see the module docstring)
        sent = [sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)] * len(sent)
    update_s = statistics.median(times[2:] if len(times) > 2 else times)
    result = {"rank": rank, "state_bytes": state_bytes, "update_s": update_s,
              "sent_bytes": statistics.median(sent) if sent else 0.0}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo may abort there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(args, optimizer: str, setting: str, world: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(world, free_port(), args, optimizer, setting, out), nprocs=world,
                           start_method="spawn", join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {"optimizer": optimizer, "setting": setting, "ranks": world,
            "state_bytes_per_rank": max(r["state_bytes"] for r in ranks),
            "state_bytes_all": sum(r["state_bytes"] for r in ranks),
            "update_s": max(r["update_s"] for r in ranks),
            "sent_bytes_per_rank": max(r["sent_bytes"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_9m", help="a preset in configs/models")
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--optimizers", default="adamw,galore")
    parser.add_argument("--settings", default="ddp,ddp+projected,zero1,zero2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32, help="projection rank of the projection presets")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    for optimizer in args.optimizers.split(","):
        for world in (int(w) for w in args.ranks.split(",")):
            settings = ["none"] if world == 1 else args.settings.split(",")
            for setting in settings:
                if setting == "ddp+projected" and optimizer == "adamw":
                    continue  # nothing is projected: 'projected' is refused for it
                rows.append(run_setting(args, optimizer, setting, world))
                print(f"done: {optimizer} {setting} x{world}", file=sys.stderr, flush=True)
    mib = 2**20
    print(f"model {args.model}, {args.steps} updates of 4 x 128 tokens per rank, projection rank {args.rank}")
    print(f"{'optimizer':<10}{'setting':<15}{'ranks':>6}{'state/rank MiB':>16}{'x one proc':>11}"
          f"{'update s':>10}{'x one proc':>11}{'sent/rank MiB':>15}")
    for row in rows:
        one = next(r for r in rows if r["optimizer"] == row["optimizer"] and r["ranks"] == 1)
        print(f"{row['optimizer']:<10}{row['setting']:<15}{row['ranks']:>6}"
              f"{row['state_bytes_per_rank'] / mib:>16.3f}{row['state_bytes_per_rank'] / one['state_bytes_per_rank']:>11.3f}"
              f"{row['update_s']:>10.3f}{row['update_s'] / one['update_s']:>11.2f}"
              f"{row['sent_bytes_per_rank'] / mib:>15.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
