"""The three unlearning problems on a finite space (MATH.md §1-3): targets, dual functions, solver.

Distributions are float64 vectors on n atoms: ``q`` (n,) the pretrained model, ``forget`` (m, n) the
distributions q_1..q_m to unlearn, ``lam`` (m,) multipliers, ``budgets`` (m,) thresholds b_i (for LU
the eps_i of MATH.md; we call every threshold a budget).

* RU ``reverse_kl``:  min KL(p||q)  s.t. KL(p||q_i) >= b_i        (non-convex)
* FU ``forward_kl``:  min KL(q||p)  s.t. KL(q_i||p) >= b_i        (non-convex)
* LU ``likelihood``:  min KL(p||q)  s.t. E_p[g_i] <= b_i          (convex), with
  g_i = q_i (``variant="likelihood"``, the default, as the paper states LU), log q_i
  (``"log_likelihood"``) or q_i/q (``"ratio"``, a diffusion-classifier score).

``solve`` maximises the concave dual D(lam) (closed forms, projected Newton, an LP for RU's
``sum(lam) >= 1`` branch), then certifies a primal optimum: by the KKT conditions when the target at
lam* is feasible with complementary slackness (zero gap), otherwise by an independent global primal
solver (``theory.discrete_global``) or a convex program (``theory.discrete_oracles``). The gap
``P* - D*`` is measured, never assumed. Decisions and evidence: ``docs/theory-discrete.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.special import rel_entr, xlogy

from theory import PROBLEMS
from theory.solution import Solution

log = logging.getLogger(__name__)

__all__ = [
    "VARIANTS", "DEFAULT_VARIANT", "kl", "reverse_kl_target", "forward_kl_target",
    "likelihood_target", "constraint_values", "objective_value", "dual_function", "dual_hessian",
    "lagrangian", "optimal_multipliers", "solve", "refine", "ru_gap_interval",
]

#: LU constraint functionals g_i (MATH.md §1 [open]); the default is the paper's likelihood q_i(x).
VARIANTS = ("likelihood", "log_likelihood", "ratio")
DEFAULT_VARIANT = "likelihood"

SUM_TOL = 1e-9  # |sum(q) - 1| allowed on input
KKT_TOL = 1e-7  # relative tolerance of the KKT certificate (feasibility, complementary slackness)


def logsumexp(x, axis=None):
    """log sum exp(x) (scipy's version costs ~0.3 ms a call in array-API dispatch; this is hot)."""
    x = np.asarray(x, np.float64)
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    out = np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True)) + mx
    return out.item() if axis is None else np.squeeze(out, axis=axis)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check_problem(problem) -> str:
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {problem!r}")
    return problem


#: The spelling ``theory.gmm``, ``toy`` and ``scale`` use for the ratio variant; accepted here too.
_VARIANT_ALIASES = {"likelihood_ratio": "ratio"}


def _check_variant(problem, variant) -> str:
    variant = _VARIANT_ALIASES.get(variant, variant)
    if variant not in VARIANTS:
        raise ValueError(f"{problem}: variant must be one of {VARIANTS}, got {variant!r}")
    return variant


def _as_array(problem, name, x, ndim) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{problem}: {name} must be a float array, got {x!r}") from exc
    if a.ndim != ndim:
        raise ValueError(f"{problem}: {name} must have {ndim} dimension(s), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{problem}: {name} must be finite, got {a[tuple(bad)]} at index {tuple(bad)}")
    return a


def _check_distribution(problem, name, a) -> None:
    if a.size == 0:
        raise ValueError(f"{problem}: {name} must not be empty, got shape {a.shape}")
    if np.any(a < 0):
        bad = np.argwhere(a < 0)[0]
        raise ValueError(f"{problem}: {name} must be non-negative, got {a[tuple(bad)]} at index {tuple(bad)}")
    s = a.sum(axis=-1)
    off = np.abs(s - 1.0) > SUM_TOL
    if np.any(off):
        i = int(np.argmax(off)) if s.ndim else 0
        val = s.flat[i]
        where = f" (row {i})" if a.ndim == 2 else ""
        raise ValueError(f"{problem}: {name} must sum to 1{where}, got {val:.12g}")


