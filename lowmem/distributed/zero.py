"""Every lowmem optimizer under DeepSpeed ZeRO-1/2, with the same result as on one process.

DeepSpeed hands its optimizer flat fp32 partitions: a weight matrix may be split between ranks, so a matrix
rule (a projection, a factored moment, block-quantized moments, a norm or max over the tensor) cannot run on
what one rank holds. `ZeroShardedOptimizer` is the client optimizer DeepSpeed calls inside its own step
(after reducing, unscaling, clipping and overflow skipping), and it runs each weight's rule once:

- an element-wise rule (lowmem.optim.pipeline.PipelineOptimizer.is_elementwise; torch AdamW) runs on every
  rank's own fragment of the weight, its state sharded with the fragment;
- a matrix rule runs on one owner rank on the whole 2-D weight: the ranks holding fragments send the
  gradient and fp32 weight fragments to the owner (point-to-point), the owner assembles the matrix, applies
  the rule with the weight's state (held only there) and sends the updated fragments back.

Owners are assigned once, at the first step, from a table of every rank's fragments (lp._hp_mapping): the
matrices in decreasing cost (PipelineOptimizer.rule_cost) each go to the rank with the least cost so far
(ties: the rank already holding most of it). Matrices are exchanged in buckets of about `bucket_bytes`, so an
owner holds at most about one bucket of assembled matrices at once. Every per-weight state is keyed by the
parameter's name, never by position, so a checkpoint re-shards onto any number of ranks
(`consolidated_state` / `load_consolidated_state`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lowmem.errors import ConfigError
from lowmem.optim.pipeline import PipelineOptimizer


class ZeroConfigError(ConfigError):
    """DeepSpeed's setup cannot run lowmem's optimizer correctly: a config error, reported as one line (exit 2).
    A fault of the gathered fragment table is met by every rank alike (rank 0 reports it); one a rank found in
    its own fragments is rank_local."""


@dataclass
class Fragment:
    rank: int
    lp_start: int  # offset in the flattened weight
    numel: int


@dataclass
class WeightPlan:
    name: str
    shape: tuple[int, ...]
    group: int
    elementwise: bool
    cost: float
    fragments: list[Fragment] = field(default_factory=list)
    owner: int = -1  # matrix rules only

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def assign_owners(plans: list[WeightPlan], world_size: int) -> None:
    """Longest-processing-time greedy: costliest matrices first, each to the least-loaded rank (ties: the rank
    holding most of the matrix, then the lowest rank)."""
    load = [0.0] * world_size
    for plan in sorted((p for p in plans if not p.elementwise), key=lambda p: -p.cost):
        held = [0] * world_size
        for f in plan.fragments:
            held[f.rank] += f.numel
        plan.owner = min(range(world_size), key=lambda r: (load[r], -held[r], r))
        load[plan.owner] += plan.cost


class ForeignRule:
    """A torch or bitsandbytes optimizer's rule for one weight at a time: the weight (or fragment) is stepped as
    a temporary parameter carrying the state the caller keeps."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def apply(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, group_index: int) -> None:
        temp = nn.Parameter(weight.detach(), requires_grad=True)
        temp.grad = grad.to(weight.dtype)
        inner_group = self.optimizer.param_groups[group_index]
        saved = inner_group["params"]
        saved_hyper = {k: inner_group[k] for k in ("lr", "weight_decay") if k in group}
        inner_group.update({k: group[k] for k in saved_hyper})
        inner_group["params"] = [temp]
        self.optimizer.state[temp] = state
        try:
            self.optimizer.step()
        finally:
            inner_group["params"] = saved
            inner_group.update(saved_hyper)
            state.update(self.optimizer.state.pop(temp))
        if temp.data_ptr() != weight.data_ptr():
            weight.copy_(temp.detach())


