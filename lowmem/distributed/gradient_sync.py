"""Data-parallel gradient averaging, in full or in the projected space (distributed.gradient_sync).

`full` all-reduces every gradient. `projected` is exact low-rank communication: a projection whose residual
is dropped (GaLore-like) needs, between refreshes, only R = P^T G of each projected weight, and P is the same
on every rank (it came from the same all-reduced gradient at the last refresh, or from a shared seed), so
all-reducing R (r x a) instead of G (b x a) gives the same update at b/r times fewer bytes. A weight whose
update needs all of G (a refresh, a residual, online PCA moving P, a transform's max or norm) is sent whole
(PipelineOptimizer.syncable_basis decides, weight by weight, update by update). Tensors are averaged in one
flat buffer per dtype (SUM then divide: gloo has no AVG).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from lowmem.errors import ConfigError
from lowmem.optim.parts.projectors import canonical

SYNC_MODES = ("full", "projected")


def check_projected_sync(options) -> None:
    """Refuse `projected` for an optimizer whose updates need the whole gradient, saying why (what its parts
    declare: PipelineOptions.projected_sync_refusals)."""
    refusals = getattr(options, "projected_sync_refusals", None)
    reasons = refusals() if refusals is not None else [f"'{options.name}' projects no weight"]
    if reasons:
        raise ConfigError("distributed.gradient_sync: 'projected' all-reduces R = P^T G instead of G, exact only "
                          "when the update needs nothing else; here " + "; ".join(reasons)
                          + ". Use gradient_sync: full")


class GradientSync:
    """Average the gradients of `params` over the data-parallel group after the last micro-batch of an update."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "full", group: Optional[dist.ProcessGroup] = None):
        self.optimizer = optimizer
        self.mode = mode
        self.group = group
        self.bytes_sent = 0  # of the last sync: what each rank contributed to the all-reduces

    def sync(self, params: Iterable[torch.Tensor]) -> int:
        world = dist.get_world_size(self.group)
        pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # (tensor to reduce, its projected weight)
        for p in params:
            if p.grad is None:
                continue
            basis = self.optimizer.syncable_basis(p) if self.mode == "projected" else None
            if basis is not None:
                pending.append((basis.T @ canonical(p.grad.float()), p))
            else:
                pending.append((p.grad, None))
        by_dtype: dict[torch.dtype, list] = {}
        for tensor, owner in pending:
            by_dtype.setdefault(tensor.dtype, []).append((tensor, owner))
        self.bytes_sent = 0
        for items in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t, _ in items])
            dist.all_reduce(flat, group=self.group)
            flat.div_(world)
            self.bytes_sent += flat.numel() * flat.element_size()
            offset = 0
            for tensor, owner in items:
                averaged = flat.narrow(0, offset, tensor.numel()).view(tensor.shape)
                offset += tensor.numel()
                if owner is None:
                    tensor.copy_(averaged)
                else:  # the step uses R; the local G is no longer needed
                    self.optimizer.set_core_grad(owner, averaged.clone())
                    owner.grad = None
        return self.bytes_sent