def _validate(problem, q, forget, lam=None, budgets=None):
    """Arrays as float64 with shapes and simplex membership checked; ValueError names the value."""
    _check_problem(problem)
    q = _as_array(problem, "q", q, 1)
    _check_distribution(problem, "q", q)
    forget = _as_array(problem, "forget", forget, 2)
    if forget.shape[1] != q.shape[0]:
        raise ValueError(f"{problem}: forget must have shape (m, {q.shape[0]}) to match q, got {forget.shape}")
    if forget.shape[0] < 1:
        raise ValueError(f"{problem}: need at least one forget distribution, got shape {forget.shape}")
    _check_distribution(problem, "forget", forget)
    m = forget.shape[0]
    out = [q, forget]
    if lam is not None:
        lam = _as_array(problem, "lam", lam, 1)
        if lam.shape != (m,):
            raise ValueError(f"{problem}: lam must have shape ({m},), got {lam.shape}")
        if np.any(lam < 0):
            raise ValueError(f"{problem}: lam must be >= 0, got {lam}")
        out.append(lam)
    if budgets is not None:
        budgets = _as_array(problem, "budgets", budgets, 1)
        if budgets.shape != (m,):
            raise ValueError(f"{problem}: budgets must have shape ({m},), got {budgets.shape}")
        out.append(budgets)
    return out


def _check_supports(problem, q, forget, variant=DEFAULT_VARIANT) -> None:
    """Forget supports each problem allows (docs/theory-discrete.md, "supports")."""
    on = q > 0
    if problem == "reverse_kl" or (problem == "likelihood" and variant == "log_likelihood"):
        bad = np.argwhere((forget == 0) & on[None, :])
        if bad.size:
            i, x = bad[0]
            why = ("KL(p||q_i) = +inf for every p using that atom, so p = q meets any budget: RU needs "
                   "supp q inside supp q_i" if problem == "reverse_kl" else
                   "log q_i = -inf there: the log-likelihood variant needs supp q inside supp q_i")
            raise ValueError(f"{problem}: forget[{i}] is 0 at atom {x} where q = {q[x]:.6g} > 0; {why}")
    if problem == "forward_kl":
        bad = np.argwhere((forget > 0) & ~on[None, :])
        if bad.size:
            i, x = bad[0]
            raise ValueError(
                f"{problem}: forget[{i}] has mass {forget[i, x]:.6g} at atom {x} where q = 0; every p with "
                "KL(q||p) < inf may vanish there, making KL(q_i||p) = +inf: FU needs supp q_i inside supp q")


# ---------------------------------------------------------------------------------------------
# divergences, constraint functionals, targets
# ---------------------------------------------------------------------------------------------

def kl(p, r) -> float:
    """KL(p||r) = sum p log(p/r), with 0 log 0 = 0 and +inf (never NaN) when supp p is not in supp r."""
    return float(np.sum(rel_entr(np.asarray(p, float), np.asarray(r, float))))


def _g_values(q, forget, variant) -> np.ndarray:
    """LU constraint functionals g_i(x) on all atoms (m, n); entries off supp q are never used."""
    if variant == "likelihood":
        return forget.copy()
    if variant == "log_likelihood":
        with np.errstate(divide="ignore"):
            return np.log(forget)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q[None, :] > 0, forget / np.where(q > 0, q, 1.0)[None, :], 0.0)


def objective_value(problem, q, p) -> float:
    """KL(p||q) for RU and LU, KL(q||p) for FU."""
    return kl(q, p) if problem == "forward_kl" else kl(p, q)


def constraint_values(problem, q, forget, p, variant=DEFAULT_VARIANT) -> np.ndarray:
    """(m,) constraint functionals at p: KL(p||q_i) (RU), KL(q_i||p) (FU), E_p[g_i] (LU)."""
    if problem == "reverse_kl":
        return np.array([kl(p, qi) for qi in forget])
    if problem == "forward_kl":
        return np.array([kl(qi, p) for qi in forget])
    g = _g_values(q, forget, variant)
    on = p > 0
    return np.array([float(np.dot(p[on], gi[on])) for gi in g])


def violation(problem, q, forget, p, budgets, variant=DEFAULT_VARIANT) -> np.ndarray:
    """(m,) ``measured - budget`` oriented so that <= 0 is feasible (cooper's convention)."""
    c = constraint_values(problem, q, forget, p, variant)
    return c - budgets if problem == "likelihood" else budgets - c


def lagrangian(problem, q, forget, p, lam, budgets, variant=DEFAULT_VARIANT) -> float:
    """L(p, lam) = objective(p) + lam · violation(p) (MATH.md §2)."""
    v = violation(problem, q, forget, p, budgets, variant)
    lv = np.where(lam > 0, lam * v, 0.0)
    return objective_value(problem, q, p) + float(np.sum(lv))


def _ru_parts(q, forget):
    on = q > 0
    log_q = np.log(q[on])
    with np.errstate(divide="ignore"):
        log_qi = np.log(forget[:, on])
    return on, log_q, log_qi


