"""Core updates: the rule that turns a (projected or dense) gradient into a direction, with its state.

A core keeps its moments through a `Storage` (fp32, bf16, int8, int4; lowmem.optim.state.storage), so every core
runs with every state_dtype and every projector. The registry `CORES` holds

    adam       Adam moments, GaLore's or torch's eps/weight-decay convention
    adafactor  factored second moment (lowmem.optim.parts.adafactor)
    microadam  a window of compressed sparse gradients (lowmem.optim.parts.microadam)

The math of each core lives in one plain fp32 function (e.g. `adam_math`) that a fused kernel can
replace; the core only reads and writes its stored state around it. On the fused path (CoreContext.fused) the
core hands the kernel its stored tensors and the numbers it needs (`kernel_moments`: the moments, their
scales and maps), and the kernel updates them in place.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from lowmem.optim.state import quantization as q
from lowmem.optim.state.storage import QuantizedStorage, Storage, StoragePolicy

if TYPE_CHECKING:
    from lowmem.kernels.adam import Moments

FIRST, SECOND = "exp_avg", "exp_avg_sq"


def fresh_copy(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A copy with its own, exactly-sized storage (a slice of a larger SVD output must not pin it)."""
    out = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device=tensor.device)
    return out.copy_(tensor)


def bias_correction(step: int, beta1: float, beta2: float) -> float:
    """sqrt(1 - b2^t) / (1 - b1^t): the factor between GaLore's bias-corrected and uncorrected directions."""
    return math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)


