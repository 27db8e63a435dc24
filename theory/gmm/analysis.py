"""Quantities the figures and the report read off mixture targets: mass left on the
forget mode, how far the retained modes move, budgets that leave equal forget mass, and sweeps of
P*(b), lam*(b) with the fixed-multiplier baselines (ESD, SISS) placed on them.

"Mass on mode k" is ``E_p[r_k(x)]`` with ``r_k`` q's responsibility of component k (a soft
assignment of every point to q's modes); the centroid of mode j under p is
``E_p[r_j x] / E_p[r_j]`` and its shift is measured in q's Mahalanobis metric of that mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import logsumexp

from theory.gmm.mixture import Forget, GaussianMixture
from theory.gmm.quadrature import expectation, grid_for
from theory.gmm.targets import Density, TiltedMixture, constraint_value, objective_value, target


def expect(p: Density, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``E_p[fn(x)]`` by quadrature (d <= 2) for any mixture target."""
    if isinstance(p, TiltedMixture):
        return p.expect(fn)
    g = grid_for(p)
    lp = p.log_prob(g.nodes)
    return expectation(lp - logsumexp(lp + g.log_vol), fn(g.nodes), g)


def responsibilities(q: GaussianMixture, x: ArrayLike) -> np.ndarray:
    """q's responsibilities (N, K) at x."""
    return q.responsibilities(x)


def mode_masses(p: Density, q: GaussianMixture) -> np.ndarray:
    """``E_p[r_k]`` for every component k of q (sums to 1)."""
    return expect(p, lambda x: responsibilities(q, x))


@dataclass(frozen=True)
class ModeShift:
    """Per retained mode j: mass ``E_p[r_j]`` vs q's weight, centroid shift (Euclidean and in q's
    Mahalanobis metric of that mode)."""

    modes: tuple
    mass: np.ndarray
    weight_q: np.ndarray
    shift: np.ndarray
    shift_mahalanobis: np.ndarray


def retained_mode_shift(p: Density, q: GaussianMixture, forget_component: int) -> ModeShift:
    keep = tuple(k for k in range(q.n_components) if k != forget_component)

    def moments(x):  # (N, K + K d): r_k and r_k x
        r = responsibilities(q, x)
        return np.concatenate([r, (r[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)], axis=1)
    r_x = expect(p, moments)
    K, d = q.n_components, q.dim
    mass = r_x[:K]
    cent = r_x[K:].reshape(K, d) / mass[:, None]
    # centroid of mode j under q itself (not exactly mu_j: responsibilities overlap), the reference
    r_q = expect(q, moments)
    cent_q = r_q[K:].reshape(K, d) / r_q[:K, None]
    diff = cent - cent_q
    maha = np.array([np.sqrt(diff[j] @ np.linalg.solve(q.covs[j], diff[j])) for j in range(K)])
    idx = list(keep)
    return ModeShift(keep, mass[idx], r_q[:K][idx], np.linalg.norm(diff, axis=1)[idx], maha[idx])


def lam_for_forget_mass(problem: str, q: GaussianMixture, forget: Forget, mass: float, forget_component: int,
                        lam_hi: float, variant: str = "likelihood", xtol: float = 1e-12) -> float:
    """The multiplier (m = 1) whose target leaves ``mass`` on the forget mode (bracketed root on
    ``[0, lam_hi]``; the forget mass decreases along every problem's path)."""
    def f(lam):
        return mode_masses(target(problem, q, forget, [lam], variant=variant), q)[forget_component] - mass
    return float(brentq(f, 0.0, lam_hi, xtol=xtol))


def esd_lam(eta: float) -> float:
    """ESD's guidance scale eta as an RU multiplier (eq. 8 of ``docs/math.md``): ``lam = eta / (1 + eta)``."""
    return eta / (1.0 + eta)


def sweep(problem: str, q: GaussianMixture, forget: Forget, lams: Iterable[float],
          variant: str = "likelihood") -> tuple[np.ndarray, np.ndarray]:
    """Along the dual path: for each lam the budget b(lam) it certifies (the constraint value of
    its target; then lam* (b) = lam) and the optimal value P*(b) = objective at the target (zero
    gap, checked by ``solve`` in the tests). Returns ``(b, P)`` arrays."""

    b, P = [], []
    for lam in lams:
        p = target(problem, q, forget, [lam], variant=variant)
        b.append(constraint_value(problem, p, forget[0], variant=variant, q=q))
        P.append(objective_value(problem, p, q))
    return np.array(b), np.array(P)
