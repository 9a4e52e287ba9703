"""The projection presets, registered by name. Defaults are each paper's; YAML may override any part.

    galore: svd + Adam (GaLore convention) + drop        rank 128, update_gap 200, scale 0.25, eps 1e-6, keep
    fira:   galore + Fira's scaled, norm-limited residual (gamma 1.01, paper variant by default;
            fira_variant: code reproduces Fira's released code and its published tables)
    frugal: blocks (density 0.25) + AdamW (torch convention) + signSGD residual, reset, eps 1e-8, lr 1e-3;
            with projector svd/random/coordinates the rank is round(density * smaller side) unless set
    osd:    online PCA (P by AdamW, lr 1/update_gap x the schedule factor) + Adam + drop, keep
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowmem.optim.projected import ProjectedAdam
from lowmem.optim.projection_options import ProjectionOptions
from lowmem.optim.registry import register_optimizer


@dataclass
class GaloreOptions(ProjectionOptions):
    name: str = "galore"


@dataclass
class FiraOptions(ProjectionOptions):
    """Fira: GaLore plus the scaled, norm-limited residual (lowmem.optim.residuals.FiraResidual).

    Where Fira's paper and its released code differ, the default `fira_variant: paper` follows the paper
    (Alg. 1: residual (I - P P^T) G, bias-corrected N in phi and in the limiter, alpha on P N + S).
    To reproduce Fira's published tables use `fira_variant: code`, which follows the released code:
    residual G - alpha P R, phi and the limiter on the un-bias-corrected N = M / (sqrt(V) + eps), and the
    bias correction applied to S after limiting, no alpha on S.
    """

    name: str = "fira"
    residual: str = "fira"


@dataclass
class FrugalOptions(ProjectionOptions):
    name: str = "frugal"
    lr: float = 1e-3
    eps: float = 1e-8
    projector: str = "blocks"
    rank: Optional[int] = None
    density: Optional[float] = 0.25
    scale: float = 1.0  # FRUGAL's proj_params_lr_scale
    moments_on_refresh: str = "reset"
    adam_convention: str = "torch"
    residual: str = "sign_sgd"


@dataclass
class OSDOptions(ProjectionOptions):
    name: str = "osd"
    projector: str = "online_pca"


def _build(groups: list[dict], options: ProjectionOptions) -> torch.optim.Optimizer:
    return ProjectedAdam(groups, options)


for _name, _options in (("galore", GaloreOptions), ("fira", FiraOptions), ("frugal", FrugalOptions),
                        ("osd", OSDOptions)):
    register_optimizer(_name, _options)(_build)
