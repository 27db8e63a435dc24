"""cvxpy oracles for the finite problems (STYLE.md: ``cp.rel_entr``, Clarabel, status asserted).

They are the independent computations the closed forms are tested against, and the certified primal
where the problem is convex: LU (every variant), and FU when every forget distribution is a point
mass (then ``KL(delta_a||p) = -log p(a) >= b`` is the linear constraint ``p(a) <= exp(-b)``).
Never on ``theory.discrete.solve``'s default path when the KKT conditions certify.
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
from scipy.special import xlogy

from theory.discrete import DEFAULT_VARIANT, _g_values

__all__ = ["OracleResult", "is_point_mass", "likelihood_primal", "forward_kl_point_mass_primal",
           "lagrangian_minimum"]


@dataclass(frozen=True)
class OracleResult:
    """``value`` the optimum, ``p`` the minimiser (n,), ``duals`` the constraint multipliers (m,)."""

    value: float
    p: np.ndarray
    duals: np.ndarray


def _solve(prob: cp.Problem, what: str):
    prob.solve(solver=cp.CLARABEL)
    if prob.status != cp.OPTIMAL:
        raise RuntimeError(f"cvxpy oracle for {what} ended with status {prob.status}")
    return prob.value


def _full(q, ps):
    p = np.zeros_like(q)
    p[q > 0] = np.maximum(ps, 0.0)
    return p / p.sum()


def is_point_mass(forget) -> bool:
    """True when every row of forget is a point mass (FU's data-unlearning case)."""
    forget = np.atleast_2d(forget)
    return bool(np.all(np.sum(forget > 0, axis=1) == 1))


def likelihood_primal(q, forget, budgets, variant=DEFAULT_VARIANT) -> OracleResult:
    """LU's primal ``min sum rel_entr(p, q) s.t. G p <= b, sum p = 1`` on supp q; duals are lam*."""
    q = np.asarray(q, float)
    on = q > 0
    G = _g_values(q, np.atleast_2d(forget), variant)[:, on]
    p = cp.Variable(int(on.sum()), nonneg=True)
    cons = [G @ p <= np.asarray(budgets, float), cp.sum(p) == 1]
    val = _solve(cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(p, q[on]))), cons), "likelihood primal")
    return OracleResult(float(val), _full(q, p.value), np.asarray(cons[0].dual_value, float).reshape(-1))


def forward_kl_point_mass_primal(q, forget, budgets) -> OracleResult:
    """FU with point-mass forget distributions: ``min sum rel_entr(q, p) s.t. p(a_i) <= exp(-b_i)``."""
    q = np.asarray(q, float)
    forget = np.atleast_2d(np.asarray(forget, float))
    if not is_point_mass(forget):
        raise ValueError(f"forward_kl: the convex FU oracle needs point-mass forget rows, got {forget}")
    on = q > 0
    atoms = [int(np.flatnonzero(row)[0]) for row in forget]
    pos = {x: j for j, x in enumerate(np.flatnonzero(on))}
    p = cp.Variable(int(on.sum()), nonneg=True)
    cons = [cp.hstack([p[pos[a]] for a in atoms]) <= np.exp(-np.asarray(budgets, float)), cp.sum(p) == 1]
    val = _solve(cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(q[on], p))), cons), "forward_kl point-mass primal")
    # d/dp(a) of -log p(a) gives the KL-constraint multiplier lam_i = nu_i p(a_i)
    nu = np.asarray(cons[0].dual_value, float).reshape(-1)
    lam = nu * np.array([p.value[pos[a]] for a in atoms])
    return OracleResult(float(val), _full(q, p.value), lam)


def lagrangian_minimum(problem, q, forget, lam, budgets, variant=DEFAULT_VARIANT) -> OracleResult:
    """``min_p L(p, lam)`` by cvxpy, i.e. D(lam), with its minimiser (the target at lam):

    * RU: ``(1 - Lam) sum p log p + f·p`` (Lam < 1, convex) or ``f·p`` (Lam >= 1, an LP),
      ``f = -log q + sum lam_i log q_i``;
    * FU: ``sum rel_entr(w, p)`` with ``w = q - sum lam_i q_i >= 0``;
    * LU: ``sum rel_entr(p, q) + (lam·g)·p``.
    """
    q = np.asarray(q, float)
    forget = np.atleast_2d(np.asarray(forget, float))
    lam = np.asarray(lam, float)
    b = np.asarray(budgets, float)
    on = q > 0
    s = int(on.sum())
    p = cp.Variable(s, nonneg=True)
    Lam = float(lam.sum())
    if problem == "reverse_kl":
        f = -np.log(q[on]) + lam @ np.log(forget[:, on])
        obj = f @ p
        if Lam < 1.0:
            obj = (1.0 - Lam) * cp.sum(cp.rel_entr(p, np.ones(s))) + obj
        val = _solve(cp.Problem(cp.Minimize(obj), [cp.sum(p) == 1]), "reverse_kl Lagrangian") + float(lam @ b)
    elif problem == "forward_kl":
        w = q[on] - lam @ forget[:, on]
        if np.any(w < 0) or Lam >= 1:
            raise ValueError(f"forward_kl: lam = {lam} is outside the dual domain")
        const = (float(np.sum(xlogy(q, q))) - float(lam @ np.sum(xlogy(forget, forget), axis=1))
                 - float(np.sum(xlogy(w, w))) + float(lam @ b))
        val = _solve(cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(w, p))), [cp.sum(p) == 1]),
                     "forward_kl Lagrangian") + const
    else:
        G = _g_values(q, forget, variant)[:, on]
        obj = cp.sum(cp.rel_entr(p, q[on])) + (lam @ G) @ p
        val = _solve(cp.Problem(cp.Minimize(obj), [cp.sum(p) == 1]), "likelihood Lagrangian") - float(lam @ b)
    return OracleResult(float(val), _full(q, p.value), lam.copy())
