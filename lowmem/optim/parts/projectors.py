"""Projectors: choose a basis P (b x r, b = the smaller side of a weight) and project gradients onto it.

Every projector works on the *canonical* gradient Gc of shape (b, a), a >= b: Gc = G for a wide weight
(m < n) and Gc = G^T otherwise, so GaLore's "left" and "right" cases are one code path. The core is
P^T Gc (r x a) and the back-projection P core (b x a).

A projector object is a stateless strategy shared by all weights; the per-weight state (basis, seed,
indices, ...) lives in the optimizer's state dict for that weight, as tensors or python scalars, so
`torch.load(weights_only=True)` reads it. `refresh` chooses a new basis (every `update_gap` updates, or
only once for online PCA), `adapt` runs after every update (online PCA's step on P).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

from lowmem.optim.parts.cores import adam_math, fresh_copy

INDEX_BYTES = 8  # int64 indices
RSVD_OVERSAMPLE = 8  # extra columns randomized SVD samples beyond the rank
RSVD_ITERATIONS = 2  # power iterations of randomized SVD


class RefreshKey(NamedTuple):
    """Which weight and which refresh: seeds every random draw. `matrix` is the weight's identity (a hash of
    its parameter name when the optimizer knows names, so regrouping or resharding changes no draw),
    `position` its place among the projected weights in model order (FRUGAL's block order)."""

    seed: int
    matrix: int
    refresh: int
    position: int = 0

    def as_int(self) -> int:
        return (self.seed * 1_000_003 + self.matrix) * 1_000_003 + self.refresh


def canonical(grad: torch.Tensor) -> torch.Tensor:
    """The (b, a) view of a 2-D gradient whose rows are the smaller side (GaLore: right-projection if m >= n)."""
    return grad.T if grad.shape[0] >= grad.shape[1] else grad


def small_side(shape: tuple[int, ...]) -> tuple[int, int]:
    """(b, a): the smaller and the larger side of a 2-D shape."""
    return min(shape), max(shape)


def _generator(key: RefreshKey, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(key.as_int() % (2 ** 63))


def check_finite(grad: torch.Tensor, label: str) -> None:
    """Refuse a non-finite gradient before it reaches an SVD (LAPACK would fail or return garbage)."""
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(f"non-finite (nan/inf) gradient in {label} (shape {'x'.join(map(str, grad.shape))}) "
                                 f"at a projector refresh; lower the learning rate or enable gradient clipping")


def top_singular_basis(grad: torch.Tensor, rank: int, key: RefreshKey, label: str = "a projected weight") -> torch.Tensor:
    """The top-`rank` singular vectors of the smaller side of `grad` (original orientation), fp32, b x r.

    SVD of G as stored, as GaLore does, so singular-vector signs match it. The gradient must be finite
    (FloatingPointError naming `label` otherwise). When LAPACK fails to converge (torch.linalg.LinAlgError
    only: out-of-memory and other errors propagate), retry in float64 on a slightly jittered copy, then fall
    back to randomized SVD; each fallback warns.
    """
    matrix = grad.float()
    check_finite(matrix, label)
    try:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as first:
        warnings.warn(f"SVD of {label} (shape {'x'.join(map(str, matrix.shape))}) failed ({first}); "
                      f"retrying in float64 on a jittered copy", RuntimeWarning, stacklevel=2)
        try:
            jitter = torch.randn(matrix.shape, generator=_generator(key, matrix.device), device=matrix.device)
            scale = 1e-7 * (matrix.norm() / math.sqrt(matrix.numel()) + 1e-30)
            u, _, vh = torch.linalg.svd((matrix + scale * jitter).double(), full_matrices=False)
        except torch.linalg.LinAlgError as second:
            warnings.warn(f"float64 SVD of {label} failed too ({second}); using randomized SVD",
                          RuntimeWarning, stacklevel=2)
            return randomized_singular_basis(matrix, rank, key)
    basis = vh[:rank].T if grad.shape[0] >= grad.shape[1] else u[:, :rank]
    return basis.float()


def _range_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal m x rank basis of the top left singular subspace of `matrix` (m x n), randomized
    (Halko, Martinsson & Tropp): Gaussian sketch, power iterations with re-orthonormalisation, then an
    eigendecomposition of the small q x q Gram matrix of Q^T A in float64 (no LAPACK SVD involved)."""
    q = min(rank + RSVD_OVERSAMPLE, *matrix.shape)
    sketch = torch.randn(matrix.shape[1], q, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(RSVD_ITERATIONS):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small = (basis.T @ matrix).double()
    _, vectors = torch.linalg.eigh(small @ small.T)  # ascending eigenvalues
    top = vectors.flip(-1)[:, :rank].to(matrix.dtype)
    return basis @ top


def randomized_singular_basis(grad: torch.Tensor, rank: int, key: RefreshKey) -> torch.Tensor:
    """Top-`rank` singular vectors of the smaller side by randomized SVD, seeded by `key` through a local
    generator on the matrix's device (the global RNG is neither read nor reseeded)."""
    matrix = grad.float()
    generator = _generator(key, matrix.device)
    if grad.shape[0] >= grad.shape[1]:  # right singular vectors: the left ones of G^T
        return _range_basis(matrix.T, rank, generator)
    return _range_basis(matrix, rank, generator)


class Projector:
    """A basis stored as a dense b x r matrix under state['basis']; subclasses say how it is chosen."""

    periodic = True  # refreshed every update_gap updates; False: chosen once, then adapted every update
    dense_basis = True  # project_back is basis() @ core: the fused epilogue may run that GEMM itself
    shared_refresh = False  # True: refresh numbers come from the optimizer's shared update counter
    resets_state = False  # True: every refresh clears the core state, whatever moments_on_refresh says
    # Why all-reducing R = P^T G instead of G would not be exact with this projector (None: it is, between
    # refreshes); lowmem.distributed.gradient_sync and the config check both read it.
    sync_refusal: Optional[str] = None

    def elementwise(self, shape: tuple[int, ...]) -> bool:
        """A projection mixes the elements of a whole side: never element-wise (ZeRO runs it on one owner)."""
        return False

    def cost(self, shape: tuple[int, ...], core_shape: tuple[int, ...]) -> float:
        """Flops of one update: the projection and the back-projection, and the basis refresh amortized."""
        numel, rows = math.prod(shape), min(shape)
        return 4.0 * numel * core_shape[0] + numel * rows / self.update_gap

    def __init__(self, basis_dtype: torch.dtype = torch.float32, density: float = 1.0, seed: int = 0,
                 num_matrices: int = 1, update_gap: int = 200, block_order: str = "random"):
        self.basis_dtype = basis_dtype
        self.density = density
        self.block_order = block_order
        self.seed = seed
        self.num_matrices = num_matrices
        self.update_gap = update_gap

    def refresh(self, state: dict, grad: torch.Tensor, rank: int, key: RefreshKey,
                label: str = "a projected weight") -> None:
        """Choose a new basis from the gradient `grad` (original orientation); `label` names the weight in errors."""
        state["basis"] = fresh_copy(self.choose_basis(grad, rank, key, label), self.basis_dtype)

    def choose_basis(self, grad: torch.Tensor, rank: int, key: RefreshKey, label: str) -> torch.Tensor:
        raise NotImplementedError

    def basis(self, state: dict, rows: int, device: torch.device) -> torch.Tensor:
        """The current basis as a dense fp32 b x r matrix (rows = b) on `device`."""
        return state["basis"].float()

    def core_rank(self, state: dict, rank: int, shape: tuple[int, ...]) -> int:
        """Rows of the core this weight currently has (its Adam moments are core_rank x a)."""
        return rank

    def is_empty(self, state: dict) -> bool:
        """True when the subspace is empty (an inactive block): the whole gradient is residual."""
        return False

    def is_full(self, state: dict) -> bool:
        """True when the subspace is the whole space (an active block): G - P P^T G = 0."""
        return False

    def project(self, state: dict, grad_c: torch.Tensor) -> torch.Tensor:
        return self.basis(state, grad_c.shape[0], grad_c.device).T @ grad_c

    def project_back(self, state: dict, core: torch.Tensor, rows: int) -> torch.Tensor:
        return self.basis(state, rows, core.device) @ core

    def adapt(self, state: dict, grad_c: torch.Tensor, lr_factor: float,
              core_grad: Optional[torch.Tensor] = None) -> None:
        """Called after every update; only online PCA moves its basis here. `core_grad` is this update's
        P^T Gc with the same basis (None when it was not computed), which spares a projection."""

    def state_bytes(self, shape: tuple[int, ...], rank: int, itemsize: int) -> int:
        """Bytes this projector keeps in one weight's state (itemsize: bytes of a state element)."""
        return small_side(shape)[0] * rank * itemsize


class SVDProjector(Projector):
    """GaLore: top-r singular vectors of the current gradient's smaller side, exact fp32 SVD."""

    def choose_basis(self, grad, rank, key, label):
        return top_singular_basis(grad, rank, key, label)


class RandomizedSVDProjector(Projector):
    """As SVD, by randomized SVD (`randomized_singular_basis`: a Gaussian sketch of r + RSVD_OVERSAMPLE
    columns, RSVD_ITERATIONS power iterations and an eigendecomposition of the small Gram matrix, with no
    LAPACK SVD), seeded from the refresh key; cheaper when r << b."""

    def choose_basis(self, grad, rank, key, label):
        check_finite(grad, label)
        return randomized_singular_basis(grad, rank, key)


class SeededRandomProjector(Projector):
    """A random orthonormal basis regenerated from a stored seed and draw counter; no matrix is stored.

    Gaussian b x r orthonormalised by QR (signs fixed by diag R), so P P^T is a true projection and the
    residual policies see G - P P^T G (APOLLO draws an unnormalised randn/sqrt(r); FRUGAL's random basis
    is orthogonal like ours). Costs one draw and one QR of b x r per update instead of b*r stored elements;
    the last basis built is kept (not as state) so the projections of one update share a single draw.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last: tuple[tuple, torch.Tensor] | None = None

    def refresh(self, state, grad, rank, key, label="a projected weight"):
        state["seed"] = RefreshKey(key.seed, key.matrix, 0).as_int() % (2 ** 62)
        state["draws"] = state.get("draws", 0) + 1
        state["rank"] = rank

    def basis(self, state, rows, device):
        cache_key = (state["seed"], state["draws"], state["rank"], rows, str(device))
        if self._last is not None and self._last[0] == cache_key:
            return self._last[1]
        generator = torch.Generator(device=device).manual_seed(state["seed"] + state["draws"])
        q, r = torch.linalg.qr(torch.randn(rows, state["rank"], generator=generator, device=device))
        q.mul_(torch.where(torch.diagonal(r) < 0, -1.0, 1.0))
        self._last = (cache_key, q)
        return q

    def state_bytes(self, shape, rank, itemsize):
        return 0


class DCTProjector(Projector):
    """SVD-free (DCT-AdamW): the r columns of a fixed orthonormal DCT-II basis Q (size b) whose
    coefficients Q^T Gc have the largest l1-norms. Only the r indices are stored; Q is a constant rebuilt
    on demand (cached per size and device, not optimizer state)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dct: dict[tuple[int, str], torch.Tensor] = {}

    def dct_basis(self, size: int, device: torch.device) -> torch.Tensor:
        cache_key = (size, str(device))
        if cache_key not in self._dct:
            j = torch.arange(size, dtype=torch.float64).unsqueeze(1)
            k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
            q = torch.cos(math.pi * (2 * j + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
            q[:, 0] = math.sqrt(1.0 / size)
            self._dct[cache_key] = q.float().to(device)
        return self._dct[cache_key]

    def refresh(self, state, grad, rank, key, label="a projected weight"):
        grad_c = canonical(grad).float()
        scores = (self.dct_basis(grad_c.shape[0], grad_c.device).T @ grad_c).abs().sum(dim=1)
        state["indices"] = torch.topk(scores, rank).indices.sort().values

    def basis(self, state, rows, device):
        return self.dct_basis(rows, device)[:, state["indices"]]

    def state_bytes(self, shape, rank, itemsize):
        return rank * INDEX_BYTES


class CoordinateProjector(Projector):
    """FRUGAL's coordinates: a random subset of r rows of Gc (r columns of the weight's smaller side).
    Projection is a gather, back-projection a scatter; only the indices are stored."""

    dense_basis = False  # a scatter, cheaper than a GEMM by a 0/1 basis

    def refresh(self, state, grad, rank, key, label="a projected weight"):
        order = torch.randperm(min(grad.shape), generator=_generator(key, torch.device("cpu")))
        state["indices"] = order[:rank].sort().values.to(grad.device)

    def basis(self, state, rows, device):
        return torch.eye(rows, device=device)[:, state["indices"]]

    def project(self, state, grad_c):
        return grad_c[state["indices"]].float()

    def project_back(self, state, core, rows):
        full = torch.zeros(rows, core.shape[1], dtype=core.dtype, device=core.device)
        return full.index_copy_(0, state["indices"], core)

    def state_bytes(self, shape, rank, itemsize):
        return rank * INDEX_BYTES


def block_window(order: str, refresh: int, num_matrices: int, num_active: int,
                 generator: torch.Generator) -> list[int]:
    """Positions (in model order) of the weights active after refresh number `refresh`.

    random: a fresh draw of num_active weights each refresh. ascending / descending: consecutive windows of
    num_active weights, cycling through the model front to back / back to front. mirror: windows over a
    back-and-forth sweep 0, 1, ..., N-1, N-2, ..., 1 (a window that crosses a turn holds fewer distinct
    weights). The cyclic orders follow BAdam's block switching, on which FRUGAL's block optimizer builds."""
    if order == "random":
        return torch.randperm(num_matrices, generator=generator)[:num_active].tolist()
    forward = list(range(num_matrices))
    sweep = {"ascending": forward, "descending": forward[::-1],
             "mirror": forward + forward[-2:0:-1]}[order]
    start = refresh * num_active
    return sorted({sweep[(start + i) % len(sweep)] for i in range(num_active)})


BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


class BlockProjector(Projector):
    """FRUGAL's blocks (its default): whole weights are active (full-rank Adam) or inactive (no moments,
    all of the gradient is residual, no Adam or projection work at all). At each refresh round(density *
    num_matrices) weights are made active in `block_order` (block_window); every weight computes the same
    set from (seed, refresh), so no coordination is needed. `key.refresh` is the optimizer-level refresh
    number (the pipeline keys it on its shared update counter, so a weight that missed a gradient still
    draws the same set as the others); num_matrices counts trainable projected weights only. The flag is a
    python bool in the weight's state. Every refresh clears every weight's core state (FRUGAL's
    reset_statistics), whatever moments_on_refresh says (`resets_state`)."""

    shared_refresh = True  # refreshes follow the optimizer's update counter, not the weight's own count
    sync_refusal = "makes whole weights active, with full gradients"
    resets_state = True
    dense_basis = False  # the subspace is empty or the whole space: no GEMM at all

    def refresh(self, state, grad, rank, key, label="a projected weight"):
        generator = _generator(RefreshKey(key.seed, 0, key.refresh), torch.device("cpu"))
        active = block_window(self.block_order, key.refresh, self.num_matrices, self.num_active, generator)
        state["active"] = key.position in active

    @property
    def num_active(self) -> int:
        return max(1, round(self.density * self.num_matrices))

    def core_rank(self, state, rank, shape):
        return small_side(shape)[0] if state["active"] else 0

    def basis(self, state, rows, device):
        eye = torch.eye(rows, device=device)
        return eye if state["active"] else eye[:, :0]

    def project(self, state, grad_c):
        return grad_c.float() if state["active"] else grad_c[:0].float()

    def project_back(self, state, core, rows):
        if state["active"]:
            return core
        return torch.zeros(rows, core.shape[1], dtype=core.dtype, device=core.device)

    def is_empty(self, state) -> bool:
        return not state["active"]

    def is_full(self, state) -> bool:
        return state["active"]

    def state_bytes(self, shape, rank, itemsize):
        return 0


# Online PCA's optimizer on P, as OSD codes it: torch AdamW defaults with weight decay 0.01.
OSD_BETAS = (0.9, 0.999)
OSD_EPS = 1e-8
OSD_WEIGHT_DECAY = 0.01


class OnlinePCAProjector(Projector):
    """Online Subspace Descent: P starts as the SVD basis, then after every update takes one AdamW step
    on the online-PCA loss ||P P^T X - X||^2 with X = Gc / ||Gc|| (no orthonormality term, P never
    re-orthonormalised: as OSD codes it). The P step uses lr = lr_factor / update_gap, lr_factor being
    the weight lr's schedule factor. The step computed at update t is used from update t+1. State: P and
    its two AdamW moments, b x r each, plus an int step."""

    periodic = False
    sync_refusal = "moves P with the whole gradient every update"

    def choose_basis(self, grad, rank, key, label):
        return top_singular_basis(grad, rank, key, label)

    def refresh(self, state, grad, rank, key, label="a projected weight"):
        super().refresh(state, grad, rank, key, label)
        state["basis_exp_avg"] = torch.zeros_like(state["basis"])
        state["basis_exp_avg_sq"] = torch.zeros_like(state["basis"])
        state["basis_step"] = 0
        state["basis_fresh"] = True  # the first P step follows the update after the one that set it

    def adapt(self, state, grad_c, lr_factor, core_grad=None):
        grad_p = self.basis_gradient(state, grad_c, core_grad)
        if grad_p is None:
            return
        p = state["basis"].float()
        state["basis_step"] += 1
        exp_avg, exp_avg_sq = state["basis_exp_avg"].float(), state["basis_exp_avg_sq"].float()
        direction = adam_math(grad_p, exp_avg, exp_avg_sq, state["basis_step"], OSD_BETAS[0], OSD_BETAS[1], OSD_EPS,
                              eps_scaled=True)
        lr = lr_factor / self.update_gap
        p.mul_(1.0 - lr * OSD_WEIGHT_DECAY).add_(direction, alpha=-lr)
        for key, value in (("basis", p), ("basis_exp_avg", exp_avg), ("basis_exp_avg_sq", exp_avg_sq)):
            if value is not state[key]:  # bf16 storage: the math above ran on fp32 copies
                state[key].copy_(value)

    def basis_gradient(self, state: dict, grad_c: torch.Tensor,
                       core_grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The gradient of the PCA loss in P for this update (what adapt steps P with), or None when P is not
        stepped now (the update that set it by a refresh)."""
        if state.pop("basis_fresh", False):
            return None
        p = state["basis"].float()
        grad_c = grad_c.float()
        inv = 1.0 / (grad_c.norm() + 1e-30)  # X = inv Gc
        core = core_grad if core_grad is not None else p.T @ grad_c  # R = P^T Gc: the core's, when given
        # d/dP ||E||^2 = 2 (E X^T P + X E^T P), E = P P^T X - X. With X^T P = inv R^T it is, exactly,
        # 2 inv^2 (P R R^T + Gc R^T (P^T P - 2 I)): one b x a GEMM, and E is never formed
        gram = p.T @ p
        gram.diagonal().sub_(2.0)
        return (p @ (core @ core.T)).add_(grad_c @ (core.T @ gram)).mul_(2.0 * inv * inv)

    def state_bytes(self, shape, rank, itemsize):
        return 3 * small_side(shape)[0] * rank * itemsize


PROJECTORS: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized_svd": RandomizedSVDProjector,
    "random": SeededRandomProjector,
    "online_pca": OnlinePCAProjector,
    "dct": DCTProjector,
    "coordinates": CoordinateProjector,
    "blocks": BlockProjector,
}
