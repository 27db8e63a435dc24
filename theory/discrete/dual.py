"""Dual functions of the finite problems and their maximisation: the value, gradient (Danskin: the
violation at the target) and Hessian of D(lam) on each problem's dual domain, projected Newton, the
LPs of RU's ``sum(lam) >= 1`` branch and FU's boundary face, the feasibility of budgets, and RU's
gap interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linprog
from scipy.special import xlogy

from theory.discrete.core import DEFAULT_VARIANT, check_supports, g_values, logsumexp, validate
from theory.validation import check_budgets, check_variant

__all__ = ["Instance", "make_instance", "dual_at", "dual_function", "dual_hessian", "maximise_dual",
           "optimal_multipliers", "feasible_instance", "ru_gap_interval"]


# ---------------------------------------------------------------------------------------------
# dual functions: value, gradient (Danskin: the violation at the target), Hessian where smooth
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    """A validated instance restricted to supp q, with the logs every dual evaluation needs."""

    problem: str
    q: np.ndarray
    forget: np.ndarray
    budgets: np.ndarray
    variant: str
    on: np.ndarray
    log_q: np.ndarray  # (s,)
    data: np.ndarray  # RU: r_i = log q - log q_i; FU: q_i; LU: g_i; all (m, s)
    const: float  # FU: sum q log q - sum ... (see dual_at); others 0


def make_instance(problem: str, q: ArrayLike, forget: ArrayLike, budgets: ArrayLike,
                  variant: str = DEFAULT_VARIANT) -> Instance:
    """A validated ``Instance`` (shapes, simplices, supports, LU variant; no feasibility check)."""
    q, forget, budgets = validate(problem, q, forget, budgets=budgets)
    if problem == "likelihood":
        check_variant(variant, problem)
    check_supports(problem, q, forget, variant)
    on = q > 0
    log_q = np.log(q[on])
    if problem == "reverse_kl":
        data = log_q[None, :] - np.log(forget[:, on])
    elif problem == "forward_kl":
        data = forget[:, on]
    else:
        data = g_values(q, forget, variant)[:, on]
    return Instance(problem, q, forget, budgets, variant, on, log_q, data, 0.0)


def dual_at(inst: Instance, lam: np.ndarray,
            hessian: bool = True) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """(D(lam), grad D(lam), Hessian or None) on the problem's dual domain; D = -inf outside it."""
    b, m = inst.budgets, lam.shape[0]
    Lam = float(lam.sum())
    if inst.problem == "reverse_kl":
        r = inst.data
        if Lam < 1.0:
            eta = lam / (1.0 - Lam)
            logits = inst.log_q + eta @ r
            A = logsumexp(logits)
            p = np.exp(logits - A)
            # KL(p||q_i) = E_p[log p - log q_i] summed directly: the exponential-family shortcut
            # E[r_i] + eta·E[r] - A cancels catastrophically as Lam -> 1 (eta -> inf)
            log_p = logits - A
            Er = r @ p
            kl_i = (log_p[None, :] - (inst.log_q[None, :] - r)) @ p
            value = float(lam @ b) - (1.0 - Lam) * A
            H = None
            if hessian:
                rc = r - Er[:, None]
                Sigma = (rc * p) @ rc.T
                T = np.eye(m) + np.outer(np.ones(m), eta)
                H = -(T @ Sigma @ T.T) / (1.0 - Lam)
            return value, b - kl_i, H
        with np.errstate(over="ignore", invalid="ignore"):  # only at |lam| ~ 1e300 (line searches)
            f = -inst.log_q - lam @ (r - inst.log_q[None, :])  # -log q + sum lam_i log q_i
        if not np.all(np.isfinite(f)):
            return -np.inf, None, None
        j = int(np.argmin(f))
        log_qi_j = inst.log_q[j] - r[:, j]
        return float(lam @ b) + float(f[j]), b + log_qi_j, None
    if inst.problem == "forward_kl":
        Q = inst.data
        q = inst.q[inst.on]
        w = q - lam @ Q
        if np.any(w < 0) or Lam > 1.0:
            return -np.inf, None, None
        if Lam == 1.0:  # w == 0: the Lagrangian does not depend on p
            val = float(lam @ b) + float(np.sum(xlogy(q, q))) - float(np.sum(lam * np.sum(xlogy(Q, Q), 1)))
            return val, None, None
        ent_i = np.sum(xlogy(Q, Q), axis=1)
        value = (float(lam @ b) + float(np.sum(xlogy(q, q))) - float(lam @ ent_i)
                 - float(np.sum(xlogy(w, w))) + float(xlogy(1.0 - Lam, 1.0 - Lam)))
        with np.errstate(divide="ignore"):
            log_p = np.log(w) - np.log1p(-Lam)
        kl_i = ent_i - np.sum(np.where(Q > 0, Q * np.where(np.isfinite(log_p), log_p, 0.0), 0.0), axis=1)
        kl_i = np.where(np.any((Q > 0) & (w[None, :] == 0), axis=1), np.inf, kl_i)
        H = None
        if hessian and np.all(w > 0):
            H = -((Q / w) @ Q.T - 1.0 / (1.0 - Lam))
        return value, b - kl_i, H
    G = inst.data
    logits = inst.log_q - lam @ G
    A = logsumexp(logits)
    p = np.exp(logits - A)
    Eg = G @ p
    H = None
    if hessian:
        Gc = G - Eg[:, None]
        H = -(Gc * p) @ Gc.T
    return -A - float(lam @ b), Eg - b, H