def adam_math(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
              beta1: float, beta2: float, eps: float, eps_scaled: bool) -> torch.Tensor:
    """Update fp32 moments in place with `grad` and return the bias-corrected Adam direction as a fresh fp32
    tensor the caller may modify. All of the element-wise Adam math lives here.

    eps_scaled=False is GaLore's convention, sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps);
    eps_scaled=True is torch's, (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps).
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    # one temporary: the denominator, overwritten by the direction (same values as m / denom)
    if eps_scaled:
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(eps)
        return torch.div(exp_avg, denom, out=denom).div_(bias1)
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=denom).mul_(bias2_sqrt / bias1)


# ---------------------------------------------------------------------------------------------------------
# Weight-decay conventions: where the decay goes relative to the update.


def _decay_after(param: torch.Tensor, update: torch.Tensor, lr: float, decay: float) -> None:
    """GaLore / HF AdamW: step first, then decay the already-updated weight (decay = lr * weight_decay)."""
    param.add_(update, alpha=-lr)
    if decay > 0:
        param.mul_(1.0 - decay)


def _decay_before(param: torch.Tensor, update: torch.Tensor, lr: float, decay: float) -> None:
    """torch AdamW / FRUGAL / Adafactor: decay the weight, then step."""
    if decay > 0:
        param.mul_(1.0 - decay)
    param.add_(update, alpha=-lr)


@dataclass(frozen=True)
class AdamConvention:
    """Where eps sits (bias-scaled or not) and where weight decay is applied."""

    eps_scaled: bool
    apply_update: Callable[[torch.Tensor, torch.Tensor, float, float], None]
    decay_after: bool  # what apply_update does, for the fused kernels

    def decaying_before(self) -> "AdamConvention":
        """This convention with the decay moved before the step (a core whose release decays first)."""
        return AdamConvention(self.eps_scaled, _decay_before, False)


ADAM_CONVENTIONS: dict[str, AdamConvention] = {
    "galore": AdamConvention(eps_scaled=False, apply_update=_decay_after, decay_after=True),
    "torch": AdamConvention(eps_scaled=True, apply_update=_decay_before, decay_after=False),
}


# ---------------------------------------------------------------------------------------------------------
# Cores


@dataclass
class CoreStep:
    direction: torch.Tensor  # fresh fp32 tensor, the core gradient's shape
    bias_correction: float = 1.0  # the factor sqrt(1-b2^t)/(1-b1^t) the direction carries (Fira's code variant)
    decay_scale: float = 1.0  # multiplies lr * weight_decay (Adafactor's relative and parameter scale)


class CoreContext:
    """What a core may need beyond its gradient: the full weight (Adafactor's parameter scale), a label, and
    whether to run the fused Triton kernels (optimizer.kernels resolved to triton for the weight's device)."""

    def __init__(self, weight: torch.Tensor, label: str = "a weight", fused: bool = False):
        self.weight = weight
        self.label = label
        self.fused = fused
        self.clip: Optional[float] = None  # SPAM's theta for a fused kernel to clip the gradient with (fuses_clip)


class Core:
    """A core update with its state kept through `policy` (one storage per moment size)."""

    name = "core"
    supports_rotation = False  # moments_on_refresh: rotate needs moments expressed in a basis
    has_second_moment = False  # an element-wise second-moment estimate (SPAM's spike clipping reads it)
    moment_keys: tuple[str, ...] = ()  # every state key the core owns (reset drops them)
    counter_keys: tuple[str, ...] = ()
    decays_before_step = False  # weight decay before the step whatever adam_convention says (Adafactor)
    lr_in_direction = False  # the direction already holds the lr: the pipeline steps it by 1 (Adafactor option)
    sync_refusal: Optional[str] = None  # a core steps on R = P^T G however it was summed over the ranks

    def __init__(self, options, policy: StoragePolicy):
        self.options = options
        self.policy = policy

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        """Whether each element's update depends on that element alone, so ZeRO may run the core on any
        fragment of a weight of `shape`. A core with row or column statistics, a top-k or a window says no."""
        return False

    def cost(self, shape: tuple[int, ...], core_shape: tuple[int, ...]) -> float:
        """Rough flops of one update on its core gradient of `core_shape` (balances ZeRO's matrix owners)."""
        return 12.0 * math.prod(core_shape)

    def step(self, grad: torch.Tensor, state: dict, group: dict, ctx: CoreContext) -> CoreStep:
        raise NotImplementedError

    def fused_update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                     decay: float, lr_scale: float = 1.0, clip: Optional[float] = None) -> bool:
        """Step and update the fp32 `weight` in one fused kernel pass (W -= lr lr_scale D, decay = lr *
        weight_decay as the convention applies it; clip: SPAM's theta, see fuses_clip); False, with nothing
        done, where the core has no such kernel."""
        return False

    def cpu_update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, decay: float) -> bool:
        """Step and update the fp32 CPU `weight` in one pass of a CPU kernel (lowmem.kernels.cpu_adam), as
        fused_update does on CUDA; False, with nothing done, where the core has none for this state."""
        return False

    def fuses_clip(self, shape: torch.Size) -> bool:
        """Whether the fused kernels apply SPAM's element-wise clip against the second moment themselves
        (CoreContext.clip, fused_update's clip) for a gradient of this shape; then fused_update never declines."""
        return False

    def holds_moments(self, state: dict) -> bool:
        """Whether `state` holds moments from an earlier update (second_moment would not be None)."""
        return False

    def reset(self, state: dict) -> None:
        """Forget the moments (moments_on_refresh: reset, a FRUGAL refresh, an inactive block)."""
        for key in self.moment_keys:
            self.policy.storage.drop(state, key)
        for key in self.counter_keys:
            state.pop(key, None)

    def reset_moments(self, state: dict, shape: torch.Size) -> None:
        """Zero the moments in place, keeping the update count (a moment reset; `restart_count` restarts it)."""
        raise NotImplementedError

    def restart_count(self, state: dict) -> None:
        """Make the next update count as the first (bias correction and schedules restart)."""
        for key in self.counter_keys:
            if key in state:
                state[key] = 0

    def second_moment(self, state: dict, shape: torch.Size) -> Optional[torch.Tensor]:
        """The element-wise second-moment estimate before this update (fp32), or None when none is held yet."""
        return None

    def rotate(self, state: dict, rotation: torch.Tensor, shape: torch.Size) -> None:
        raise NotImplementedError(f"the {self.name} core cannot rotate its state into a new basis")

    def state_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of this core's state for a core gradient of `shape`."""
        return sum(self.state_parts(shape).values())

    def state_parts(self, shape: tuple[int, ...]) -> dict[str, int]:
        """The same bytes by kind of state (moments, scales, window, ...)."""
        raise NotImplementedError


