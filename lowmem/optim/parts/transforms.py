"""Gradient transforms: parts that act on a weight's gradient in front of any projector and core (SPAM,
Stable-SPAM, GradientStabilizer). `optimizer.transforms: [...]` lists them; `spam` and `stable_spam` name
the papers' combinations.

    adaclip               Stable-SPAM's AdaClip: T = EMA_gamma3(max|g|) / (1 - gamma3^k); entries with |g| > T
                          are rescaled to g / max|g| * T (signs kept). One fp32 scalar of state.
    adagn                 Stable-SPAM's AdaGN: m = EMA_gamma1(||g||), v = EMA_gamma2(||g||^2), bias-corrected;
                          g <- g / ||g|| * m_hat / (sqrt(v_hat) + eps). Two fp32 scalars.
    grad_norm_stabilizer  GradientStabilizer, the authors' re-release: AdaGN alone (its preset: gamma1 0.6,
                          gamma2 0.999), no clipping, no reset. Two fp32 scalars.
    moment_reset          SPAM's momentum reset (MoRet): the core's moments are zeroed every reset_interval updates
                          (at updates t = k * reset_interval, 1-based), optionally followed by SPAM's cosine lr
                          warm-up over reset_warmup updates (update scale 0.01 -> 1).
    spam_clip             SPAM's spike clipping against the core's second moment V (before this update, not
                          bias-corrected): entries with g^2 > theta * V become sign(g) sqrt(theta * V); not during
                          the first spam_clip_delay updates of each reset window (nor of training). It acts on the
                          core gradient (the projected one under a projector), where V lives.

adaclip, adagn and grad_norm_stabilizer act on the whole gradient before projection (matrix statistics: max,
norm), so a residual (Fira, FRUGAL) sees the stabilized gradient too. Their bias corrections count this
weight's updates.

The reference code's quirks, each an option (defaults in brackets, and why):
- `reset_with_old_moments` [false]: Stable-SPAM's code zeroes the stored moments on a reset step but updates
  with the old ones and bias corrections for step 1 (about 0.3x the normal step size), the zeros taking
  effect the update after. The default is the reset the paper describes: fresh moments on the reset step.
- `transform_steps_follow_reset` [false]: in Stable-SPAM's code the AdaClip/AdaGN bias corrections share the
  step counter the reset restarts, so after each reset their EMAs, which were not reset, are divided by
  1 - gamma^2 again (the thresholds jump). The default counts each transform's own updates, as its EMA does.
- `anneal_steps` [null]: Stable-SPAM's code (total_T, CLI default 20000) anneals beta1 and gamma1 by a cosine
  factor from 1 to anneal_min (0.5) over anneal_steps; the paper does not describe it, so it is off.
- `reset_bias_correction` [true]: Stable-SPAM restarts Adam's bias correction at a reset; SPAM's code does not
  (its step counter runs on, so the first updates after a reset are tiny, together with its warm-up). The
  `spam` preset sets false, as its code.
- SPAM's post-reset warm-up is `reset_warmup` (spam preset 150); Stable-SPAM has none (0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lowmem.errors import ConfigError, closest

SCALAR_BYTES = 4  # one fp32 scalar tensor
SPAM_WARMUP_START = 0.99  # SPAM's CosineDecay(0.99, warmup): the update scale starts at 1 - 0.99


@dataclass
class TransformStep:
    """What this update means for the transforms: its 1-based number, the annealing factor, whether the core
    state is reset, and the scale of the update (SPAM's warm-up)."""

    number: int
    anneal: float = 1.0
    resets: bool = False
    lr_scale: float = 1.0
    clips: bool = False


class Transform:
    name = ""
    stage = "gradient"  # gradient: on the whole gradient before projection; core: on the core gradient
    needs_second_moment = False
    fusable = False  # a core-stage part the fused Adam kernels apply themselves (SPAM's clip against V)
    # Whether each element's result depends on that element alone (and on its own moments), so ZeRO may run it
    # on any fragment: not for a statistic of the whole tensor (a max, a norm).
    elementwise = False

    def __init__(self, options):
        self.options = options

    def apply(self, grad: torch.Tensor, state: dict, step: TransformStep, **core) -> torch.Tensor:
        """Transform `grad` (fp32, the caller's own copy: may be changed in place) and return it."""
        return grad

    def state_bytes(self) -> int:
        return 0


class AdaClip(Transform):
    name = "adaclip"

    def apply(self, grad, state, step, **core):
        gamma = self.options.gamma3
        k = state["transform_step"]
        peak = grad.abs().max()
        state["adaclip_max"] = state.get("adaclip_max", torch.zeros((), device=grad.device)) * gamma + (1 - gamma) * peak
        threshold = state["adaclip_max"] / (1 - gamma ** k)
        over = grad.abs() > threshold
        return torch.where(over, grad / peak * threshold, grad)

    def state_bytes(self):
        return SCALAR_BYTES


class NormRescale(Transform):
    """AdaGN: rescale the gradient to the bias-corrected EMA of its norm over the root of the EMA of its
    squared norm (gamma1 annealed by the step's factor)."""

    name = "adagn"
    prefix = "adagn"

    def apply(self, grad, state, step, **core):
        g1 = self.options.gamma1 * step.anneal
        g2 = self.options.gamma2
        k = state["transform_step"]
        norm = grad.norm()
        zero = torch.zeros((), device=grad.device)
        mean = state.get(f"{self.prefix}_mean", zero) * g1 + (1 - g1) * norm
        square = state.get(f"{self.prefix}_square", zero) * g2 + (1 - g2) * norm * norm
        state[f"{self.prefix}_mean"], state[f"{self.prefix}_square"] = mean, square
        target = (mean / (1 - g1 ** k)) / (torch.sqrt(square / (1 - g2 ** k)) + self.options.eps)
        return torch.where(norm > 0, grad / norm * target, grad)

    def state_bytes(self):
        return 2 * SCALAR_BYTES


class GradNormStabilizer(NormRescale):
    name = "grad_norm_stabilizer"
    prefix = "gns"


class MomentReset(Transform):
    elementwise = True  # zeroes every element's moments on the same update
    """Marks the reset steps; the pipeline resets the core (TransformChain.before_core / after_core)."""

    name = "moment_reset"


class SpamClip(Transform):
    elementwise = True  # each entry against its own second moment
    name = "spam_clip"
    stage = "core"
    needs_second_moment = True
    fusable = True  # element-wise against V: lowmem.kernels.adam clips in its pass (CoreContext.clip)

    def apply(self, grad, state, step, second_moment: Optional[torch.Tensor] = None, **core):
        if not step.clips or second_moment is None:
            return grad
        limit = second_moment * self.options.spam_theta
        return torch.where(grad * grad > limit, torch.sign(grad) * limit.sqrt(), grad)


TRANSFORMS: dict[str, type[Transform]] = {cls.name: cls for cls in (AdaClip, NormRescale, GradNormStabilizer,
                                                                     MomentReset, SpamClip)}
COMPOSITES: dict[str, list[str]] = {"spam": ["moment_reset", "spam_clip"],
                                    "stable_spam": ["adaclip", "adagn", "moment_reset"]}


def expand(names: list[str]) -> list[str]:
    """The transform names with composites (spam, stable_spam) expanded; unknown or repeated names fail."""
    out: list[str] = []
    for name in names:
        if name not in TRANSFORMS and name not in COMPOSITES:
            choices = [*TRANSFORMS, *COMPOSITES]
            raise ConfigError(f"optimizer.transforms: unknown transform '{name}'{closest(str(name), choices)}; "
                              f"choose from {sorted(choices)}")
        for part in COMPOSITES.get(name, [name]):
            if part in out:
                raise ConfigError(f"optimizer.transforms: '{part}' is listed twice (in {names})")
            out.append(part)
    return out


class TransformChain:
    """The transforms of one optimizer, applied by the pipeline around projection and core."""

    def __init__(self, options):
        self.options = options
        self.parts = [TRANSFORMS[name](options) for name in expand(list(options.transforms))]
        self.gradient_parts = [t for t in self.parts if t.stage == "gradient"]
        self.core_parts = [t for t in self.parts if t.stage == "core"]
        self.resets = any(isinstance(t, MomentReset) for t in self.parts)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        return all(part.elementwise for part in self.parts)

    @property
    def sync_refusal(self) -> str | None:
        """The projected-sync path steps the core on an all-reduced R with no transform around it."""
        return "its transforms read the whole gradient's max and norm" if self.parts else None

    def cost(self, shape: tuple[int, ...], core_shape: tuple[int, ...]) -> float:
        return 4.0 * len(self.parts) * math.prod(shape)

    def prepare(self, state: dict, number: int) -> TransformStep:
        """The step of update `number` (1-based, shared by all weights); counts this weight's transform step."""
        o = self.options
        state["transform_step"] = state.get("transform_step", 0) + 1
        step = TransformStep(number)
        if o.anneal_steps:  # Stable-SPAM's total_T: cosine from 1 to anneal_min over anneal_steps + 1 updates
            progress = min(number, o.anneal_steps + 1) / (o.anneal_steps + 1)
            step.anneal = o.anneal_min + (1 - o.anneal_min) * (1 + math.cos(math.pi * progress)) / 2
        if self.resets:
            window = number % o.reset_interval
            step.resets = window == 0
            if o.reset_warmup and number >= o.reset_interval and window < o.reset_warmup:
                # SPAM's CosineDecay(0.99, W) over W + 1 updates, from the reset update on
                step.lr_scale = 1 - SPAM_WARMUP_START * (1 + math.cos(math.pi * window / (o.reset_warmup + 1))) / 2
        delay = o.spam_clip_delay
        step.clips = number >= delay and (not self.resets or number % o.reset_interval >= delay)
        return step

    def on_gradient(self, grad: torch.Tensor, state: dict, step: TransformStep) -> torch.Tensor:
        for part in self.gradient_parts:
            grad = part.apply(grad, state, step)
        return grad

    def group(self, group: dict, step: TransformStep) -> dict:
        """The hyper-parameters of this update: beta1 annealed with gamma1 (Stable-SPAM's total_T)."""
        if step.anneal == 1.0:
            return group
        beta1, beta2 = group["betas"]
        return {**group, "betas": (beta1 * step.anneal, beta2)}

    def before_core(self, core_grad: torch.Tensor, state: dict, core, step: TransformStep) -> torch.Tensor:
        self.reset_before_core(state, core, step, core_grad.shape)
        if self.core_parts:
            second = core.second_moment(state, core_grad.shape)
            for part in self.core_parts:
                core_grad = part.apply(core_grad, state, step, second_moment=second)
        return core_grad

    def reset_before_core(self, state: dict, core, step: TransformStep, core_shape: torch.Size) -> None:
        """The moment reset of a reset update (before_core's first half)."""
        if step.resets:
            if self.options.reset_with_old_moments:  # the code's quirk: this update runs as a first step
                core.restart_count(state)
            else:
                core.reset_moments(state, core_shape)
                if self.options.reset_bias_correction:
                    core.restart_count(state)

    @property
    def core_parts_fusable(self) -> bool:
        """Whether every core-stage part is one a fused kernel applies (before_fused_core)."""
        return all(part.fusable for part in self.core_parts)

    def before_fused_core(self, state: dict, core, step: TransformStep, core_shape: torch.Size) -> Optional[float]:
        """before_core for a core whose fused kernel clips (core.fuses_clip): the reset, then SPAM's theta when
        the clip applies to this update (None: no clipping), as SpamClip.apply decides it."""
        self.reset_before_core(state, core, step, core_shape)
        if self.core_parts and step.clips and core.holds_moments(state):
            return self.options.spam_theta
        return None

    def after_core(self, state: dict, core, step: TransformStep, core_shape: torch.Size) -> None:
        if step.resets and self.options.reset_with_old_moments:
            core.reset_moments(state, core_shape)  # the zeros the code stores, used from the next update
        if step.resets and self.options.transform_steps_follow_reset:
            state["transform_step"] = 1

    def state_bytes(self) -> int:
        return sum(part.state_bytes() for part in self.parts)


def validate_transforms(options) -> None:
    """Config-time checks of `optimizer.transforms` against the chosen core and the transform options."""
    from lowmem.optim.parts.cores import CORES

    names = expand(list(options.transforms))
    for name in names:
        if TRANSFORMS[name].needs_second_moment and not CORES[options.core].has_second_moment:
            raise ConfigError(f"optimizer.transforms: '{name}' clips against the core's second moment, and core "
                              f"'{options.core}' keeps none (use core adam or adafactor)")
    for key in ("gamma1", "gamma2", "gamma3"):
        value = getattr(options, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optimizer.{key}: must be in [0, 1), got {value}")
    if "moment_reset" in names and options.reset_interval < 1:
        raise ConfigError(f"optimizer.reset_interval: moment_reset needs a positive interval, "
                          f"got {options.reset_interval}")
    for key in ("spam_theta",):
        if getattr(options, key) <= 0:
            raise ConfigError(f"optimizer.{key}: must be positive, got {getattr(options, key)}")
    for key in ("reset_warmup", "spam_clip_delay"):
        if getattr(options, key) < 0:
            raise ConfigError(f"optimizer.{key}: must be >= 0, got {getattr(options, key)}")
    if options.anneal_steps is not None and options.anneal_steps < 1:
        raise ConfigError(f"optimizer.anneal_steps: must be at least 1 (or null), got {options.anneal_steps}")
    if not 0.0 <= options.anneal_min <= 1.0:
        raise ConfigError(f"optimizer.anneal_min: must be in [0, 1], got {options.anneal_min}")