def dual_function(problem: str, q: ArrayLike, forget: ArrayLike, lam: ArrayLike, budgets: ArrayLike,
                  variant: str = DEFAULT_VARIANT) -> tuple[float, np.ndarray | None]:
    """D(lam) = min_p L(p, lam) and its (super)gradient, the violation at the target (eqs. 9, 10, 13, 16, 17 of
    ``docs/math.md``).

    * RU: ``lam·b - (1-Lam) log sum_x q (q/prod q_i^lam_i)^(1/(1-Lam))`` for Lam < 1 and
      ``lam·b + min_x [-log q(x) + sum lam_i log q_i(x)]`` for Lam >= 1 (finite spaces only).
    * FU: ``lam·b - H(q) + sum lam_i H(q_i) - sum w log w + (1-Lam) log(1-Lam)``, ``w = q - sum lam_i
      q_i``, on ``w >= 0``; ``-inf`` outside (gradient ``None``).
    * LU: ``-log E_q[exp(-sum lam_i g_i)] - lam·b``, all lam >= 0.

    Returns ``(value, grad)`` with grad (m,): RU ``b_i - KL(p_lam||q_i)``, FU ``b_i - KL(q_i||p_lam)``,
    LU ``E_{p_lam}[g_i] - b_i``.
    """
    q, forget, lam, budgets = validate(problem, q, forget, lam=lam, budgets=budgets)
    inst = make_instance(problem, q, forget, budgets, variant)
    value, grad, _ = dual_at(inst, lam, hessian=False)
    return value, grad


def dual_hessian(problem: str, q: ArrayLike, forget: ArrayLike, lam: ArrayLike, budgets: ArrayLike,
                 variant: str = DEFAULT_VARIANT) -> np.ndarray | None:
    """Hessian of D where it is smooth (RU: Lam < 1; FU: w > 0; LU: everywhere), else ``None``.

    RU: ``-(I + 1 eta^T) Cov_p(r) (I + eta 1^T) / (1 - Lam)``, r_i = log(q/q_i); FU:
    ``-(sum_x q_i q_j / w - 1/(1-Lam))``; LU: ``-Cov_p(g)``.
    """
    q, forget, lam, budgets = validate(problem, q, forget, lam=lam, budgets=budgets)
    return dual_at(make_instance(problem, q, forget, budgets, variant), lam, hessian=True)[2]


# ---------------------------------------------------------------------------------------------
# dual solver
# ---------------------------------------------------------------------------------------------

