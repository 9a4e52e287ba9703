"""What would fit: when a planned run does not fit a GPU, search the settings that change how the model trains
but not the model, and return the cheapest that fit.

Each setting the planner may change is a knob with a ladder of rungs, gentlest first: update in backward
(one process only; it needs train.grad_clip=0, and its gradients are freed one at a time only without
accumulation, so accumulated micro-batches are folded into one: the same sequences per update), activation
checkpointing, narrower moments (optimizer.state_dtype bf16, int8, int4), smaller ranks (projecting
optimizers), ZeRO stages (on the ranks planned), more ranks with ZeRO (only up to the ranks the user allows),
and smaller micro-batches with more accumulation (the same sequences per update). A rung is a set of dotted
overrides (and a --world-size) the caller validates through the run config, as training would, and plans on
the meta device; a refused rung is skipped.

The search tries one knob at a time (its gentlest rung that fits), then pairs of knobs that did not fit alone,
then triples when nothing fit, each combination at its least total depth in the ladders (the strongest
combination is tried first: if it does not fit, nothing gentler does). Every suggestion is minimal: without
any one of its changes it does not fit. At most `limit` settings are planned per budget.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

from lowmem.memory.plan import MemoryPlan

MAX_TRIED = 60  # plans per budget (each is a meta-device build and trace: a fraction of a second for 7B)
SHOWN = 5  # suggestions kept per budget
MOMENT_DTYPES = ("fp32", "bf16", "int8", "int4")  # widest first
ZERO_SHARDS = {1: "optimizer state", 2: "gradients and optimizer state",
               3: "parameters, gradients and optimizer state"}
# knobs that cannot combine: update in backward frees nothing with accumulation and runs on one process only;
# more ranks come with their own ZeRO stage
EXCLUSIVE = [{"in_backward", "micro_batch"}, {"in_backward", "world_size"}, {"zero", "world_size"}]


@dataclass(frozen=True)
class Rung:
    change: str  # what it changes, in words
    overrides: tuple[str, ...]  # dotted key=value, as on the command line
    world_size: Optional[int] = None  # the ranks it needs (None: those planned)


@dataclass
class Knob:
    family: str
    rungs: list[Rung]  # gentlest first


@dataclass
class Suggestion:
    changes: list[str]
    overrides: list[str]
    world_size: int
    plan: MemoryPlan = field(repr=False)

    @property
    def total(self) -> int:
        return self.plan.total()

    def flags(self, planned_world: int) -> list[str]:
        return [f"--world-size {self.world_size}"] if self.world_size != planned_world else []


@dataclass
class Search:
    suggestions: list[Suggestion]
    tried: int
    capped: bool  # stopped at the limit


# A planner: (overrides, world size) -> the plan, or None when the config path refuses that setting
Planner = Callable[[tuple[str, ...], int], Optional[MemoryPlan]]


def knobs(config, assumptions: dict, world_size: int, max_world_size: int) -> list[Knob]:
    """The ladders for this config (`assumptions`: MemoryPlan.assumptions of its plan)."""
    t, o = config.train, config.optimizer
    batch, accum = t.batch_size, assumptions["grad_accum"]
    out = []
    if world_size == 1 and not o.update_in_backward:
        overrides = ["optimizer.update_in_backward=true"] + (["train.grad_clip=0"] if t.grad_clip else [])
        change = "update in backward" + (" (no gradient clipping)" if t.grad_clip else "")
        if accum > 1:  # accumulated gradients all exist at the last micro-batch: fold them into one
            overrides.append(f"train.batch_size={batch * accum}")
            if not t.global_batch_size:  # (with it, grad_accum is derived: 1)
                overrides.append("train.grad_accum=1")
            change += f", the {accum} micro-batches of {batch} as one of {batch * accum}"
        out.append(Knob("in_backward", [Rung(change, tuple(overrides))]))
    if not config.model.activation_checkpointing:
        out.append(Knob("checkpointing", [Rung("activation checkpointing",
                                               ("model.activation_checkpointing=true",))]))
    moments = assumptions["moments_dtype"]
    if "state_dtype" in o.__dataclass_fields__ and moments in MOMENT_DTYPES:
        narrower = MOMENT_DTYPES[MOMENT_DTYPES.index(moments) + 1:]
        out.append(Knob("state_dtype", [Rung(f"{d} moments", (f"optimizer.state_dtype={d}",)) for d in narrower]))
    rank = assumptions.get("rank")
    if rank:
        ranks = sorted({rank // 2**k for k in range(1, 5) if rank // 2**k >= 1}, reverse=True)
        out.append(Knob("rank", [Rung(f"rank {r}", (f"optimizer.rank={r}",)) for r in ranks]))
    if world_size > 1:
        out.append(Knob("zero", [Rung(f"ZeRO stage {s} over the {world_size} ranks ({ZERO_SHARDS[s]} sharded)",
                                      _zero(s)) for s in range(assumptions["zero_stage"] + 1, 4)]))
    if max_world_size > world_size:
        rungs = []
        for ranks in _more_ranks(world_size, max_world_size):
            batching = _same_sequences(t, batch, accum * world_size, ranks)
            if batching is not None:
                micro = next((o.split("=")[1] for o in batching if o.startswith("train.batch_size=")), None)
                fewer = f", micro-batch {micro} (the same sequences per update)" if micro else ""
                rungs += [Rung(f"{ranks} ranks with ZeRO stage {s} ({ZERO_SHARDS[s]} sharded){fewer}",
                               _zero(s) + batching, ranks) for s in (1, 2, 3)]
        out.append(Knob("world_size", rungs))
    smaller = sorted({batch // 2**k for k in range(1, batch.bit_length()) if batch % 2**k == 0} | {1} - {batch},
                     reverse=True)
    out.append(Knob("micro_batch", [
        Rung(f"micro-batch {b} x {accum * batch // b} accumulated (the same sequences per update)",
             (f"train.batch_size={b}",) + (() if t.global_batch_size else (f"train.grad_accum={accum * batch // b}",)))
        for b in smaller]))
    return [knob for knob in out if knob.rungs]


def _zero(stage: int) -> tuple[str, ...]:
    return ("distributed.backend=deepspeed", f"distributed.zero_stage={stage}")


def _same_sequences(train, batch: int, micro_batches: int, ranks: int) -> Optional[tuple[str, ...]]:
    """The batch overrides that keep the update's sequences on `ranks` ranks (None: they cannot be shared):
    fewer micro-batches each, or a smaller micro-batch when the ranks outnumber them."""
    if train.global_batch_size:  # grad_accum is derived from it (the config path checks the division)
        return ()
    sequences = batch * micro_batches
    if sequences % ranks:
        return None
    per_rank = sequences // ranks
    micro = max(b for b in range(1, batch + 1) if batch % b == 0 and per_rank % b == 0)
    return ((f"train.batch_size={micro}",) if micro != batch else ()) + (f"train.grad_accum={per_rank // micro}",)


def _more_ranks(world_size: int, most: int) -> list[int]:
    sizes = []
    size = world_size * 2
    while size < most:
        sizes.append(size)
        size *= 2
    return sizes + [most]


def search(knob_list: list[Knob], plan_of: Planner, world_size: int, budget: int, limit: int = MAX_TRIED,
           shown: int = SHOWN) -> Search:
    """The cheapest settings that fit `budget` bytes per rank, fewest changes first, then the smallest total."""
    searcher = _Searcher(plan_of, world_size, budget, limit)
    found: list[tuple[frozenset, Suggestion]] = []
    ladders = {i: list(knob.rungs) for i, knob in enumerate(knob_list)}
    try:
        for k in (1, 2, 3):
            if (k == 2 and len(found) >= shown) or (k == 3 and found):
                break
            for combo in itertools.combinations(range(len(knob_list)), k):
                if any(fit <= set(combo) for fit, _ in found) or not _compatible([knob_list[i] for i in combo]):
                    continue
                best = searcher.single(ladders[combo[0]]) if k == 1 else searcher.combined([ladders[i] for i in combo])
                if best is not None:
                    chosen, plan = best
                    found.append((frozenset(combo), Suggestion([r.change for r in chosen],
                                                               [o for r in chosen for o in r.overrides],
                                                               _world(chosen, world_size), plan)))
    except _Capped:
        pass
    suggestions = sorted((s for _, s in found), key=lambda s: (len(s.changes), s.total))
    return Search(suggestions[:shown], searcher.tried, searcher.capped)


class _Capped(Exception):
    pass


class _Searcher:
    def __init__(self, plan_of: Planner, world_size: int, budget: int, limit: int):
        self.plan_of, self.world_size, self.budget, self.limit = plan_of, world_size, budget, limit
        self.tried, self.capped = 0, False
        self.plans: dict[tuple, Optional[MemoryPlan]] = {}

    def plan(self, rungs: tuple[Rung, ...]) -> Optional[MemoryPlan]:
        """The plan with these rungs applied (None: refused), counted once."""
        key = (tuple(o for rung in rungs for o in rung.overrides), _world(rungs, self.world_size))
        if key not in self.plans:
            if self.tried >= self.limit:
                self.capped = True
                raise _Capped
            self.tried += 1
            self.plans[key] = self.plan_of(*key)
        return self.plans[key]

    def fits(self, rungs: tuple[Rung, ...]) -> bool:
        plan = self.plan(rungs)
        return plan is not None and plan.total() <= self.budget

    def single(self, ladder: list[Rung]) -> Optional[tuple[tuple[Rung, ...], MemoryPlan]]:
        """The gentlest rung that fits. The strongest valid rung is tried first (refused ones leave `ladder`,
        so combinations skip them): when it does not fit, no rung does."""
        while ladder and self.plan((ladder[-1],)) is None:
            ladder.pop()
        if not ladder or not self.fits((ladder[-1],)):
            return None
        rung = next(r for r in ladder if self.fits((r,)))
        return (rung,), self.plan((rung,))

    def combined(self, ladders: list[list[Rung]]) -> Optional[tuple[tuple[Rung, ...], MemoryPlan]]:
        """The fitting combination of least total depth in the ladders (then the smallest total)."""
        if not all(ladders) or not self.fits(tuple(ladder[-1] for ladder in ladders)):
            return None
        by_depth = sorted(itertools.product(*(range(len(ladder)) for ladder in ladders)), key=sum)
        for _, group in itertools.groupby(by_depth, key=sum):
            fitting = [rungs for rungs in (tuple(l[i] for l, i in zip(ladders, index)) for index in group)
                       if self.fits(rungs)]
            if fitting:
                best = min(fitting, key=lambda rungs: self.plan(rungs).total())
                return best, self.plan(best)
        return None


def _world(rungs: tuple[Rung, ...] | list[Rung], planned: int) -> int:
    return next((r.world_size for r in rungs if r.world_size is not None), planned)


def _compatible(chosen: list[Knob]) -> bool:
    """No two knobs of an exclusive pair, and no key that two knobs set."""
    families = {knob.family for knob in chosen}
    if any(pair <= families for pair in EXCLUSIVE):
        return False
    keys: dict[str, str] = {}
    for knob in chosen:
        for key in {o.split("=", 1)[0] for rung in knob.rungs for o in rung.overrides}:
            if key in keys and keys[key] != knob.family:
                return False
            keys[key] = knob.family
    return True