@functools.cache
def kernel_map(bits: int, kind: q.Kind, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A state map as the fused kernels search it: its values and its midpoints padded with +inf to 2^bits
    entries, on `device`."""
    qmap = q.state_map(bits, kind)
    padded = torch.cat([qmap.midpoints, torch.tensor([math.inf])])
    return qmap.values.to(device), padded.to(device)


def kernel_moments(state: dict, storage: Storage) -> "Moments":
    """The Adam moments in `state`, kept by `storage`, as the fused kernels take them (the stored tensors
    themselves: the kernels update them in place)."""
    from lowmem.kernels.adam import Moments  # lazily: kernel modules import Triton

    if not isinstance(storage, QuantizedStorage):
        return Moments(state[FIRST], state[SECOND])
    device = str(state[FIRST].device)
    return Moments(state[FIRST], state[SECOND], storage.bits, storage.block, state[FIRST + "_absmax"],
                   state[SECOND + "_absmax"], kernel_map(storage.bits, "signed", device),
                   kernel_map(storage.bits, "unsigned", device), q.SCALE_FLOOR)


def cpu_moments(state: dict) -> tuple[torch.Tensor, ...]:
    """The quantized Adam moments in `state` as the CPU kernel takes them: codes and absmax scales, contiguous
    (made so in the state, since the kernel updates them in place)."""
    keys = (FIRST, SECOND, FIRST + "_absmax", SECOND + "_absmax")
    for key in keys:
        if not state[key].is_contiguous():
            state[key] = state[key].contiguous()
    return tuple(state[key] for key in keys)


@functools.cache
def cpu_tables(bits: int):
    """The signed and unsigned state maps of `bits` as the CPU kernel reads them (built once per width)."""
    from lowmem.kernels import cpu_adam

    maps = [q.state_map(bits, kind) for kind in ("signed", "unsigned")]
    return cpu_adam.Tables(maps[0].values, maps[1].values, *(cpu_adam.encode_table(*m.prefix_tables()) for m in maps))


def moment_parts(storage: Storage, shape: tuple[int, ...], moments: list[tuple[str, str]]) -> dict[str, int]:
    """Bytes of `moments` ((part name, signed | unsigned) each) and of their quantization scales."""
    parts = {"scales": 0}
    for name, kind in moments:
        data, scales = storage.nbytes_parts(shape, kind)
        parts[name] = parts.get(name, 0) + data
        parts["scales"] += scales
    return {name: value for name, value in parts.items() if value}


class AdamCore(Core):
    """Adam: first and second moments in the storage, bias correction from the core's own update count
    (`adam_step`, restarted when the moments are reset)."""

    name = "adam"
    supports_rotation = True
    has_second_moment = True
    moment_keys = (FIRST, SECOND)
    counter_keys = ("adam_step",)

    def __init__(self, options, policy):
        super().__init__(options, policy)
        self.convention = ADAM_CONVENTIONS[options.adam_convention]

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        return self.policy.for_shape(shape).name in ("fp32", "bf16")  # quantization blocks must not move

    def _storage(self, shape) -> Storage:
        return self.policy.for_shape(tuple(shape))

    def fusable(self, shape: torch.Size) -> bool:
        """Whether the fused kernels keep the moments of a core gradient of this shape: all but a rank-1 int4
        second moment of a matrix (its scales need the whole matrix)."""
        storage = self._storage(shape)
        return not (isinstance(storage, QuantizedStorage) and storage.rank1 and len(shape) == 2)

    def _count(self, grad: torch.Tensor, state: dict) -> Storage:
        """The moments' storage, with the moments created (and the count restarted) when missing; counts the update."""
        storage = self._storage(grad.shape)
        if not storage.holds(state, FIRST, grad.shape):
            storage.zeros(state, FIRST, grad.shape, grad.device, "signed")
            storage.zeros(state, SECOND, grad.shape, grad.device, "unsigned")
            state["adam_step"] = 0
        state["adam_step"] += 1
        return storage

    def step(self, grad, state, group, ctx):
        storage = self._count(grad, state)
        beta1, beta2 = group["betas"]
        if ctx.fused and self.fusable(grad.shape):
            from lowmem.kernels.adam import adam_direction  # lazily: kernel modules import Triton

            direction = adam_direction(grad, kernel_moments(state, storage), state["adam_step"], beta1, beta2,
                                       group["eps"], self.convention.eps_scaled, ctx.clip)
            return CoreStep(direction, bias_correction(state["adam_step"], beta1, beta2))
        if self._cpu_kernel(storage, grad):
            from lowmem.kernels import cpu_adam

            direction = cpu_adam.adam_direction(grad, cpu_moments(state), cpu_tables(storage.bits), storage.bits,
                                                state["adam_step"], beta1, beta2, group["eps"],
                                                self.convention.eps_scaled)
            return CoreStep(direction, bias_correction(state["adam_step"], beta1, beta2))
        exp_avg = storage.read(state, FIRST, grad.shape, "signed")
        exp_avg_sq = storage.read(state, SECOND, grad.shape, "unsigned")
        direction = adam_math(grad, exp_avg, exp_avg_sq, state["adam_step"], beta1, beta2, group["eps"],
                              self.convention.eps_scaled)
        storage.write(state, FIRST, exp_avg, "signed")
        storage.write(state, SECOND, exp_avg_sq, "unsigned")
        return CoreStep(direction, bias_correction(state["adam_step"], beta1, beta2))

    def reset_moments(self, state, shape):
        if FIRST in state:
            storage = self._storage(shape)
            storage.zeros(state, FIRST, shape, state[FIRST].device, "signed")
            storage.zeros(state, SECOND, shape, state[SECOND].device, "unsigned")

    def second_moment(self, state, shape):
        return self._storage(shape).read(state, SECOND, shape, "unsigned") if FIRST in state else None

    def fused_update(self, weight, grad, state, group, decay, lr_scale=1.0, clip=None):
        if not self.fusable(grad.shape):
            return False
        from lowmem.kernels.adam import adam_update

        storage = self._count(grad, state)
        beta1, beta2 = group["betas"]
        adam_update(weight, grad, kernel_moments(state, storage), state["adam_step"], group["lr"] * lr_scale, beta1,
                    beta2, group["eps"], self.convention.eps_scaled, decay, self.convention.decay_after, clip=clip)
        return True

    def _cpu_kernel(self, storage: Storage, grad: torch.Tensor) -> bool:
        """Whether quantized moments of this gradient step in the CPU kernel: kernels auto, fp32 gradients on the
        CPU, block-normalized moments (not the rank-1 int4 second moment), where the kernel builds."""
        if (self.options.kernels != "auto" or grad.device.type != "cpu" or grad.dtype != torch.float32
                or not isinstance(storage, QuantizedStorage) or storage._rank1(grad.shape, "unsigned")):
            return False
        from lowmem.kernels import cpu_adam

        return cpu_adam.available()

    def cpu_update(self, weight, grad, state, group, decay):
        storage = self._storage(grad.shape)
        if not (weight.is_contiguous() and self._cpu_kernel(storage, grad)):
            return False
        from lowmem.kernels import cpu_adam

        storage = self._count(grad, state)
        beta1, beta2 = group["betas"]
        cpu_adam.adam_update(weight, grad, cpu_moments(state), cpu_tables(storage.bits), storage.bits,
                             state["adam_step"], group["lr"], beta1, beta2, group["eps"], self.convention.eps_scaled,
                             decay, self.convention.decay_after)
        return True

    def fuses_clip(self, shape):
        return self.fusable(shape)

    def holds_moments(self, state):
        return FIRST in state

    def rotate(self, state, rotation, shape):
        """Express the moments in a new basis, C = P_new^T P_old: M <- C M exactly, V <- (C*C) V, which is
        exact when the old coordinates are uncorrelated, stays non-negative, and keeps V when the basis
        does not change. Quantized moments are dequantized, rotated and requantized."""
        if FIRST not in state:
            return
        storage = self._storage(shape)
        exp_avg = storage.read(state, FIRST, shape, "signed")
        exp_avg_sq = storage.read(state, SECOND, shape, "unsigned")
        storage.write(state, FIRST, rotation @ exp_avg, "signed")
        storage.write(state, SECOND, (rotation * rotation) @ exp_avg_sq, "unsigned")

    def state_parts(self, shape):
        return moment_parts(self._storage(shape), tuple(shape), [("moments", "signed"), ("moments", "unsigned")])


CORES: dict[str, type[Core]] = {"adam": AdamCore}


def register_core(name: str) -> Callable[[type[Core]], type[Core]]:
    def decorate(cls: type[Core]) -> type[Core]:
        CORES[name] = cls
        return cls

    return decorate


# ---------------------------------------------------------------------------------------------------------
# What happens to the core state when the projector's basis changes.


class MomentsPolicy:
    needs_bases = False

    def __call__(self, core: Core, state: dict, old_basis: Optional[torch.Tensor], new_basis: Optional[torch.Tensor],
                 core_shape: torch.Size) -> None:
        raise NotImplementedError


class KeepMoments(MomentsPolicy):
    """GaLore: keep the state as it is, though it is expressed in the old basis."""

    def __call__(self, core, state, old_basis, new_basis, core_shape):
        pass


class ResetMoments(MomentsPolicy):
    """FRUGAL: forget the state and restart the bias correction."""

    def __call__(self, core, state, old_basis, new_basis, core_shape):
        core.reset(state)


class RotateMoments(MomentsPolicy):
    """Rotate the moments into the new basis (AdamCore.rotate)."""

    needs_bases = True

    def __call__(self, core, state, old_basis, new_basis, core_shape):
        if old_basis is not None:
            core.rotate(state, new_basis.T @ old_basis, core_shape)


MOMENT_POLICIES: dict[str, MomentsPolicy] = {
    "keep": KeepMoments(),
    "reset": ResetMoments(),
    "rotate": RotateMoments(),
}