def reverse_kl_target(q, forget, lam) -> np.ndarray:
    """RU Lagrangian minimiser argmin_p KL(p||q) - sum lam_i KL(p||q_i) (MATH.md §2).

    For Lam = sum(lam) < 1 the tilt ``p ∝ q prod (q/q_i)^eta_i``, ``eta = lam/(1-Lam)``. On a finite
    space the Lagrangian is linear (Lam = 1) or concave (Lam > 1) in p for larger Lam; its minimisers
    then live on ``argmin_x f(x)``, ``f = -log q + sum lam_i log q_i``: for Lam = 1 we return q
    restricted to that set (the limit of the tilt as Lam -> 1-), for Lam > 1 the vertex of that set
    with the largest q. Shapes: q (n,), forget (m, n), lam (m,); returns p (n,).
    """
    q, forget, lam = _validate("reverse_kl", q, forget, lam=lam)
    _check_supports("reverse_kl", q, forget)
    on, log_q, log_qi = _ru_parts(q, forget)
    p = np.zeros_like(q)
    Lam = float(lam.sum())
    if Lam < 1.0:
        eta = lam / (1.0 - Lam)
        logits = log_q + eta @ (log_q[None, :] - log_qi)
        p[on] = np.exp(logits - logsumexp(logits))
        return p
    f = -log_q + lam @ log_qi
    arg = f <= f.min() + 1e-12 * max(1.0, abs(f.min()))
    ps = np.zeros(on.sum())
    if Lam == 1.0:
        ps[arg] = q[on][arg] / q[on][arg].sum()
    else:
        idx = np.flatnonzero(arg)
        ps[idx[np.argmax(q[on][idx])]] = 1.0
    p[on] = ps
    return p


def forward_kl_target(q, forget, lam) -> np.ndarray:
    """FU Lagrangian minimiser, the signed mixture ``(q - sum lam_i q_i) / (1 - Lam)`` (MATH.md §2).

    Defined on the dual domain ``q - sum lam_i q_i >= 0`` with Lam < 1; outside it the Lagrangian is
    unbounded below and a ValueError names the most negative entry. Returns p (n,).
    """
    q, forget, lam = _validate("forward_kl", q, forget, lam=lam)
    _check_supports("forward_kl", q, forget)
    w = q - lam @ forget
    Lam = float(lam.sum())
    if np.any(w < -1e-15) or Lam >= 1.0:
        x = int(np.argmin(w))
        raise ValueError(f"forward_kl: lam = {lam} is outside the dual domain q - sum lam_i q_i >= 0, "
                         f"sum(lam) < 1: min entry {w[x]:.6g} at atom {x}, sum(lam) = {Lam:.6g}")
    return np.maximum(w, 0.0) / (1.0 - Lam)


def likelihood_target(q, forget, lam, variant=DEFAULT_VARIANT) -> np.ndarray:
    """LU Lagrangian minimiser, the Gibbs tilt ``p ∝ q exp(-sum lam_i g_i)`` (MATH.md §2), with
    ``g_i`` given by ``variant`` (default ``"likelihood"``: g_i = q_i). Returns p (n,)."""
    q, forget, lam = _validate("likelihood", q, forget, lam=lam)
    _check_variant("likelihood", variant)
    _check_supports("likelihood", q, forget, variant)
    on = q > 0
    g = _g_values(q, forget, variant)[:, on]
    logits = np.log(q[on]) - lam @ g
    p = np.zeros_like(q)
    p[on] = np.exp(logits - logsumexp(logits))
    return p


# ---------------------------------------------------------------------------------------------
# dual functions: value, gradient (Danskin: the violation at the target), Hessian where smooth
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Instance:
    """A validated instance restricted to supp q, with the logs every dual evaluation needs."""

    problem: str
    q: np.ndarray
    forget: np.ndarray
    budgets: np.ndarray
    variant: str
    on: np.ndarray
    log_q: np.ndarray  # (s,)
    data: np.ndarray  # RU: r_i = log q - log q_i; FU: q_i; LU: g_i; all (m, s)
    const: float  # FU: sum q log q - sum ... (see _dual); others 0


def _instance(problem, q, forget, budgets, variant=DEFAULT_VARIANT) -> _Instance:
    q, forget, budgets = _validate(problem, q, forget, budgets=budgets)
    if problem == "likelihood":
        _check_variant(problem, variant)
    _check_supports(problem, q, forget, variant)
    on = q > 0
    log_q = np.log(q[on])
    if problem == "reverse_kl":
        data = log_q[None, :] - np.log(forget[:, on])
    elif problem == "forward_kl":
        data = forget[:, on]
    else:
        data = _g_values(q, forget, variant)[:, on]
    return _Instance(problem, q, forget, budgets, variant, on, log_q, data, 0.0)