def _projected_newton(inst, lam0, max_iter=200):
    """Maximise the concave D over lam >= 0 where it is smooth: projected Newton (Bertsekas) with an
    Armijo search along the projection arc. Returns (lam, value, grad, converged)."""
    m = lam0.shape[0]
    lam = lam0.copy()
    val, g, H = dual_at(inst, lam)
    scale = max(1.0, float(np.max(np.abs(inst.budgets))))
    for _ in range(max_iter):
        if H is None or g is None or not np.isfinite(val):
            return lam, val, g, False
        pg = np.where(lam > 0, g, np.maximum(g, 0.0))
        if np.max(np.abs(pg)) <= 1e-13 * scale:
            return lam, val, g, True
        free = (lam > 1e-300) | (g > 0)
        Hf = H[np.ix_(free, free)]
        nrm = max(1.0, float(np.abs(Hf).max()))
        directions = []
        try:  # Newton (least squares: min-norm when H is singular, e.g. more constraints than atoms)
            newton = np.linalg.lstsq(Hf, -g[free], rcond=1e-12)[0]
            # Levenberg-Marquardt also moves along flat directions (duplicated constraints); first
            # when part of the gradient lies outside the range of H, where Newton cannot move
            lm = np.linalg.solve(-Hf + 1e-8 * nrm * np.eye(Hf.shape[0]), g[free])
            outside = np.linalg.norm(g[free] + Hf @ newton) > 1e-6 * np.linalg.norm(g[free])
            directions += [lm, newton] if outside else [newton, lm]
        except np.linalg.LinAlgError:
            pass
        directions.append(g[free])
        accepted = False
        for d_f in directions:
            if not np.all(np.isfinite(d_f)) or float(g[free] @ d_f) <= 0:
                continue
            d = np.zeros(m)
            d[free] = d_f
            t = 1.0
            while t > 1e-20:
                new = np.maximum(lam + t * d, 0.0)
                v2, g2, H2 = dual_at(inst, new)
                if np.isfinite(v2) and H2 is not None:
                    armijo = v2 >= val + 1e-4 * float(g @ (new - lam)) - 1e-15 * abs(val)
                    # near the optimum the increase is below rounding: accept if the gradient shrinks
                    pg2 = np.where(new > 0, g2, np.maximum(g2, 0.0))
                    flat = (abs(v2 - val) <= 1e-13 * max(1.0, abs(val))
                            and np.max(np.abs(pg2)) < np.max(np.abs(pg)))
                    if armijo or flat:
                        accepted = True
                        break
                t *= 0.5
            if accepted:
                break
        if not accepted:
            return lam, val, g, False
        if np.array_equal(new, lam):
            return lam, val, g, False
        lam, val, g, H = new, v2, g2, H2
    return lam, val, g, False


def _ru_lp(inst):
    """RU's dual on the branch Lam >= 1, an LP: max lam·b + t s.t. t <= -log q(x) + sum lam_i log
    q_i(x), lam >= 0, sum lam >= 1 (HiGHS). Returns (lam, D(lam)) or raises when unbounded."""
    m = inst.budgets.shape[0]
    log_qi = inst.log_q[None, :] - inst.data
    A_ub = np.hstack([-log_qi.T, np.ones((log_qi.shape[1], 1))])
    b_ub = -inst.log_q
    A_ub = np.vstack([A_ub, np.hstack([-np.ones(m), [0.0]])])
    b_ub = np.append(b_ub, -1.0)
    c = -np.append(inst.budgets, 1.0)
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=[(0, None)] * m + [(None, None)], method="highs")
    if res.status == 3:
        raise ValueError(f"reverse_kl: budgets = {inst.budgets} are jointly infeasible: the dual is unbounded "
                         "(no p has E_p[-log q_i] >= b_i for all i, hence none has KL(p||q_i) >= b_i)")
    if res.status != 0:
        raise RuntimeError(f"reverse_kl: the Lam >= 1 LP failed: {res.message}")
    lam = np.maximum(res.x[:m], 0.0)
    if lam.sum() < 1.0:
        lam = lam / lam.sum()
    return lam, dual_at(inst, lam, hessian=False)[0]


