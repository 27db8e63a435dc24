"""cvxpy oracles for the finite problems (``cp.rel_entr``, Clarabel, status asserted).

They are the independent computations the closed forms are tested against, and the certified primal
where the problem is convex: LU (every variant), and FU when every forget distribution is a point
mass (then ``KL(delta_a||p) = -log p(a) >= b`` is the linear constraint ``p(a) <= exp(-b)``).
Never on ``theory.discrete.solve``'s default path when the KKT conditions certify.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
from numpy.typing import ArrayLike
from scipy.special import xlogy

from theory.discrete.core import DEFAULT_VARIANT, g_values

__all__ = ["OracleResult", "is_point_mass", "likelihood_primal", "forward_kl_point_mass_primal",
           "lagrangian_minimum"]


@dataclass(frozen=True)
class OracleResult:
    """``value`` the optimum, ``p`` the minimiser (n,), ``duals`` the constraint multipliers (m,)."""

    value: float
    p: np.ndarray
    duals: np.ndarray


#: Clarabel at tight tolerances: an oracle must be more accurate than what it checks (at its
#: defaults, 1e-8, multipliers came back 1.2e-5 off on a point-mass FU instance with known lam*). ``fast=True`` uses the defaults (benchmarks).
TIGHT = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8}


def _solve(prob: cp.Problem, what: str, fast: bool = False):
    with warnings.catch_warnings():  # "may be inaccurate": the status is checked below instead
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver=cp.CLARABEL, **({} if fast else TIGHT))
        if prob.status == cp.OPTIMAL_INACCURATE and not fast:  # tight tolerances out of reach: defaults
            prob.solve(solver=cp.CLARABEL)
    if prob.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise ValueError(f"{what}: the budgets are infeasible (cvxpy status {prob.status})")
    if prob.status != cp.OPTIMAL:
        raise RuntimeError(f"cvxpy oracle for {what} ended with status {prob.status}")
    return prob.value


def _full(q, ps):
    p = np.zeros_like(q)
    p[q > 0] = np.maximum(ps, 0.0)
    return p / p.sum()


def _solve_either(p, obj, alt, what, fast):
    """Solve min obj over the simplex; if Clarabel cannot reach OPTIMAL, the equivalent ``alt =
    (objective, constant)`` (the same function, rescaled)."""
    prob = cp.Problem(cp.Minimize(obj), [cp.sum(p) == 1])
    try:
        return _solve(prob, what, fast)
    except RuntimeError:
        if alt is None:
            raise
    return _solve(cp.Problem(cp.Minimize(alt[0]), [cp.sum(p) == 1]), what + " (rescaled)", fast) + alt[1]


def is_point_mass(forget: ArrayLike) -> bool:
    """True when every row of forget is a point mass (FU's data-unlearning case)."""
    forget = np.atleast_2d(forget)
    return bool(np.all(np.sum(forget > 0, axis=1) == 1))


def likelihood_primal(q: ArrayLike, forget: ArrayLike, budgets: ArrayLike, variant: str = DEFAULT_VARIANT,
                      fast: bool = False) -> OracleResult:
    """LU's primal ``min sum rel_entr(p, q) s.t. G p <= b, sum p = 1`` on supp q; duals are lam*."""
    q = np.asarray(q, float)
    on = q > 0
    G = g_values(q, np.atleast_2d(forget), variant)[:, on]
    p = cp.Variable(int(on.sum()), nonneg=True)
    cons = [G @ p <= np.asarray(budgets, float), cp.sum(p) == 1]
    val = _solve(cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(p, q[on]))), cons), "likelihood primal", fast)
    return OracleResult(float(val), _full(q, p.value), np.asarray(cons[0].dual_value, float).reshape(-1))