def _dual(inst: _Instance, lam: np.ndarray, hessian: bool = True):
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


def dual_function(problem, q, forget, lam, budgets, variant=DEFAULT_VARIANT):
    """D(lam) = min_p L(p, lam) and its (super)gradient, the violation at the target (MATH.md §2).

    * RU: ``lam·b - (1-Lam) log sum_x q (q/prod q_i^lam_i)^(1/(1-Lam))`` for Lam < 1 and
      ``lam·b + min_x [-log q(x) + sum lam_i log q_i(x)]`` for Lam >= 1 (finite spaces only).
    * FU: ``lam·b - H(q) + sum lam_i H(q_i) - sum w log w + (1-Lam) log(1-Lam)``, ``w = q - sum lam_i
      q_i``, on ``w >= 0``; ``-inf`` outside (gradient ``None``).
    * LU: ``-log E_q[exp(-sum lam_i g_i)] - lam·b``, all lam >= 0.

    Returns ``(value, grad)`` with grad (m,): RU ``b_i - KL(p_lam||q_i)``, FU ``b_i - KL(q_i||p_lam)``,
    LU ``E_{p_lam}[g_i] - b_i``.
    """
    q, forget, lam, budgets = _validate(problem, q, forget, lam=lam, budgets=budgets)
    inst = _instance(problem, q, forget, budgets, variant)
    value, grad, _ = _dual(inst, lam, hessian=False)
    return value, grad


def dual_hessian(problem, q, forget, lam, budgets, variant=DEFAULT_VARIANT):
    """Hessian of D where it is smooth (RU: Lam < 1; FU: w > 0; LU: everywhere), else ``None``.

    RU: ``-(I + 1 eta^T) Cov_p(r) (I + eta 1^T) / (1 - Lam)``, r_i = log(q/q_i); FU:
    ``-(sum_x q_i q_j / w - 1/(1-Lam))``; LU: ``-Cov_p(g)``.
    """
    q, forget, lam, budgets = _validate(problem, q, forget, lam=lam, budgets=budgets)
    return _dual(_instance(problem, q, forget, budgets, variant), lam, hessian=True)[2]


# ---------------------------------------------------------------------------------------------
# dual solver
# ---------------------------------------------------------------------------------------------

def _projected_newton(inst, lam0, max_iter=200):
    """Maximise the concave D over lam >= 0 where it is smooth: projected Newton (Bertsekas) with an
    Armijo search along the projection arc. Returns (lam, value, grad, converged)."""
    m = lam0.shape[0]
    lam = lam0.copy()
    val, g, H = _dual(inst, lam)
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
                v2, g2, H2 = _dual(inst, new)
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
    return lam, _dual(inst, lam, hessian=False)[0]


def _optimal_multipliers(inst):
    m = inst.budgets.shape[0]
    lam, val, g, ok = _projected_newton(inst, np.zeros(m))
    info = {"newton_converged": ok, "branch": "smooth"}
    if inst.problem == "reverse_kl" and not ok:
        lam_lp, val_lp = _ru_lp(inst)
        if val_lp >= val:
            lam, val, g = lam_lp, val_lp, _dual(inst, lam_lp, hessian=False)[1]
            info["branch"] = "lp (sum lam >= 1)"
    elif inst.problem == "forward_kl" and not ok:
        info["branch"] = "boundary"
        lam_b = _fu_boundary(inst)
        if lam_b is not None:
            val_b = _dual(inst, lam_b, hessian=False)[0]
            if val_b >= val - 1e-12 * max(1.0, abs(val)):
                lam, val, g = lam_b, val_b, None
                info["branch"] = "boundary (q = sum lam_i q_i, sum lam = 1)"
    return lam, val, g, info


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


def optimal_multipliers(problem, q, forget, budgets, variant=DEFAULT_VARIANT):
    """lam* = argmax_{lam >= 0} D(lam) and D* (validated inputs, budgets checked for feasibility)."""
    inst = _feasible_instance(problem, q, forget, budgets, variant)
    lam, val, _, _ = _optimal_multipliers(inst)
    return lam, val


# ---------------------------------------------------------------------------------------------
# feasibility of budgets
# ---------------------------------------------------------------------------------------------