def maximise_dual(inst: Instance) -> tuple[np.ndarray, float, np.ndarray | None, dict]:
    """``(lam*, D*, grad D(lam*), info)``: projected Newton on the smooth part, then RU's LP branch
    or FU's boundary face when Newton stops short."""
    m = inst.budgets.shape[0]
    lam, val, g, ok = _projected_newton(inst, np.zeros(m))
    info = {"newton_converged": ok, "branch": "smooth"}
    if inst.problem == "reverse_kl" and not ok:
        lam_lp, val_lp = _ru_lp(inst)
        if val_lp >= val:
            lam, val, g = lam_lp, val_lp, dual_at(inst, lam_lp, hessian=False)[1]
            info["branch"] = "lp (sum lam >= 1)"
    elif inst.problem == "forward_kl" and not ok:
        # Newton can stall at a kink of D: where q is a mixture of the q_i, the target w/(1-Lam) is
        # constant along rays ending at the point lam_B with sum lam_B q_i = q, Lam = 1, so D is linear
        # along them and ascent steps can converge to lam_B, which need not be the maximiser (found by
        # hypothesis: q, q_1, q_2 on two atoms). Restart from the maximiser of the concave dual that a
        # convex solver finds (any stalled point is thus compared with the true D*)
        lam_c = _fu_dual_convex(inst)
        if lam_c is not None:
            lam_r, val_r, g_r, ok_r = _projected_newton(inst, lam_c)
            if np.isfinite(val_r) and val_r > val:
                lam, val, g, ok = lam_r, val_r, g_r, ok_r
                info["newton_converged"] = ok
                info["restart"] = "convex solver"
    if inst.problem == "forward_kl" and not ok:
        info["branch"] = "boundary"
        lam_b = _fu_boundary(inst)
        if lam_b is not None:
            val_b = dual_at(inst, lam_b, hessian=False)[0]
            if val_b >= val - 1e-12 * max(1.0, abs(val)):
                lam, val, g = lam_b, val_b, None
                info["branch"] = "boundary (q = sum lam_i q_i, sum lam = 1)"
    return lam, val, g, info


def _fu_dual_convex(inst):
    """FU's dual maximiser by a convex solver (cvxpy, Clarabel), or None if it fails. On supp q the
    q_i sum to 1, so ``-sum w log w + (1-Lam) log(1-Lam) = -sum_x rel_entr(w_x, 1-Lam)``, jointly
    concave in lam: D(lam) = lam·(b - sum q_i log q_i) + sum q log q - sum_x rel_entr(w_x, 1 - Lam)."""
    import cvxpy as cp  # on demand: only when Newton stalls

    Q = inst.data
    m = Q.shape[0]
    ent = np.sum(xlogy(Q, Q), axis=1)
    lam = cp.Variable(m, nonneg=True)
    w = inst.q[inst.on] - Q.T @ lam
    obj = lam @ (inst.budgets - ent) - cp.sum(cp.rel_entr(w, 1 - cp.sum(lam)))
    prob = cp.Problem(cp.Maximize(obj), [w >= 0, cp.sum(lam) <= 1])
    try:
        prob.solve(solver=cp.CLARABEL)
    except cp.error.SolverError:
        return None
    if prob.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or lam.value is None:
        return None
    return np.maximum(np.asarray(lam.value, np.float64), 0.0)


def _fu_boundary(inst):
    """FU's dual on the face Lam = 1, w = 0 (non-empty only when q is a mixture of the q_i), where
    D(lam) = lam·b - H(q) + sum lam_i H(q_i) is linear: an LP over {lam >= 0, sum lam_i q_i = q}."""
    Q = inst.data
    ent = np.sum(xlogy(Q, Q), axis=1)
    res = linprog(-(inst.budgets - ent), A_eq=Q.T, b_eq=inst.q[inst.on], bounds=[(0, None)] * Q.shape[0],
                  method="highs")
    if res.status != 0:
        return None
    lam = np.maximum(res.x, 0.0)
    return lam / lam.sum()


def optimal_multipliers(problem: str, q: ArrayLike, forget: ArrayLike, budgets: ArrayLike,
                        variant: str = DEFAULT_VARIANT) -> tuple[np.ndarray, float]:
    """lam* = argmax_{lam >= 0} D(lam) and D* (validated inputs, budgets checked for feasibility)."""
    inst = feasible_instance(problem, q, forget, budgets, variant)
    lam, val, _, _ = maximise_dual(inst)
    return lam, val


# ---------------------------------------------------------------------------------------------
# feasibility of budgets
# ---------------------------------------------------------------------------------------------

