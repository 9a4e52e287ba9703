"""PipelineOptimizer: one torch optimizer for every method lowmem builds from parts.

Per weight, on its canonical (b, a) gradient Gc when it is projected (lowmem.optim.parts.projectors):

    every update_gap updates: projector.refresh, then moments_on_refresh (keep | reset | rotate)
    R = project(Gc)                 core gradient, r x a
    D = core(R)                     adam | adafactor | microadam; state in fp32 | bf16 | int8 | int4
    U = scale * P D + residual(Gc, R, D)
    W -= lr * U, with weight decay before or after (adam_convention)
    projector.adapt(Gc)             online PCA's step on P

and D = core(G), U = D for a weight that is not projected (embeddings, head, norms, every weight of a
dense preset such as adamw8bit or adafactor). GaLore = svd + adam + drop; Fira = svd + adam + fira;
FRUGAL = blocks + adam + sign_sgd; OSD = online_pca + adam + drop; AdamW-8bit = none + adam (int8);
Adafactor = none + adafactor; MicroAdam = none + microadam. Any other combination works the same way.

Which weights are projected: a parameter group with `projected: True` (what `lowmem.optim.groups` builds)
and a projector other than `none`; its 2-D parameters are projected. Used outside lowmem, pass such
groups: `PipelineOptimizer([{"params": mats, "projected": True}, {"params": rest}], GaloreOptions(rank=64))`,
with an optional `names` list per group (random draws are then keyed by parameter name).

Counters count optimizer updates, never micro-batches: state['step'] drives refreshes; each core keeps its
own count (restarted when its state is reset). The blocks projector keys its refreshes on a shared
optimizer-level update counter (the most updates any weight has taken, fixed at the start of each update by
`step()` or `begin_update()`), so a weight that misses a gradient stays in the same draw.

Weights are stepped in fp32 math (bf16/fp16 weights through an fp32 copy); float64 weights are refused
rather than silently downcast. `update_weight` is the whole per-weight rule on plain tensors, so a
distributed wrapper can run it on a matrix it assembled.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from lowmem.errors import ConfigError
from lowmem.kernels.dispatch import resolve_backend
from lowmem.optim.batched import BatchedStep
from lowmem.optim.parts.cores import ADAM_CONVENTIONS, CORES, MOMENT_POLICIES, Core, CoreContext
from lowmem.optim.parts.directions import DirectionChain
from lowmem.optim.parts.projectors import PROJECTORS, Projector, RefreshKey, canonical, small_side
from lowmem.optim.parts.residuals import RESIDUALS
from lowmem.optim.parts.transforms import TransformChain, TransformStep
from lowmem.optim.pipeline_options import PipelineOptions
from lowmem.optim.state.storage import StoragePolicy, resolve_state_dtype


@dataclass(frozen=True)
class WeightKey:
    """A weight's identity for every random draw (a hash of its name, or its position when unnamed), its
    position among the projected weights in model order (-1: not projected), and a label for messages."""

    identity: int
    position: int
    label: str


def name_identity(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class PipelineOptimizer(torch.optim.Optimizer):
    def __init__(self, params: Iterable, options: Optional[PipelineOptions] = None):
        options = options or PipelineOptions()
        options.validate()
        self.options = options
        self._keys: dict[torch.Tensor, WeightKey] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._names: dict[torch.Tensor, str] = {}
        self._projected_count = 0
        self._updates_done = 0  # the most updates any weight has taken
        self._update_index = 0  # the shared index of the update in progress
        self._core_grads: dict[torch.Tensor, torch.Tensor] = {}  # all-reduced R = P^T Gc for the next step
        self._backends: dict[str, str] = {}  # optimizer.kernels resolved per device type
        defaults = dict(lr=options.group_lr, betas=tuple(options.betas), eps=options.eps,
                        weight_decay=options.weight_decay, projected=False)
        self.projector: Optional[Projector] = None
        if options.projects:
            self.projector = PROJECTORS[options.projector](
                density=options.density or 1.0, seed=options.seed, num_matrices=0,
                update_gap=options.update_gap, block_order=options.block_order)
        super().__init__(params, defaults)
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        # auto: bf16 states only when every trainable weight is bf16, as torch AdamW keeps them
        dtype = torch.bfloat16 if trainable and all(p.dtype == torch.bfloat16 for p in trainable) else torch.float32
        self.policy = StoragePolicy(resolve_state_dtype(options.state_dtype, dtype), options.int4_rank1)
        if self.projector is not None:
            self.projector.basis_dtype = self.policy.basis_dtype
        self.core: Core = CORES[options.core](options, self.policy)
        self.convention = ADAM_CONVENTIONS[options.adam_convention]
        if self.core.decays_before_step:
            self.convention = self.convention.decaying_before()
        self.moments_policy = MOMENT_POLICIES[options.moments_on_refresh]
        self.residual = RESIDUALS[options.residual](
            scale=options.scale, fira_gamma=options.fira_gamma, fira_variant=options.fira_variant,
            inactive_lr_scale=options.inactive_lr_scale)
        self.transforms = TransformChain(options)
        self.directions = DirectionChain(options)
        if options.implementation == "batched" and not BatchedStep.applies(self):
            raise ConfigError(f"optimizer.implementation: batched steps {self.policy.state_dtype} moments only on the "
                              f"Triton kernels (CUDA), and these weights take the torch path; use implementation "
                              f"auto or per_weight")

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
                raise TypeError(f"the pipeline optimizer steps float32/bfloat16/float16 weights in fp32 math; "
                                f"{self._describe(p)} (shape {'x'.join(map(str, p.shape))}) is float64 and would "
                                f"be silently downcast: cast the model to float32 (model.float()) first")
            # frozen weights take no position, so they cannot distort the blocks count or the stagger offsets
            position = -1
            if self._is_projected(p, group) and p.requires_grad:
                if self.options.projector != "blocks":
                    rank = self.options.rank_for(tuple(p.shape))
                    if rank > min(p.shape):
                        raise ValueError(f"rank {rank} exceeds the smaller side of a {tuple(p.shape)} weight")
                position = self._projected_count
                self._projected_count += 1
            identity = name_identity(name) if name is not None else len(self._keys)
            self._keys[p] = WeightKey(identity, position, self._describe(p, position))
        if self.projector is not None:
            self.projector.num_matrices = self._projected_count

    def _is_projected(self, p: torch.Tensor, group: dict) -> bool:
        return self.projector is not None and bool(group.get("projected")) and p.ndim == 2

    def _describe(self, p: torch.Tensor, position: int = -1) -> str:
        if p in self._names:
            return f"weight '{self._names[p]}'"
        if position >= 0:
            return f"projected weight #{position}"
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
        # both paths batch what they can across weights (lowmem.optim.batched); the rest, one by one
        batch = BatchedStep(self) if BatchedStep.applies(self) else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None or p in self._core_grads:
                    if batch is None or not batch.add(p, group):
                        self._step_param(p, group)
        if batch is not None:
            batch.finish()
        return loss

    def begin_update(self) -> None:
        """Mark the start of an optimizer update (`step()` calls it; update-in-backward calls it when armed),
        fixing the shared update index that the blocks projector's refreshes follow."""
        self._update_index = self._updates_done

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient (update-in-backward's fast path)."""
        if p.grad is not None:
            self._step_param(p, self._group_of[p])

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        weight = p.float()
        self.update_weight(weight, p.grad, self.state[p], group, self._keys[p], self._is_projected(p, group),
                           core_grad=self._core_grads.pop(p, None))
        if weight is not p:  # low-precision weights: the math ran on an fp32 copy
            p.copy_(weight)

    # -----------------------------------------------------------------------------------------------------
    # Low-rank gradient communication (lowmem.distributed.gradient_sync)

    def syncable_basis(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The basis P (b x r, fp32) for all-reducing R = P^T Gc instead of G before the coming update, or None
        when that update needs the whole gradient: p is not projected, a stage of its rule declares a reason
        (`sync_refusal`: a residual that uses what P leaves out, a projector that moves P with the gradient or
        follows the shared blocks draw, a transform), or p has no basis yet or refreshes it now."""
        state = self.state.get(p, {})
        if (not self._is_projected(p, self._group_of[p]) or any(stage.sync_refusal for stage in self.stages(p))
                or state.get("refreshes", 0) == 0 or self._refresh_due(state, self._keys[p])
                or self.projector.is_empty(state)):
            return None
        return self.projector.basis(state, min(p.shape), p.device)

    def set_core_grad(self, p: torch.Tensor, core_grad: torch.Tensor) -> None:
        """Hand the next step R = P^T Gc for p (all-reduced by the caller) in place of p's gradient."""
        self._core_grads[p] = core_grad

    # -----------------------------------------------------------------------------------------------------
    # The rule of one weight on tensors held elsewhere (a distributed owner's assembled matrix)

    def apply_rule(self, p: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Update `weight` (fp32, p's shape, or a flat fragment of it for an element-wise rule) from `grad` with
        p's rule and the given `state` (kept by the caller) and hyper-parameters."""
        self.update_weight(weight, grad, state, group, self._keys[p], self._is_projected(p, self._group_of[p]))

    def stages(self, p: torch.Tensor) -> list:
        """The parts p's rule passes through, in order: transforms, then projector, core and residual for a
        projected weight, the core alone for the others. What the rule is (element-wise, open to projected
        sync, its cost) derives from what these declare."""
        if self._is_projected(p, self._group_of[p]):
            return [self.transforms, self.projector, self.core, self.directions, self.residual]
        return [self.transforms, self.core, self.directions]

    def _core_shape_of(self, p: torch.Tensor) -> tuple[int, ...]:
        shape = tuple(p.shape)
        if not self._is_projected(p, self._group_of[p]):
            return shape
        return (self.options.rank_for(shape), small_side(shape)[1])

    def is_elementwise(self, p: torch.Tensor) -> bool:
        """Whether p's rule is element-wise (each element's update depends on that element alone), so it may run
        on any fragment of p: every stage says so for p's shape."""
        return all(stage.elementwise(tuple(p.shape)) for stage in self.stages(p))

    def rule_cost(self, p: torch.Tensor) -> float:
        """Rough flops of one update of p, the sum of its stages' costs, to balance matrix owners."""
        shape, core_shape = tuple(p.shape), self._core_shape_of(p)
        return sum(stage.cost(shape, core_shape) for stage in self.stages(p))

    def update_weight(self, weight: torch.Tensor, grad: Optional[torch.Tensor], state: dict, group: dict,
                      key: WeightKey, projected: bool, core_grad: Optional[torch.Tensor] = None) -> None:
        """The whole rule for one weight: update fp32 `weight` in place from `grad` (any float dtype), with
        the weight's `state` and its group's hyper-parameters; or from a core gradient R = P^T Gc already
        projected with the current basis (see syncable_basis)."""
        state.setdefault("step", 0)
        # without begin_update (step_param used directly) a weight's own count still moves the index on
        self._update_index = max(self._update_index, state["step"])
        if core_grad is not None:
            ctx = CoreContext(weight, key.label, self._fused(weight.device))
            direction, decay_scale, _ = self._core_step(core_grad.float(), state, group, ctx, None)
            update_c = self.projector.project_back(state, direction, min(weight.shape)).mul_(self.options.scale)
            update = update_c.T if weight.shape[0] >= weight.shape[1] else update_c
            state["step"] += 1
            self._updates_done = max(self._updates_done, state["step"])
            self.convention.apply_update(weight, update, self._step_lr(group),
                                         group["lr"] * group["weight_decay"] * decay_scale)
            return
        grad = grad.float()
        step = None
        if self.transforms:
            step = self.transforms.prepare(state, self._update_index + 1)
            # the transforms change the gradient: never the caller's (an fp32 .grad is not copied by .float())
            grad = self.transforms.on_gradient(grad.clone(), state, step)
            group = self.transforms.group(group, step)
        ctx = CoreContext(weight, key.label, self._fused(grad.device))
        decay = group["lr"] * group["weight_decay"]
        # a kernel that steps the weight itself would do so before any direction stage saw D
        one_pass = not self.directions
        if projected:
            update, decay_scale = self._projected_update(grad, state, group, key, ctx, step)
        elif one_pass and ctx.fused and self._fused_dense_update(weight, grad, state, group, decay, step):
            update = None  # the kernel has updated the weight
        elif one_pass and step is None and not ctx.fused and self.core.cpu_update(weight, grad, state, group, decay):
            update = None  # the CPU kernel has updated the weight
        else:
            update, decay_scale, _ = self._core_step(grad, state, group, ctx, step)
        if update is not None and step is not None and step.lr_scale != 1.0:
            update.mul_(step.lr_scale)
        state["step"] += 1
        self._updates_done = max(self._updates_done, state["step"])
        if update is not None:
            self.convention.apply_update(weight, update, self._step_lr(group), decay * decay_scale)

    def _step_lr(self, group: dict) -> float:
        """What the direction is multiplied by: the group's lr, or 1 where the core has folded it in."""
        return 1.0 if self.core.lr_in_direction else group["lr"]

    def _fused(self, device: torch.device) -> bool:
        """Whether optimizer.kernels resolves to the Triton kernels for tensors on `device`."""
        if device.type not in self._backends:
            self._backends[device.type] = resolve_backend(self.options.kernels, device)
        return self._backends[device.type] == "triton"

    def _fused_dense_update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, decay: float,
                            step: Optional[TransformStep]) -> bool:
        """Step a dense weight in one fused kernel pass, with the transforms' core-stage work in it (SPAM's clip,
        the moment reset before it, the warm-up's lr scale); False, with nothing done, where it cannot."""
        clip, lr_scale = None, 1.0
        if step is not None:
            if not (self.transforms.core_parts_fusable and self.core.fuses_clip(grad.shape)):
                return False
            clip = self.transforms.before_fused_core(state, self.core, step, grad.shape)
            lr_scale = step.lr_scale
        if not self.core.fused_update(weight, grad, state, group, decay, lr_scale, clip):
            return False
        if step is not None:
            self.transforms.after_core(state, self.core, step, grad.shape)
        return True

    def _core_step(self, core_grad: torch.Tensor, state: dict, group: dict, ctx: CoreContext,
                   step: Optional[TransformStep]) -> tuple[torch.Tensor, float, float]:
        """The core's direction for `core_grad` (with the transforms that act on the core around it), its
        decay scale and the bias correction it carries. On the fused path SPAM's clip runs in the core's
        kernel (ctx.clip) where the core fuses it."""
        ctx.clip = None
        if step is not None:
            if ctx.fused and self.transforms.core_parts_fusable and self.core.fuses_clip(core_grad.shape):
                ctx.clip = self.transforms.before_fused_core(state, self.core, step, core_grad.shape)
            else:
                core_grad = self.transforms.before_core(core_grad, state, self.core, step)
        result = self.core.step(core_grad, state, group, ctx)
        ctx.clip = None
        if step is not None:
            self.transforms.after_core(state, self.core, step, core_grad.shape)
        direction = self.directions.apply(result.direction, core_grad, state) if self.directions else result.direction
        return direction, result.decay_scale, result.bias_correction

    def _refresh_number(self, state: dict, key: WeightKey) -> Optional[int]:
        """The refresh number to draw now, or None when no refresh is due."""
        if self.projector.shared_refresh:  # blocks: every weight follows the shared update index
            number = self._update_index // self.options.update_gap
            return number if state.get("shared_refresh") != number else None
        refreshes = state.get("refreshes", 0)
        return refreshes if self._refresh_due(state, key) else None

    def _refresh_due(self, state: dict, key: WeightKey) -> bool:
        if state.get("refreshes", 0) == 0:
            return True
        if not self.projector.periodic:
            return False
        gap = self.options.update_gap
        offset = key.position * gap // self._projected_count if self.options.stagger else 0
        return (state["step"] + offset) % gap == 0

    def _core_shape(self, state: dict, shape: tuple[int, ...]) -> torch.Size:
        rank = self.projector.core_rank(state, self.options.rank_for(shape), shape)
        return torch.Size((rank, small_side(shape)[1]))

    def _projected_update(self, grad: torch.Tensor, state: dict, group: dict, key: WeightKey, ctx: CoreContext,
                          step: Optional[TransformStep]) -> tuple[Optional[torch.Tensor], float]:
        """The update (the weight's orientation) and its decay scale; None for the update when the fused
        epilogue has stepped ctx.weight itself (`_fuses_epilogue`)."""
        projector = self.projector
        grad_c = canonical(grad)
        self._refresh_if_due(grad, state, key)
        decay_scale, correction = 1.0, 1.0
        core_grad = direction = None
        if not projector.is_empty(state):  # an inactive block has no core state and no projection
            core_grad = projector.project(state, grad_c)
            direction, decay_scale, correction = self._core_step(core_grad, state, group, ctx, step)
        if ctx.fused and self._fuses_epilogue(state):
            lr = self._step_lr(group) * (step.lr_scale if step is not None else 1.0)
            self._fused_epilogue(ctx.weight, grad, self._fused_basis(state, grad, core_grad), core_grad, direction,
                                 correction, state, lr, group["lr"] * group["weight_decay"] * decay_scale)
            update_c = None
        else:
            update_c = self._back_projected(grad_c, core_grad, direction, correction, state)
        projector.adapt(state, grad_c, group["lr"] / group["initial_lr"], core_grad)
        if update_c is None:
            return None, decay_scale
        return (update_c.T if grad.shape[0] >= grad.shape[1] else update_c), decay_scale

    def _refresh_if_due(self, grad: torch.Tensor, state: dict, key: WeightKey) -> None:
        """Refresh the projector's basis when due, with what moments_on_refresh does to the core state."""
        projector = self.projector
        number = self._refresh_number(state, key)
        if number is None:
            return
        rows = min(grad.shape)
        has_basis = state.get("refreshes", 0) > 0
        needs_bases = self.moments_policy.needs_bases and has_basis and not projector.resets_state
        old_basis = projector.basis(state, rows, grad.device) if needs_bases else None
        refresh_key = RefreshKey(self.options.seed, key.identity, number, key.position)
        projector.refresh(state, grad, self.options.rank_for(tuple(grad.shape)), refresh_key, key.label)
        state["refreshes"] = state.get("refreshes", 0) + 1
        if projector.shared_refresh:
            state["shared_refresh"] = number
        if projector.resets_state:
            self.core.reset(state)
            self.residual.reset(state)
        elif has_basis:
            new_basis = projector.basis(state, rows, grad.device) if needs_bases else None
            self.moments_policy(self.core, state, old_basis, new_basis, self._core_shape(state, grad.shape))

    def _back_projected(self, grad_c: torch.Tensor, core_grad: Optional[torch.Tensor],
                        direction: Optional[torch.Tensor], correction: float, state: dict,
                        basis: Optional[torch.Tensor] = None) -> torch.Tensor:
        """U = scale P D + residual, canonical layout (the torch path); D may be overwritten. `basis`: the
        dense basis already built for this update (else the projector's project_back builds it)."""
        projector = self.projector
        rows = grad_c.shape[0]

        def project_back(core: torch.Tensor) -> torch.Tensor:
            return basis @ core if basis is not None else projector.project_back(state, core, rows)

        if core_grad is None:
            update_c = self.residual(state, grad_c, None, None, None, 1.0)
            return torch.zeros_like(grad_c) if update_c is None else update_c
        extra = None
        if not (self.residual.vanishes_on_full and projector.is_full(state)):
            back = project_back(core_grad) if self.residual.needs_back else None
            extra = self.residual(state, grad_c, core_grad, direction, back, correction)
        # project_back may return `direction` itself (active block): it is not needed any more
        update_c = project_back(direction)
        if self.options.scale != 1.0:
            update_c.mul_(self.options.scale)
        if extra is not None:
            update_c.add_(extra)
        return update_c

    def _fuses_epilogue(self, state: dict) -> bool:
        """Whether lowmem.kernels.residual's epilogue applies: a residual policy that gives it its terms, and a
        basis it can multiply by (a dense one, or none: an inactive or active block). The coordinates projector
        keeps its scatter. Transforms are no obstacle: they act on the gradient and the core before it, and
        their lr scale goes into the kernel's lr."""
        projector = self.projector
        return self.residual.fusable and (projector.dense_basis or projector.is_empty(state)
                                          or projector.is_full(state))

    def _fused_basis(self, state: dict, grad: torch.Tensor,
                     core_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The dense basis the fused epilogue multiplies by; None for the whole space or an empty subspace."""
        if core_grad is None or self.projector.is_full(state):
            return None
        return self.projector.basis(state, min(grad.shape), grad.device)

    def _fused_epilogue(self, weight: torch.Tensor, grad: torch.Tensor, basis: Optional[torch.Tensor],
                        core_grad: Optional[torch.Tensor], direction: Optional[torch.Tensor], correction: float,
                        state: dict, lr: float, decay: float) -> None:
        """Step `weight` (fp32 or bf16, grad's orientation) by the core's direction D of R = core_grad in the
        fused epilogue (lowmem.kernels.residual): U = scale P D + residual, back-projected by `basis` (None:
        the whole space, P = I; or an empty subspace, R and D None) after one GEMM, or none; decay = lr *
        weight_decay * the core's decay scale, as the convention places it. The same update as
        `_back_projected` with the convention's apply_update."""
        from lowmem.kernels.residual import epilogue  # lazily: kernel modules import Triton

        residual = self.residual
        decay_after = self.convention.decay_after
        grad_c, weight_c = canonical(grad), canonical(weight)
        full = basis is None and direction is not None
        with_residual = residual.needs_back and not (full and residual.vanishes_on_full)
        if basis is not None and not with_residual and weight.dtype == torch.float32:
            # U = scale P D: the whole update is one GEMM with the decay as beta
            alpha = -lr * residual.scale * ((1.0 - decay) if decay_after else 1.0)
            weight_c.addmm_(basis, direction, beta=1.0 - decay, alpha=alpha)
            return
        update = back = None
        if full:
            update, back = direction, core_grad
        elif basis is not None:
            if not with_residual:
                update = basis @ direction
            else:
                stacked = basis @ torch.cat([core_grad, direction], dim=1)  # [P R | P D], one GEMM
                back, update = stacked[:, :core_grad.shape[1]], stacked[:, core_grad.shape[1]:]
        terms = None
        if with_residual:
            terms = residual.epilogue_terms(state, grad_c, core_grad, direction, back, correction)
        if terms is None:
            epilogue(weight_c, grad_c, lr, decay, decay_after, update, residual.scale)
        else:
            epilogue(weight_c, grad_c, lr, decay, decay_after, update, residual.scale, terms.k, back, terms.c,
                     terms.phi, terms.sign)

    # -----------------------------------------------------------------------------------------------------
    # State

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state tensors keep their saved dtype (torch casts floating tensors to the parameter's
        dtype, which would turn fp32 moments of bf16 weights into bf16), and the per-parameter group lookup
        follows the new group dicts torch installs."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._updates_done = max((s.get("step", 0) for s in self.state.values()), default=0)
        self._update_index = self._updates_done

    def _weight_state_parts(self, p: torch.Tensor, group: dict, state: Optional[dict]) -> dict[str, int]:
        """The formula for one weight's state, by part: what it holds now (`state`), or after its first update
        (None)."""
        shape = tuple(p.shape)
        parts = {"transforms": self.transforms.state_bytes()}
        if not self._is_projected(p, group) or p not in self._keys or self._keys[p].position < 0:
            return _merge(parts, self.core.state_parts(shape))
        projector = self.projector
        if state is None:  # the first update's refresh, in a scratch state (blocks: which weights are active)
            state = {}
            if projector.shared_refresh:
                key = self._keys[p]
                projector.refresh(state, None, 0, RefreshKey(self.options.seed, key.identity, 0, key.position))
        parts["projector"] = projector.state_bytes(shape, self.options.rank_for(shape), self.policy.basis_itemsize)
        if not projector.is_empty(state):
            parts = _merge(parts, self.core.state_parts(self._core_shape(state, shape)))
            parts["residual"] = self.residual.state_bytes()
        return parts

    def _state_parts(self, weights) -> dict[str, int]:
        total: dict[str, int] = {}
        for p, group, state in weights:
            total = _merge(total, self._weight_state_parts(p, group, state))
        return {name: value for name, value in total.items() if value}

    def expected_state_bytes(self) -> int:
        """The state size predicted by each part's formula, for the weights that hold state now."""
        return sum(self._state_parts((p, g, self.state[p]) for g in self.param_groups for p in g["params"]
                                     if self.state.get(p)).values())

    def predicted_state_parts(self) -> dict[str, int]:
        """The state after the first update of every trainable weight, by part, from shapes alone (works on a
        meta-device model, so it can be asked before any weight is allocated)."""
        return self._state_parts((p, g, None) for g in self.param_groups for p in g["params"] if p.requires_grad)

    def predicted_state_bytes(self) -> int:
        return sum(self.predicted_state_parts().values())


def _merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for name, value in b.items():
        out[name] = out.get(name, 0) + value
    return out