def _feasible_instance(problem, q, forget, budgets, variant=DEFAULT_VARIANT, joint=True) -> _Instance:
    """Validated instance; budgets no distribution can meet raise ValueError with the best value.
    ``joint=False`` skips LU's joint-feasibility LP (``solve`` runs it only when KKT fails: a
    certified target is itself a feasible point)."""
    inst = _instance(problem, q, forget, budgets, variant)
    b = inst.budgets
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
# certificates and solve
# ---------------------------------------------------------------------------------------------

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
        if float(lam.sum()) >= 1.0 or np.any(w < 0):
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


def solve(problem, q, forget, budgets, *, variant=DEFAULT_VARIANT, global_max_atoms=8,
          certify=True) -> Solution:
    """Dual optimum lam*, D*, and a certified primal optimum P* of one finite instance.

    Args:
        problem: ``"reverse_kl"``, ``"forward_kl"`` or ``"likelihood"``.
        q: (n,) the pretrained distribution. forget: (m, n) the distributions to unlearn.
        budgets: (m,) thresholds b_i (RU/FU: lower bounds on the KL; LU: upper bounds on E_p[g_i]).
        variant: LU's constraint functional (``VARIANTS``; default ``"likelihood"``).
        global_max_atoms: largest support for the global primal solver (non-convex RU/FU).
        certify: when False, skip the global / cvxpy fallbacks (``certificate`` may be ``"none"``).

    Certification, in order: ``"kkt"`` when the target at lam* is feasible with complementary
    slackness (then P* = D*); else ``"global"`` (``theory.discrete_global``: RU and FU with m <= 2,
    |supp q| <= global_max_atoms); else ``"cvxpy"`` (LU, or FU with point-mass forget
    distributions); else ``"none"`` with the best feasible value known as an upper bound.
    """
    t0 = time.perf_counter()
    _check_problem(problem)
    inst = _feasible_instance(problem, q, forget, budgets, variant, joint=False)
    lam, dual_value, grad, info = _optimal_multipliers(inst)
    p_dual = _target_at(inst, lam, inst.budgets)
    kkt = _kkt(inst, p_dual, lam, dual_value, grad)
    scale = max(1.0, float(np.max(np.abs(inst.budgets))), abs(dual_value) if np.isfinite(dual_value) else 1.0)
    certificate, p, primal_value = "none", None, np.inf
    if kkt["feasibility"] <= KKT_TOL * scale and kkt["complementary_slackness"] <= KKT_TOL * scale:
        certificate, p = "kkt", p_dual
        primal_value = objective_value(problem, inst.q, p)
    elif certify:
        from theory import discrete_global, discrete_oracles

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
            _feasible_instance(problem, inst.q, inst.forget, inst.budgets, variant)  # raises if jointly infeasible
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


# ---------------------------------------------------------------------------------------------
# RU structure: the gap interval, refinement
# ---------------------------------------------------------------------------------------------

def ru_gap_interval(q, forget):
    """For m = 1, the budgets (b_M, b_max] where RU's dual optimum has lam* > 1 (MATH.md §3):
    ``M = argmax_x q/q_1``, ``b_M = max_{x in M} -log q_1(x)`` (the furthest the Lam = 1 face of
    Lagrangian minimisers reaches), ``b_max = max_x -log q_1(x)`` (the largest feasible budget).
    Inside it the Lagrangian minimisers are point masses, so the gap is > 0 except at the budgets
    ``-log q_1(x)`` of point masses met on the way (docs/theory-discrete.md)."""
    q, forget = _validate("reverse_kl", q, forget)
    if forget.shape[0] != 1:
        raise ValueError(f"reverse_kl: ru_gap_interval needs m = 1, got m = {forget.shape[0]}")
    _check_supports("reverse_kl", q, forget)
    on = q > 0
    r = np.log(q[on]) - np.log(forget[0, on])
    M = r >= r.max() - 1e-12 * max(1.0, abs(r.max()))
    nlq1 = -np.log(forget[0, on])
    return float(nlq1[M].max()), float(nlq1.max())


def refine(q, forget, cells):
    """Split every atom into ``cells`` equal cells (q and each q_i uniform inside an atom): the finite
    approximation of a non-atomic base measure used to close RU's gap (MATH.md §3). Returns
    (q (n*cells,), forget (m, n*cells))."""
    q, forget = _validate("reverse_kl", q, forget)
    k = int(cells)
    if k != cells or k < 1:
        raise ValueError(f"refine: cells must be a positive integer, got {cells!r}")
    return np.repeat(q / k, k), np.repeat(forget / k, k, axis=1)