class ZeroShardedOptimizer(torch.optim.Optimizer):
    """The client optimizer for `deepspeed.initialize(optimizer=...)`, wrapping the optimizer `inner` built by
    lowmem for `model` (its rules; its own parameter state is not used)."""

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, bucket_bytes: Optional[int] = None):
        self.inner = inner
        self.names = {p: n for n, p in model.named_parameters()}
        self.params = {n: p for p, n in self.names.items()}
        groups = []
        for index, group in enumerate(inner.param_groups):
            hyper = {k: v for k, v in group.items() if k not in ("params", "names")}
            groups.append({**hyper, "params": list(group["params"]), "lowmem_group": index})
        super().__init__(groups, {})
        self.pipeline = inner if isinstance(inner, PipelineOptimizer) else None
        self.foreign = None if self.pipeline else ForeignRule(inner)
        largest = max(p.numel() for p in self.names) * 4
        self.bucket_bytes = bucket_bytes or largest
        self.plans: Optional[dict[str, WeightPlan]] = None
        self.owned: dict[str, dict] = {}  # full state of the matrices this rank owns
        self.shards: dict[tuple[str, int], dict] = {}  # state of this rank's fragments of element-wise weights
        self._pending: Optional[dict] = None  # a consolidated state to load once the plan exists
        self.rule_calls = 0  # matrix rules this rank ran (tests: each matrix once per update across ranks)

    # -----------------------------------------------------------------------------------------------------
    # The plan

    def _elementwise(self, p: torch.Tensor) -> bool:
        if self.pipeline is not None:
            return self.pipeline.is_elementwise(p)
        return isinstance(self.inner, torch.optim.AdamW)

    def _cost(self, p: torch.Tensor) -> float:
        return self.pipeline.rule_cost(p) if self.pipeline is not None else 12.0 * p.numel()

    def _local_fragments(self) -> list[tuple[str, int, int]]:
        found = []
        for p, name in self.names.items():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                found.append((name, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel))
        return found

    def _build_plan(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        self._check_fragments()
        table: list = [None] * world
        dist.all_gather_object(table, self._local_fragments())
        plans = {}
        for index, group in enumerate(self.inner.param_groups):
            for p in group["params"]:
                name = self.names[p]
                plans[name] = WeightPlan(name, tuple(p.shape), index, self._elementwise(p), self._cost(p))
        for holder, fragments in enumerate(table):
            for name, start, numel in fragments:
                plans[name].fragments.append(Fragment(holder, start, numel))
        for plan in plans.values():
            plan.fragments.sort(key=lambda f: f.lp_start)
            if sum(f.numel for f in plan.fragments) != plan.numel:
                raise ZeroConfigError(f"the ZeRO partitions of '{plan.name}' do not cover it (DeepSpeed's fragment "
                                      f"map is inconsistent); check zero_optimization settings")
        assign_owners(list(plans.values()), world)
        self.plans = plans
        self.rank = rank
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def _check_fragments(self) -> None:
        """DeepSpeed's fp32 copy must hold the model's values where its map says (it does not with
        round_robin_gradients): checked once, before the first update."""
        for p, name in self.names.items():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            lp = p.detach().reshape(-1).narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
            if not torch.equal(lp.float(), mapping.hp_fragment.detach().float().to(lp.device)):
                error = ZeroConfigError(f"DeepSpeed's fp32 partition does not hold '{name}' where its fragment "
                                        f"map says (round_robin_gradients must be false)")
                error.rank_local = True  # this rank's own fragments: another rank may not meet it
                raise error

    # -----------------------------------------------------------------------------------------------------
    # Stepping

    def _local_views(self, hp: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        """name -> (weight fragment, gradient fragment, lp_start) of the weights in this flat partition."""
        views = {}
        storage = hp.untyped_storage().data_ptr()
        for p, name in self.names.items():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None or mapping.hp_fragment.untyped_storage().data_ptr() != storage:
                continue
            start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            views[name] = (hp.narrow(0, start, numel), hp.grad.narrow(0, start, numel),
                           mapping.lp_fragment_address.start)
        return views

    def _apply(self, name: str, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        p = self.params[name]
        if self.pipeline is not None:
            self.pipeline.apply_rule(p, weight, grad, state, group)
        else:
            self.foreign.apply(weight, grad, state, group, group["lowmem_group"])

    @torch.no_grad()
    def step(self, closure=None):
        if self.plans is None:
            self._build_plan()
        for group in self.param_groups:  # DeepSpeed calls step() once per group, in order: 0 starts an update
            if group["lowmem_group"] == 0 and self.pipeline is not None:
                self.pipeline.begin_update()
            hp = group["params"][0]
            views = self._local_views(hp) if hp.grad is not None else {}
            matrices = []
            for plan in self.plans.values():
                if plan.group != group["lowmem_group"]:
                    continue
                if plan.elementwise:
                    if plan.name in views:
                        weight, grad, start = views[plan.name]
                        self._apply(plan.name, weight, grad, self.shards.setdefault((plan.name, start), {}), group)
                else:
                    matrices.append(plan)
            for bucket in self._buckets(matrices):
                self._exchange_and_update(bucket, views, group)
        return None

    def _buckets(self, matrices: list[WeightPlan]) -> list[list[WeightPlan]]:
        buckets, current, size = [], [], 0
        for plan in matrices:
            if current and size + plan.numel * 4 > self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(plan)
            size += plan.numel * 4
        return buckets + ([current] if current else [])

    def _exchange_and_update(self, bucket: list[WeightPlan], views: dict, group: dict) -> None:
        """Fragments to owners, one rule per matrix on its owner, updated fragments back (all ranks join)."""
        me = self.rank
        outgoing: dict[int, list[torch.Tensor]] = {}
        incoming: dict[int, int] = {}
        for plan in bucket:
            for f in plan.fragments:
                if f.rank == me and plan.owner != me:
                    weight, grad, _ = views[plan.name]
                    outgoing.setdefault(plan.owner, []).extend([grad, weight])
                elif plan.owner == me and f.rank != me:
                    incoming[f.rank] = incoming.get(f.rank, 0) + 2 * f.numel
        received = self._swap(outgoing, incoming)
        offsets = {peer: 0 for peer in received}
        updated: dict[int, list[torch.Tensor]] = {}
        for plan in bucket:
            if plan.owner != me:
                continue
            weight = torch.empty(plan.numel, device=self._device())
            grad = torch.empty(plan.numel, device=self._device())
            for f in plan.fragments:
                if f.rank == me:
                    local_weight, local_grad, _ = views[plan.name]
                    weight.narrow(0, f.lp_start, f.numel).copy_(local_weight)
                    grad.narrow(0, f.lp_start, f.numel).copy_(local_grad)
                else:
                    buffer, at = received[f.rank], offsets[f.rank]
                    grad.narrow(0, f.lp_start, f.numel).copy_(buffer.narrow(0, at, f.numel))
                    weight.narrow(0, f.lp_start, f.numel).copy_(buffer.narrow(0, at + f.numel, f.numel))
                    offsets[f.rank] = at + 2 * f.numel
            full = weight.view(plan.shape)
            self._apply(plan.name, full, grad.view(plan.shape), self.owned.setdefault(plan.name, {}), group)
            self.rule_calls += 1
            for f in plan.fragments:
                piece = weight.narrow(0, f.lp_start, f.numel)
                if f.rank == me:
                    views[plan.name][0].copy_(piece)
                else:
                    updated.setdefault(f.rank, []).append(piece)
        back_in: dict[int, int] = {}
        for plan in bucket:
            for f in plan.fragments:
                if f.rank == me and plan.owner != me:
                    back_in[plan.owner] = back_in.get(plan.owner, 0) + f.numel
        returned = self._swap(updated, back_in)
        offsets = {peer: 0 for peer in returned}
        for plan in bucket:
            for f in plan.fragments:
                if f.rank == me and plan.owner != me:
                    at = offsets[plan.owner]
                    views[plan.name][0].copy_(returned[plan.owner].narrow(0, at, f.numel))
                    offsets[plan.owner] = at + f.numel

    def _swap(self, outgoing: dict[int, list[torch.Tensor]], incoming: dict[int, int]) -> dict[int, torch.Tensor]:
        """Send each peer its tensors concatenated and receive `incoming[peer]` floats from each (P2P, one batch)."""
        ops, received = [], {}
        for peer, tensors in outgoing.items():
            ops.append(dist.P2POp(dist.isend, torch.cat([t.reshape(-1).float() for t in tensors]).contiguous(), peer))
        device = self._device()
        for peer, numel in incoming.items():
            received[peer] = torch.empty(numel, device=device)
            ops.append(dist.P2POp(dist.irecv, received[peer], peer))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received

    def _device(self) -> torch.device:
        return next(iter(self.names)).device

    # -----------------------------------------------------------------------------------------------------
    # State: per rank, and consolidated by name

    def local_state_bytes(self) -> int:
        """Bytes of the optimizer state this rank holds (its owned matrices and its element-wise fragments)."""
        from lowmem.optim.registry import optimizer_state_bytes

        holder = type("Holder", (), {})()
        holder.state = {**{("owned", k): v for k, v in self.owned.items()},
                        **{("shard",) + k: v for k, v in self.shards.items()}}
        return optimizer_state_bytes(holder)

    def planned_state_bytes(self) -> int:
        """What this rank should hold by the plan and each rule's formula: the full state of its owned matrices
        and the state of its fragments of element-wise weights."""
        total, held_quantized = 0, False
        for plan in self.plans.values():
            p = self.params[plan.name]
            if plan.elementwise:
                for f in plan.fragments:
                    if f.rank == self.rank and (plan.name, f.lp_start) in self.shards:
                        total += self._formula(p, f.numel, self.shards[(plan.name, f.lp_start)])
            elif plan.owner == self.rank and plan.name in self.owned:
                total += self._formula(p, None, self.owned[plan.name])
                held_quantized |= p.numel() >= 4096
        if self.foreign is not None and hasattr(self.inner, "shared_state_bytes") and held_quantized:
            total += self.inner.shared_state_bytes([p for p in self.names if p.numel() >= 4096])
        return total

    def _formula(self, p: torch.Tensor, fragment: Optional[int], state: dict) -> int:
        if self.pipeline is not None:
            if fragment is not None:  # element-wise: the dense core's state on the fragment
                return self.pipeline.core.state_bytes((fragment,)) + self.pipeline.transforms.state_bytes()
            return sum(self.pipeline._weight_state_parts(p, self.pipeline._group_of[p], state).values())
        piece = p if fragment is None else p.detach().reshape(-1)[:fragment]
        return self.inner.param_state_bytes(piece)

    def consolidated_state(self) -> Optional[dict]:
        """Every weight's full state keyed by name, on rank 0 (None elsewhere); a collective call."""
        local = {"owned": {k: _to_cpu(v) for k, v in self.owned.items()},
                 "shards": [(name, start, _to_cpu(state)) for (name, start), state in self.shards.items()]}
        gathered: list = [None] * dist.get_world_size()
        dist.gather_object(local, gathered if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            return None
        states: dict[str, dict] = {}
        pieces: dict[str, list] = {}
        for part in gathered:
            states.update(part["owned"])
            for name, start, state in part["shards"]:
                pieces.setdefault(name, []).append((start, state))
        for name, parts in pieces.items():
            states[name] = _join_fragments(parts, self.params[name].shape)
        return {"by_name": states, "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_consolidated_state(self, saved: dict) -> None:
        """Take this rank's share of a consolidated state (on any number of ranks): applied at the first step,
        once the plan says which weights and fragments this rank holds."""
        for group, hyper in zip(self.param_groups, saved["groups"]):
            group.update({k: v for k, v in hyper.items() if k != "lowmem_group"})
        if self.plans is None:
            self._pending = saved
        else:
            self._load(saved)

    def _load(self, saved: dict) -> None:
        device = self._device()
        for name, plan in self.plans.items():
            state = saved["by_name"].get(name)
            if state is None:
                continue
            if plan.elementwise:
                for f in plan.fragments:
                    if f.rank == self.rank:
                        self.shards[(name, f.lp_start)] = _slice_state(state, f, plan.numel, device)
            elif plan.owner == self.rank:
                self.owned[name] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        if self.pipeline is not None:
            steps = [s.get("step", 0) for s in saved["by_name"].values()]
            self.pipeline._updates_done = self.pipeline._update_index = max(steps, default=0)


def _to_cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _join_fragments(parts: list[tuple[int, dict]], shape: torch.Size) -> dict:
    """The state of a whole weight from its fragments' states: per-element tensors concatenated in order."""
    parts.sort(key=lambda item: item[0])
    numel = math.prod(shape)
    joined = {}
    for key, value in parts[0][1].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            whole = torch.cat([state[key].reshape(-1) for _, state in parts])
            joined[key] = whole.view(shape) if whole.numel() == numel else whole
        else:
            joined[key] = value
    return joined


def _slice_state(state: dict, fragment: Fragment, numel: int, device: torch.device) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel() == numel and value.dim() > 0:
            out[key] = value.reshape(-1).narrow(0, fragment.lp_start, fragment.numel).clone().to(device)
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone().to(device)
        else:
            out[key] = value
    return out
