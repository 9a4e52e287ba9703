"""The pipeline presets, registered by name. Defaults are each paper's; YAML may override any part.

    galore:    svd + Adam (GaLore convention) + drop     rank round(density 0.25 x smaller side), update_gap
               200, scale 0.25, eps 1e-6, moments kept
    fira:      galore + Fira's scaled, norm-limited residual (gamma 1.01), as Fira's released code computes it
               (fira_variant: code, what produced its tables; fira_variant: paper follows its Alg. 1)
    frugal:    blocks (density 0.25) + AdamW (torch convention) + signSGD residual, every block's state reset at
               each refresh, eps 1e-8, lr 1e-3; with projector svd/random/coordinates the rank is
               round(density * smaller side) unless set
    osd:       online PCA (P by AdamW, lr 1/update_gap x the schedule factor) + Adam + drop, moments kept
    adamw8bit: no projection + AdamW (torch convention) with int8 moments (blocks of 256, dynamic map)
    adamw4bit: no projection + AdamW with int4 moments (blocks of 128, zero-free map for the second moment)
    adafactor: no projection + Adafactor as its paper sets it: relative step min(1e-2, 1/sqrt(t)), parameter
               scaling, no first moment, update clipping 1, beta2_t = 1 - t^-0.8 (optimizer.lr unset)
    microadam: no projection + MicroAdam: window of 10 top-1% sparse gradients, 4-bit error feedback
    spam:      no projection + Adam (GaLore's convention, as SPAM's code: eps 1e-6, decay after) with SPAM's
               momentum reset every 500 updates (bias correction not restarted, cosine warm-up over 150) and
               spike clipping at theta 5000
    stable_spam: no projection + AdamW with AdaClip (gamma3 0.999), AdaGN (gamma1 0.7, gamma2 0.9) and a moment
               reset every 500 updates: the paper's 4-bit setting (configs/optimizers/stable_spam_bf16.yaml: BF16)
    grad_norm_stabilizer: no projection + AdamW with AdaGN alone (gamma1 0.6, gamma2 0.999): GradientStabilizer
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from lowmem.optim.pipeline import PipelineOptimizer
from lowmem.optim.pipeline_options import NO_PROJECTOR, PipelineOptions
from lowmem.optim.registry import register_optimizer


@dataclass
class GaloreOptions(PipelineOptions):
    name: str = "galore"


@dataclass
class FiraOptions(PipelineOptions):
    """Fira: GaLore plus the scaled, norm-limited residual (lowmem.optim.parts.residuals.FiraResidual).

    The default `fira_variant: code` is Fira's released code, which produced its published tables and for
    which its lr 0.01 and scale 0.25 were tuned: residual G - alpha P R, phi and the limiter on the
    un-bias-corrected N = M / (sqrt(V) + eps), the bias correction applied to S after limiting, no alpha on
    S. `fira_variant: paper` follows the paper's Alg. 1 (residual (I - P P^T) G, bias-corrected N, alpha on
    P N + S): with scale 0.25 its out-of-subspace step is 4x smaller.
    """

    name: str = "fira"
    residual: str = "fira"
    fira_variant: str = "code"


@dataclass
class FrugalOptions(PipelineOptions):
    name: str = "frugal"
    lr: Optional[float] = 1e-3
    eps: float = 1e-8
    projector: str = "blocks"
    scale: float = 1.0  # FRUGAL's proj_params_lr_scale
    moments_on_refresh: str = "reset"
    adam_convention: str = "torch"
    residual: str = "sign_sgd"


@dataclass
class OSDOptions(PipelineOptions):
    name: str = "osd"
    projector: str = "online_pca"


@dataclass
class DenseOptions(PipelineOptions):
    """Every weight on the dense path (no projector), torch's AdamW conventions."""

    lr: Optional[float] = 1e-3
    eps: float = 1e-8
    projector: str = NO_PROJECTOR
    scale: float = 1.0
    adam_convention: str = "torch"


@dataclass
class AdamW8bitOptions(DenseOptions):
    name: str = "adamw8bit"
    state_dtype: str = "int8"


@dataclass
class AdamW4bitOptions(DenseOptions):
    name: str = "adamw4bit"
    state_dtype: str = "int4"


@dataclass
class AdafactorOptions(DenseOptions):
    name: str = "adafactor"
    lr: Optional[float] = None
    core: str = "adafactor"
    betas: tuple[float, float] = (0.0, 0.999)  # beta1 0: no first moment (beta2 follows 1 - t^decay_rate)
    relative_step: bool = True
    scale_parameter: bool = True


@dataclass
class MicroAdamOptions(DenseOptions):
    name: str = "microadam"
    core: str = "microadam"


@dataclass
class SpamOptions(DenseOptions):
    name: str = "spam"
    eps: float = 1e-6
    adam_convention: str = "galore"
    transforms: list[str] = field(default_factory=lambda: ["spam"])
    reset_warmup: int = 150
    reset_bias_correction: bool = False


@dataclass
class StableSpamOptions(DenseOptions):
    name: str = "stable_spam"
    transforms: list[str] = field(default_factory=lambda: ["stable_spam"])


@dataclass
class GradNormStabilizerOptions(DenseOptions):
    name: str = "grad_norm_stabilizer"
    transforms: list[str] = field(default_factory=lambda: ["grad_norm_stabilizer"])
    gamma1: float = 0.6
    gamma2: float = 0.999


def build_pipeline(groups: list[dict], options: PipelineOptions) -> torch.optim.Optimizer:
    return PipelineOptimizer(groups, options)


for _options in (GaloreOptions, FiraOptions, FrugalOptions, OSDOptions, AdamW8bitOptions, AdamW4bitOptions,
                 AdafactorOptions, MicroAdamOptions, SpamOptions, StableSpamOptions, GradNormStabilizerOptions):
    register_optimizer(_options.name, _options)(build_pipeline)
