"""Exact references for the toy runs on 2-D mixtures, computed without networks:

1. **x_0 targets by quadrature** (eqs. 7, 12, 15): on a fine grid, the RU tilt ``q prod (q/q_i)^eta_i``,
   the FU signed mixture ``(q - sum lam_i q_i)/(1 - Lam)`` and the LU Gibbs tilt
   ``q exp(-sum lam_i g_i)``, their constraint values and objectives, the dual solution lam* of a
   single constraint by bisection on the (monotone) constraint value, the achievable range of the
   budget, and samples of the target (grid cell drawn by mass, uniform jitter inside it). This is
   an independent recomputation used to cross-check ``theory.gmm.solve`` and to refuse budgets.
2. **surrogate fixed points** (eqs. 26, 29): RU and LU networks are trained towards noise targets
   that are exact only at t = 0, so a perfect network generates the *surrogate* law, not the x_0
   target. Running the same dual iteration with exact mixture scores in place of networks gives
   the multiplier the learned run converges to; ``surrogate_lam`` finds it by bisection with
   common random numbers. The gap between it and lam* is the surrogate's bias, reported, not hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from theory.gmm import GaussianMixture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """A uniform 2-D grid: cell centres ``points`` (N, 2), cell area ``area``, and its axes."""

    points: np.ndarray
    area: float
    xs: np.ndarray
    ys: np.ndarray


def make_grid(q: GaussianMixture, forget: list[GaussianMixture], pad: float, n: int = 361) -> Grid:
    """A grid covering every component's mean +- ``pad`` (plus 7 standard deviations)."""
    if q.dim != 2:
        raise ValueError(f"quadrature references need d = 2, got d = {q.dim}")
    means = np.concatenate([q.means] + [f.means for f in forget])
    sd = np.sqrt(max(np.linalg.eigvalsh(q.covs).max(), max(np.linalg.eigvalsh(f.covs).max() for f in forget)))
    lo = means.min(0) - pad - 7 * sd
    hi = means.max(0) + pad + 7 * sd
    xs = np.linspace(lo[0], hi[0], n)
    ys = np.linspace(lo[1], hi[1], n)
    X, Y = np.meshgrid(xs, ys, indexing="xy")
    return Grid(np.stack([X.ravel(), Y.ravel()], 1), float((xs[1] - xs[0]) * (ys[1] - ys[0])), xs, ys)


def _spread(q, forget) -> float:
    means = np.concatenate([q.means] + [f.means for f in forget])
    return float(np.ptp(means, axis=0).max())


