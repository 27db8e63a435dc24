"""``solve``: the dual optimum of a finite problem and a certified primal optimum.

``solve`` maximises the concave dual D(lam) (``theory.discrete.dual``), then certifies a primal
optimum: by the KKT conditions when the target at lam* is feasible with complementary slackness
(zero gap), otherwise by an independent global primal solver (``theory.discrete.global_primal``) or
a convex program (``theory.discrete.oracles``). The gap ``P* - D*`` is measured, never assumed.
Decisions and evidence: ``docs/theory-discrete.md``.
"""

from __future__ import annotations

import time

import numpy as np
from numpy.typing import ArrayLike

from theory.discrete.core import (DEFAULT_VARIANT, KKT_TOL, constraint_values, kl, lagrangian, likelihood_target,
                                  objective_value, reverse_kl_target, violation)
from theory.discrete.dual import feasible_instance, maximise_dual
from theory.solution import Solution
from theory.validation import check_problem

__all__ = ["solve"]


def _full(inst, ps):
    p = np.zeros_like(inst.q)
    p[inst.on] = ps
    return p


def _target_at(inst, lam, budgets):
    """The Lagrangian minimiser at lam* used for the KKT certificate (a CS-satisfying one on RU's
    Lam == 1 face when m == 1, see docs)."""
    q, forget = inst.q, inst.forget
    if inst.problem == "reverse_kl":
        Lam = float(lam.sum())
        if Lam < 1.0 - 1e-12:
            return reverse_kl_target(q, forget, lam)
        f = -inst.log_q - lam @ (inst.data - inst.log_q[None, :])
        M = np.flatnonzero(f <= f.min() + 1e-9 * max(1.0, abs(f.min())))
        if abs(Lam - 1.0) <= 1e-9 and lam.shape[0] == 1:
            # every distribution on M minimises the (linear) Lagrangian: find one with KL(p||q_1) = b
            log_q1 = inst.log_q[M] - inst.data[0, M]
            q1M = np.exp(log_q1)
            lo = q1M / q1M.sum()
            hi = np.zeros(len(M))
            hi[np.argmin(log_q1)] = 1.0
            k = lambda t: kl((1 - t) * lo + t * hi, q1M)  # noqa: E731  convex in t, k(0) = -log q1(M)
            if k(0.0) <= budgets[0] <= k(1.0):
                a, c = 0.0, 1.0
                for _ in range(200):
                    mid = 0.5 * (a + c)
                    a, c = (mid, c) if k(mid) < budgets[0] else (a, mid)
                ps = np.zeros(inst.on.sum())
                ps[M] = (1 - c) * lo + c * hi
                return _full(inst, ps)
        ps = np.zeros(inst.on.sum())
        ps[M[np.argmax(inst.log_q[M])]] = 1.0
        # prefer a vertex of argmin f meeting complementary slackness, if any
        log_qi = inst.log_q[None, :] - inst.data
        for x in M:
            v = budgets + log_qi[:, x]  # b_i - KL(delta_x||q_i)
            if np.all(v <= 1e-9) and np.all(lam * np.abs(v) <= 1e-9):
                ps = np.zeros(inst.on.sum())
                ps[x] = 1.0
                break
        return _full(inst, ps)
    if inst.problem == "forward_kl":
        w = inst.q - lam @ forget
        if float(lam.sum()) >= 1.0 - 1e-12 and lam.shape[0] == 1:
            # q_1 = q: the Lagrangian does not depend on p; any p with KL(q||p) = b meets CS
            return _fu_equal_budget_point(inst.q, budgets[0])
        # on (or within 1e-12 of) the face Lam = 1, w = q - sum lam_i q_i is rounding noise and
        # w/(1 - Lam) amplifies it into a vector that need not sum to 1 (and depended on the order
        # of the atoms): every p minimises the Lagrangian there, so no target is singled out
        if float(lam.sum()) >= 1.0 - 1e-12 or np.any(w < 0):
            return None
        return np.maximum(w, 0.0) / (1.0 - float(lam.sum()))
    return likelihood_target(q, forget, lam, inst.variant)


def _fu_equal_budget_point(q, b):
    """A p with KL(q||p) = b: q mixed with a point mass off supp q if there is one, else at the
    atom of smallest q (KL then grows from 0 to +inf along the segment); None if impossible."""
    off = np.flatnonzero(q == 0)
    on = np.flatnonzero(q > 0)
    if b <= 0:
        return q.copy()
    e = np.zeros_like(q)
    if off.size:
        e[off[0]] = 1.0
        t = -np.expm1(-b)  # KL(q || (1-t) q + t e) = -log(1 - t)
        return (1 - t) * q + t * e
    if on.size < 2:
        return None
    e[on[np.argmin(q[on])]] = 1.0
    a, c = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (a + c)
        a, c = (mid, c) if kl(q, (1 - mid) * q + mid * e) < b else (a, mid)
    return (1 - c) * q + c * e


def _kkt(inst, p, lam, dual_value, grad):
    budgets = inst.budgets
    if p is None:
        return {"feasibility": np.inf, "complementary_slackness": np.inf, "stationarity": np.inf,
                "lagrangian_gap": np.inf}
    v = violation(inst.problem, inst.q, inst.forget, p, budgets, inst.variant)
    Lp = lagrangian(inst.problem, inst.q, inst.forget, p, lam, budgets, inst.variant)
    pg = np.zeros_like(lam) if grad is None else np.where(lam > 0, grad, np.maximum(grad, 0.0))
    return {
        "feasibility": float(max(0.0, np.max(v))),
        "complementary_slackness": float(np.max(np.where(lam > 0, lam * np.abs(v), 0.0))),
        "stationarity": float(np.max(np.abs(pg))) if np.all(np.isfinite(pg)) else np.inf,
        "lagrangian_gap": float(abs(Lp - dual_value)) if np.isfinite(Lp) else np.inf,
    }