def feasible_instance(problem: str, q: ArrayLike, forget: ArrayLike, budgets: ArrayLike, variant: str = DEFAULT_VARIANT,
                      joint: bool = True) -> Instance:
    """Validated instance; budgets no distribution can meet raise ValueError with the best value.
    ``joint=False`` skips LU's joint-feasibility LP (``solve`` runs it only when KKT fails: a
    certified target is itself a feasible point)."""
    inst = make_instance(problem, q, forget, budgets, variant)
    b = check_budgets(problem, inst.budgets, variant=inst.variant if problem == "likelihood" else None)
    if problem == "reverse_kl":
        log_qi = inst.log_q[None, :] - inst.data
        best = np.max(-log_qi, axis=1)  # max_p KL(p||q_i) over supp q is at a vertex
        for i in np.flatnonzero(b > best + 1e-12 * np.maximum(1.0, np.abs(best))):
            raise ValueError(f"reverse_kl: budgets[{i}] = {b[i]:.12g} is infeasible: the largest achievable "
                             f"KL(p||q_{i}) with KL(p||q) < inf is {best[i]:.12g} (p = a point mass)")
    elif problem == "forward_kl" and np.all(np.sum(inst.forget > 0, axis=1) == 1):
        # point masses: KL(delta_a||p) >= b_i  <=>  p(a) <= exp(-b_i); infeasible only when the
        # forget atoms cover every atom and their caps sum below 1
        atoms = np.argmax(inst.forget > 0, axis=1)
        caps = {}
        for a, bi in zip(atoms, b):
            caps[a] = min(caps.get(a, 1.0), float(np.exp(-bi)))
        total = sum(caps.values())
        if len(caps) == inst.q.shape[0] and total < 1.0:
            raise ValueError(f"forward_kl: budgets = {b} are infeasible: with point-mass forget distributions "
                             f"p(a_i) <= exp(-b_i) and these caps cover every atom, summing to {total:.6g} < 1 "
                             f"(the largest achievable common budget is {np.log(len(caps)):.6g})")
    elif problem == "likelihood":
        low = inst.data.min(axis=1)
        for i in np.flatnonzero(b <= low):
            raise ValueError(f"likelihood: budgets[{i}] = {b[i]:.12g} is infeasible: the smallest achievable "
                             f"E_p[g_{i}] ({inst.variant}) is {low[i]:.12g}, and the budget must exceed it "
                             "strictly (Slater)")
        if b.shape[0] > 1 and joint:
            s = inst.data.shape[1]
            res = linprog(np.append(np.zeros(s), -1.0), A_ub=np.hstack([inst.data, np.ones((b.shape[0], 1))]),
                          b_ub=b, A_eq=np.append(np.ones(s), 0.0)[None, :], b_eq=[1.0],
                          bounds=[(0, None)] * s + [(None, 1.0)], method="highs")
            if res.status != 0 or -res.fun <= 0:
                raise ValueError(f"likelihood: budgets = {b} are jointly infeasible: no p has E_p[g_i] < b_i "
                                 f"for all i (largest common margin {-(res.fun or 0):.3g}); the smallest "
                                 f"achievable values one at a time are {low}")
    return inst


# ---------------------------------------------------------------------------------------------

def ru_gap_interval(q: ArrayLike, forget: ArrayLike) -> tuple[float, float]:
    """For m = 1, the budgets (b_M, b_max] where RU's dual optimum has lam* > 1 (eq. 20 of ``docs/math.md``):
    ``M = argmax_x q/q_1``, ``b_M = max_{x in M} -log q_1(x)`` (the furthest the Lam = 1 face of
    Lagrangian minimisers reaches), ``b_max = max_x -log q_1(x)`` (the largest feasible budget).
    Inside it the Lagrangian minimisers are point masses, so the gap is > 0 except at the budgets
    ``-log q_1(x)`` of point masses met on the way (docs/theory-discrete.md)."""
    q, forget = validate("reverse_kl", q, forget)
    if forget.shape[0] != 1:
        raise ValueError(f"reverse_kl: ru_gap_interval needs m = 1, got m = {forget.shape[0]}")
    check_supports("reverse_kl", q, forget)
    on = q > 0
    r = np.log(q[on]) - np.log(forget[0, on])
    M = r >= r.max() - 1e-12 * max(1.0, abs(r.max()))
    nlq1 = -np.log(forget[0, on])
    return float(nlq1[M].max()), float(nlq1.max())