def forward_kl_point_mass_primal(q: ArrayLike, forget: ArrayLike, budgets: ArrayLike) -> OracleResult:
    """FU with point-mass forget distributions: ``min sum rel_entr(q, p) s.t. p(a_i) <= exp(-b_i)``."""
    q = np.asarray(q, float)
    forget = np.atleast_2d(np.asarray(forget, float))
    if not is_point_mass(forget):
        raise ValueError(f"forward_kl: the convex FU oracle needs point-mass forget rows, got {forget}")
    on = q > 0
    atoms = [int(np.flatnonzero(row)[0]) for row in forget]
    caps = np.exp(-np.asarray(budgets, float))

    def problem(kl_div_form: bool):
        p = cp.Variable(q.shape[0], nonneg=True)
        if not kl_div_form:  # mass off supp q is allowed (KL(q||p) ignores it)
            cons = [cp.hstack([p[a] for a in atoms]) <= caps, cp.sum(p) == 1]
            return p, cons, cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(q[on], p[on]))), cons)
        # kl_div: q log(q/p) - q + p, whose sum is KL(q||p) once p lives on supp q (where the optimum
        # puts all its mass)
        cons = [cp.hstack([p[a] for a in atoms]) <= caps, cp.sum(p[on]) == 1, *([p[~on] == 0] if not on.all() else [])]
        return p, cons, cp.Problem(cp.Minimize(cp.sum(cp.kl_div(q[on], p[on]))), cons)

    p, cons, prob = problem(False)
    try:
        val = _solve(prob, "forward_kl point-mass primal")
    except RuntimeError:
        # Clarabel ended OPTIMAL_INACCURATE on about 1 in 1,500 generated instances (e.g. q uniform on
        # 3 atoms, a = 1, b = 1.4348); the kl_div form of the same minimum solved them
        p, cons, prob = problem(True)
        val = _solve(prob, "forward_kl point-mass primal (kl_div form)")
    # d/dp(a) of -log p(a) gives the KL-constraint multiplier lam_i = nu_i p(a_i)
    nu = np.asarray(cons[0].dual_value, float).reshape(-1)
    lam = nu * np.array([p.value[a] for a in atoms])
    pv = np.maximum(p.value, 0.0)
    return OracleResult(float(val), pv / pv.sum(), lam)


def lagrangian_minimum(problem: str, q: ArrayLike, forget: ArrayLike, lam: ArrayLike, budgets: ArrayLike,
                       variant: str = DEFAULT_VARIANT, fast: bool = False) -> OracleResult:
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
        if Lam < 1.0:
            obj = (1.0 - Lam) * cp.sum(cp.rel_entr(p, np.ones(s))) + f @ p
            # the same objective as (1 - Lam) KL(p||c) + const, c = exp(-f/(1-Lam)) rescaled: better
            # conditioned when Clarabel cannot certify the first form
            z = -f / (1.0 - Lam)
            alt = (1.0 - Lam) * cp.sum(cp.rel_entr(p, np.exp(z - z.max()))), -(1.0 - Lam) * z.max()
        else:
            obj, alt = f @ p, None
        val = _solve_either(p, obj, alt, "reverse_kl Lagrangian", fast) + float(lam @ b)
    elif problem == "forward_kl":
        w = q[on] - lam @ forget[:, on]
        if np.any(w < 0) or Lam >= 1:
            raise ValueError(f"forward_kl: lam = {lam} is outside the dual domain")
        const = (float(np.sum(xlogy(q, q))) - float(lam @ np.sum(xlogy(forget, forget), axis=1))
                 - float(np.sum(xlogy(w, w))) + float(lam @ b))
        val = _solve_either(p, cp.sum(cp.rel_entr(w, p)), None, "forward_kl Lagrangian", fast) + const
    else:
        G = g_values(q, forget, variant)[:, on]
        obj = cp.sum(cp.rel_entr(p, q[on])) + (lam @ G) @ p
        z = np.log(q[on]) - lam @ G
        alt = cp.sum(cp.rel_entr(p, np.exp(z - z.max()))), -z.max()
        val = _solve_either(p, obj, alt, "likelihood Lagrangian", fast) - float(lam @ b)
    return OracleResult(float(val), _full(q, p.value), lam.copy())