class Quadrature:
    """x_0 targets of one instance (q, forget) on a grid, for a problem and an LU variant."""

    def __init__(self, problem: str, q: GaussianMixture, forget: list[GaussianMixture],
                 variant: str = "likelihood", n: int = 361, max_eta: float = 3.0):
        self.problem, self.q, self.forget, self.variant = problem, q, list(forget), variant
        pad = max_eta * _spread(q, forget) if problem == "reverse_kl" else 0.0
        self.grid = make_grid(q, forget, pad, n)
        x = self.grid.points
        self.log_q = q.log_prob(x)
        self.log_qi = np.stack([f.log_prob(x) for f in forget])  # (m, N)
        self.log_area = np.log(self.grid.area)

    def g(self) -> np.ndarray:
        """LU constraint functions g_i on the grid (m, N)."""
        if self.variant == "likelihood":
            return np.exp(self.log_qi)
        if self.variant == "likelihood_ratio":
            return np.exp(self.log_qi - self.log_q)
        if self.variant == "log_likelihood":
            return self.log_qi
        raise ValueError(f"unknown LU variant {self.variant!r}")

    def log_target(self, lam: npt.ArrayLike) -> np.ndarray:
        """Normalised log density of the target at multipliers lam on the grid (N,)."""
        lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
        if self.problem == "reverse_kl":
            Lam = lam.sum()
            if Lam >= 1:
                raise ValueError(f"RU tilt needs sum(lam) < 1, got {Lam}")
            eta = lam / (1 - Lam)
            lp = self.log_q + (eta[:, None] * (self.log_q[None] - self.log_qi)).sum(0)
        elif self.problem == "forward_kl":
            dens = np.exp(self.log_q) - (lam[:, None] * np.exp(self.log_qi)).sum(0)
            dens = np.maximum(dens, 0.0)
            with np.errstate(divide="ignore"):
                lp = np.log(dens)
        elif self.problem == "likelihood":
            lp = self.log_q - (lam[:, None] * self.g()).sum(0)
        else:
            raise ValueError(f"unknown problem {self.problem!r}")
        from scipy.special import logsumexp
        return lp - logsumexp(lp + self.log_area)

    def _kl(self, log_a, log_b) -> float:
        a = np.exp(log_a) * self.grid.area
        m = a > 0
        return float(np.sum(a[m] * (log_a[m] - log_b[m])))

    def constraint_values(self, lam: npt.ArrayLike) -> np.ndarray:
        """(m,) KL(p||q_i), KL(q_i||p) or E_p[g_i] at the target for lam."""
        lp = self.log_target(lam)
        if self.problem == "reverse_kl":
            return np.array([self._kl(lp, lqi) for lqi in self.log_qi])
        if self.problem == "forward_kl":
            return np.array([self._kl(lqi, lp) for lqi in self.log_qi])
        return (np.exp(lp) * self.grid.area * self.g()).sum(1)

    def objective(self, lam: npt.ArrayLike) -> float:
        """The retention objective at the target for lam: KL(q||p) (FU), else KL(p||q)."""
        lp = self.log_target(lam)
        return self._kl(self.log_q, lp) if self.problem == "forward_kl" else self._kl(lp, self.log_q)

    def lam_max(self) -> float:
        """Upper end of the (one-constraint) dual domain: RU sum < 1 (1 - 1e-3 used), FU
        ``inf_x q/q_1`` on the grid, LU unbounded (a large value)."""
        if self.problem == "reverse_kl":
            return float(1.0 - 1.0 / (1.0 + 3.0 * 1.0))  # eta <= 3 (the grid's padding)
        if self.problem == "forward_kl":
            import theory.gmm as gmm
            if hasattr(gmm, "min_log_ratio"):  # certified infimum, tails included
                log_ratio = gmm.min_log_ratio(self.q, self.forget[0])
            else:
                log_ratio = float(np.min(self.log_q - self.log_qi[0]))
            # strictly inside the domain: at the end itself the signed mixture vanishes somewhere
            return float(np.exp(log_ratio)) * (1.0 - 1e-9)
        return 1e4

    def achievable_range(self) -> tuple[float, float]:
        """(value at lam = 0, value at the end of the dual domain) of the single constraint: budgets
        beyond the second end cannot be met by any target on the dual path."""
        return float(self.constraint_values([0.0])[0]), float(self.constraint_values([self.lam_max()])[0])

    def solve(self, budget: float, tol: float = 1e-10) -> float:
        """lam* of one constraint: 0 if inactive at lam = 0, else the root of value(lam) = budget."""
        v0, v1 = self.achievable_range()
        lower_is_feasible = self.problem == "likelihood"
        inactive = v0 <= budget if lower_is_feasible else v0 >= budget
        if inactive:
            return 0.0
        if (lower_is_feasible and v1 > budget) or (not lower_is_feasible and v1 < budget):
            raise ValueError(f"budget {budget} outside the achievable range [{min(v0, v1):.6g}, {max(v0, v1):.6g}]")
        lo, hi = 0.0, self.lam_max()
        while hi - lo > tol * max(1.0, hi):
            mid = 0.5 * (lo + hi)
            v = self.constraint_values([mid])[0]
            if (v > budget) == (not lower_is_feasible):
                hi = mid
            else:
                lo = mid
        return 0.5 * (lo + hi)

    def sample(self, lam: npt.ArrayLike, n: int, rng: np.random.Generator) -> np.ndarray:
        """n samples of the target at lam: a cell by its mass, then uniform inside the cell."""
        p = np.exp(self.log_target(lam) + self.log_area)
        idx = rng.choice(p.shape[0], size=n, p=p / p.sum())
        dx = self.grid.xs[1] - self.grid.xs[0]
        dy = self.grid.ys[1] - self.grid.ys[0]
        jitter = (rng.random((n, 2)) - 0.5) * np.array([dx, dy])
        return self.grid.points[idx] + jitter


def surrogate_lam(constraint_at: Callable[[float], float], budget: float, lower_is_feasible: bool, lam_hi: float,
                  iters: int = 14) -> float:
    """Bisection for the multiplier where ``constraint_at(lam)`` (an exact-score estimate with
    common random numbers, monotone in lam) meets ``budget``; 0 if already feasible at lam = 0."""
    v0 = constraint_at(0.0)
    if (v0 <= budget) if lower_is_feasible else (v0 >= budget):
        return 0.0
    lo, hi = 0.0, lam_hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        v = constraint_at(mid)
        if (v > budget) == (not lower_is_feasible):
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
