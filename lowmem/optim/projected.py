"""ProjectedAdam: one torch optimizer for every projection method (GaLore, Fira, FRUGAL, OSD, ...).

Per projected weight, on its canonical (b, a) gradient Gc (lowmem.optim.projectors):

    every update_gap updates: projector.refresh, then moments_on_refresh (keep | reset | rotate)
    R = project(Gc)                 core gradient, r x a
    D = Adam(R)                     bias-corrected direction; moments r x a, fp32 or bf16
    U = scale * P D + residual(Gc, R, D)
    W -= lr * U, with weight decay before or after (adam_convention)
    projector.adapt(Gc)             online PCA's step on P

Which weights are projected: a parameter group with `projected: True` (what `lowmem.optim.groups`
builds); its 2-D parameters are projected, anything else in the optimizer (groups without the key,
1-D parameters) gets dense Adam with the same convention. Used outside lowmem, pass such groups:
`ProjectedAdam([{"params": mats, "projected": True}, {"params": rest}], GaloreOptions(rank=64))`.

Counters count optimizer updates, never micro-batches: state['step'] drives refreshes, state['adam_step']
the bias correction (restarted by moments_on_refresh=reset). The blocks projector instead keys its refreshes
on a shared optimizer-level update counter (the most updates any weight has taken, fixed at the start of
each update by `step()` or `begin_update()`), so a weight that misses a gradient stays in the same draw.

Weights are stepped in fp32 math (bf16/fp16 weights through an fp32 copy); float64 weights are refused
rather than silently downcast.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from lowmem.optim.adam_core import (ADAM_CONVENTIONS, MOMENT_POLICIES, STATE_DTYPES, adam_direction,
                                    bias_correction, ensure_moments, moments_bytes)
from lowmem.optim.projection_options import ProjectionOptions
from lowmem.optim.projectors import PROJECTORS, RefreshKey, canonical, small_side
from lowmem.optim.residuals import RESIDUALS


class ProjectedAdam(torch.optim.Optimizer):
    def __init__(self, params: Iterable, options: Optional[ProjectionOptions] = None):
        options = options or ProjectionOptions()
        options.validate()
        self.options = options
        self._matrix_index: dict[torch.Tensor, int] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._updates_done = 0  # the most updates any weight has taken
        self._update_index = 0  # the shared index of the update in progress
        self.projector = PROJECTORS[options.projector](
            state_dtype=options.state_dtype, density=options.density or 1.0, seed=options.seed,
            num_matrices=0, update_gap=options.update_gap)  # add_param_group counts the matrices
        defaults = dict(lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                        weight_decay=options.weight_decay, projected=False)
        super().__init__(params, defaults)
        self.state_dtype = STATE_DTYPES[options.state_dtype]
        self.convention = ADAM_CONVENTIONS[options.adam_convention]
        self.moments_policy = MOMENT_POLICIES[options.moments_on_refresh]
        self.residual = RESIDUALS[options.residual](
            scale=options.scale, fira_gamma=options.fira_gamma, fira_variant=options.fira_variant,
            inactive_lr_scale=options.inactive_lr_scale)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])  # OSD follows the lr schedule's factor lr / initial_lr
        names = group.get("names") or [None] * len(group["params"])
        for p, name in zip(group["params"], names):
            self._group_of[p] = group
            if name is not None:
                self._names[p] = name
            if p.dtype == torch.float64:
                raise TypeError(f"ProjectedAdam steps float32/bfloat16/float16 weights in fp32 math; "
                                f"{self._label(p)} (shape {'x'.join(map(str, p.shape))}) is float64 and would "
                                f"be silently downcast: cast the model to float32 (model.float()) first")
            # frozen weights take no index, so they cannot distort the blocks count or the stagger offsets
            if self._is_projected(p, group) and p.requires_grad:
                if self.options.projector != "blocks":
                    rank = self.options.rank_for(tuple(p.shape))
                    if rank > min(p.shape):
                        raise ValueError(f"rank {rank} exceeds the smaller side of a {tuple(p.shape)} weight")
                self._matrix_index[p] = len(self._matrix_index)
        self.projector.num_matrices = len(self._matrix_index)

    @staticmethod
    def _is_projected(p: torch.Tensor, group: dict) -> bool:
        return bool(group.get("projected")) and p.ndim == 2

    def _label(self, p: torch.Tensor) -> str:
        if p in self._names:
            return f"weight '{self._names[p]}'"
        if p in self._matrix_index:
            return f"projected weight #{self._matrix_index[p]}"
        return "a weight"

    # -----------------------------------------------------------------------------------------------------
    # Stepping

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.begin_update()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group)
        return loss

    def begin_update(self) -> None:
        """Mark the start of an optimizer update (`step()` calls it; update-in-backward calls it when armed),
        fixing the shared update index that the blocks projector's refreshes follow."""
        self._update_index = self._updates_done

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient (update-in-backward's fast path)."""
        if p.grad is not None:
            self._step_one(p, self._group_of[p])

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        # without begin_update (step_param used directly) a weight's own count still moves the index on
        self._update_index = max(self._update_index, state["step"])
        grad = p.grad.float()
        if p in self._matrix_index and self._is_projected(p, group):
            update = self._projected_update(p, grad, state, group)
        else:
            update = self._dense_update(grad, state, group)
        state["step"] += 1
        self._updates_done = max(self._updates_done, state["step"])
        weight = p.float()
        self.convention.apply_update(weight, update, group["lr"], group["weight_decay"])
        if weight is not p:  # low-precision weights: the math above ran on an fp32 copy
            p.copy_(weight)

    def _adam(self, core_grad: torch.Tensor, state: dict, group: dict) -> tuple[torch.Tensor, float]:
        """The core's Adam direction (fresh tensor) and the bias-correction factor it carries."""
        ensure_moments(state, core_grad.shape, self.state_dtype, core_grad.device)
        state["adam_step"] += 1
        beta1, beta2 = group["betas"]
        direction = adam_direction(core_grad, state["exp_avg"], state["exp_avg_sq"], state["adam_step"],
                                   beta1, beta2, group["eps"], self.convention.eps_scaled)
        return direction, bias_correction(state["adam_step"], beta1, beta2)

    def _dense_update(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self._adam(grad, state, group)[0]

    def _refresh_number(self, p: torch.Tensor, state: dict) -> Optional[int]:
        """The refresh number to draw now, or None when no refresh is due."""
        if self.projector.shared_refresh:  # blocks: every weight follows the shared update index
            number = self._update_index // self.options.update_gap
            return number if state.get("shared_refresh") != number else None
        refreshes = state.get("refreshes", 0)
        return refreshes if self._refresh_due(p, state) else None

    def _refresh_due(self, p: torch.Tensor, state: dict) -> bool:
        if state.get("refreshes", 0) == 0:
            return True
        if not self.projector.periodic:
            return False
        gap = self.options.update_gap
        offset = self._matrix_index[p] * gap // len(self._matrix_index) if self.options.stagger else 0
        return (state["step"] + offset) % gap == 0

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        grad_c = canonical(grad)
        rows = grad_c.shape[0]
        number = self._refresh_number(p, state)
        if number is not None:
            has_basis = state.get("refreshes", 0) > 0
            old_basis = (self.projector.basis(state, rows, grad.device)
                         if self.moments_policy.needs_bases and has_basis else None)
            key = RefreshKey(self.options.seed, self._matrix_index[p], number)
            self.projector.refresh(state, grad, self.options.rank_for(tuple(p.shape)), key, self._label(p))
            state["refreshes"] = state.get("refreshes", 0) + 1
            if self.projector.shared_refresh:
                state["shared_refresh"] = number
            if has_basis:
                new_basis = self.projector.basis(state, rows, grad.device) if self.moments_policy.needs_bases else None
                self.moments_policy(state, old_basis, new_basis)
        if self.projector.is_empty(state):  # inactive block: no moments, no Adam, no projection
            state.pop("exp_avg", None)
            state.pop("exp_avg_sq", None)
            update_c = self.residual(state, grad_c, None, None, None, 1.0)
            if update_c is None:
                update_c = torch.zeros_like(grad_c)
        else:
            core_grad = self.projector.project(state, grad_c)
            direction, correction = self._adam(core_grad, state, group)
            extra = None
            if not (self.residual.vanishes_on_full and self.projector.is_full(state)):
                back = self.projector.project_back(state, core_grad, rows) if self.residual.needs_back else None
                extra = self.residual(state, grad_c, core_grad, direction, back, correction)
            # project_back may return `direction` itself (active block): it is not needed any more
            update_c = self.projector.project_back(state, direction, rows).mul_(self.options.scale)
            if extra is not None:
                update_c.add_(extra)
        self.projector.adapt(state, grad_c, group["lr"] / group["initial_lr"])
        return update_c.T if grad.shape[0] >= grad.shape[1] else update_c

    # -----------------------------------------------------------------------------------------------------
    # State

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state tensors keep their saved dtype (torch casts them to the parameter's dtype,
        which would turn fp32 moments of bf16 weights into bf16)."""
        super().load_state_dict(state_dict)
        # torch replaces the group dicts: step_param must read the new ones, whose lr the schedule moves
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._updates_done = max((s.get("step", 0) for s in self.state.values()), default=0)
        self._update_index = self._updates_done

    def expected_state_bytes(self) -> int:
        """The state size predicted by each part's formula, for the weights that hold state now."""
        itemsize = torch.empty((), dtype=self.state_dtype).element_size()
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if p in self._matrix_index and self._is_projected(p, group):
                    shape = tuple(p.shape)
                    rank = self.options.rank_for(shape)
                    core_rank = self.projector.core_rank(state, rank, shape)
                    total += (moments_bytes(core_rank, small_side(shape)[1], itemsize)
                              + self.projector.state_bytes(shape, rank, itemsize) + self.residual.state_bytes())
                else:
                    total += moments_bytes(p.numel(), 1, itemsize)
        return total