def solve(problem: str, q: ArrayLike, forget: ArrayLike, budgets: ArrayLike, *, variant: str = DEFAULT_VARIANT,
          global_max_atoms: int = 8, certify: bool = True) -> Solution:
    """Dual optimum lam*, D*, and a certified primal optimum P* of one finite instance.

    Args:
        problem: ``"reverse_kl"``, ``"forward_kl"`` or ``"likelihood"``.
        q: (n,) the pretrained distribution. forget: (m, n) the distributions to unlearn.
        budgets: (m,) thresholds b_i (RU/FU: lower bounds on the KL; LU: upper bounds on E_p[g_i]).
        variant: LU's constraint functional (``VARIANTS``; default ``"likelihood"``).
        global_max_atoms: largest support for the global primal solver (non-convex RU/FU).
        certify: when False, skip the global / cvxpy fallbacks (``certificate`` may be ``"none"``).

    Certification, in order: ``"kkt"`` when the target at lam* is feasible with complementary
    slackness (then P* = D*); else ``"global"`` (``theory.discrete.global_primal``: RU and FU with m <= 2,
    |supp q| <= global_max_atoms); else ``"cvxpy"`` (LU, or FU with point-mass forget
    distributions); else ``"none"`` with the best feasible value known as an upper bound.
    """
    t0 = time.perf_counter()
    check_problem(problem)
    inst = feasible_instance(problem, q, forget, budgets, variant, joint=False)
    lam, dual_value, grad, info = maximise_dual(inst)
    p_dual = _target_at(inst, lam, inst.budgets)
    kkt = _kkt(inst, p_dual, lam, dual_value, grad)
    scale = max(1.0, float(np.max(np.abs(inst.budgets))), abs(dual_value) if np.isfinite(dual_value) else 1.0)
    certificate, p, primal_value = "none", None, np.inf
    if kkt["feasibility"] <= KKT_TOL * scale and kkt["complementary_slackness"] <= KKT_TOL * scale:
        certificate, p = "kkt", p_dual
        primal_value = objective_value(problem, inst.q, p)
    elif certify:
        import theory.discrete.global_primal as discrete_global  # cvxpy and the enumeration load on demand
        import theory.discrete.oracles as discrete_oracles

        s = int(inst.on.sum())
        m = inst.budgets.shape[0]
        if problem == "forward_kl" and m <= 2 and s <= global_max_atoms and certificate == "none":
            try:
                res = discrete_global.forward_kl_global(inst.q, inst.forget, inst.budgets)
                certificate, p, primal_value = "global", res.p, res.value
                info["global"] = res.info
            except discrete_global.NotCertified as exc:  # q in the span of q_1, q_2
                info["global"] = str(exc)
        if certificate != "none":
            pass
        elif problem == "reverse_kl" and s <= global_max_atoms and m <= 2:
            res = discrete_global.reverse_kl_global(inst.q, inst.forget, inst.budgets)
            certificate, p, primal_value = "global", res.p, res.value
            info["global"] = res.info
        elif problem == "forward_kl" and discrete_oracles.is_point_mass(inst.forget):
            res = discrete_oracles.forward_kl_point_mass_primal(inst.q, inst.forget, inst.budgets)
            certificate, p, primal_value = "cvxpy", res.p, res.value
        elif problem == "likelihood":
            feasible_instance(problem, inst.q, inst.forget, inst.budgets, variant)  # raises if jointly infeasible
            res = discrete_oracles.likelihood_primal(inst.q, inst.forget, inst.budgets, inst.variant)
            certificate, p, primal_value = "cvxpy", res.p, res.value
    if certificate == "none" and problem == "reverse_kl":
        p, primal_value = _ru_feasible_vertex(inst)
    if p is None:
        p = p_dual
    if p is not None and certificate == "none" and primal_value == np.inf and problem != "reverse_kl":
        v = violation(problem, inst.q, inst.forget, p, inst.budgets, inst.variant)
        if np.all(v <= 0):
            primal_value = objective_value(problem, inst.q, p)
    cons = (constraint_values(problem, inst.q, inst.forget, p, inst.variant) if p is not None
            else np.full(inst.budgets.shape, np.nan))
    info["seconds"] = time.perf_counter() - t0
    return Solution(problem=problem, p=p, lam=lam, primal_value=float(primal_value),
                    dual_value=float(dual_value), gap=float(primal_value - dual_value),
                    budgets=inst.budgets.copy(), constraint_values=cons, certificate=certificate,
                    p_dual=p_dual, kkt=kkt, info=info)


def _ru_feasible_vertex(inst):
    """Best feasible point mass (an upper bound on RU's P*) when nothing certifies the primal."""
    log_qi = inst.log_q[None, :] - inst.data
    ok = np.all(-log_qi >= inst.budgets[:, None], axis=0)
    if not ok.any():
        return None, np.inf
    x = np.flatnonzero(ok)[np.argmax(inst.log_q[ok])]
    ps = np.zeros(inst.on.sum())
    ps[x] = 1.0
    return _full(inst, ps), float(-inst.log_q[x])


