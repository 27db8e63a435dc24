"""Shared numerics of the finite problems: validation, divergences, constraint functionals, the
Lagrangian and the three Lagrangian minimisers (targets). Every other module of ``theory.discrete``
builds on this one; it imports none of them.

Distributions are float64 vectors on n atoms: ``q`` (n,) the pretrained model, ``forget`` (m, n) the
distributions q_1..q_m to unlearn, ``lam`` (m,) multipliers, ``budgets`` (m,) thresholds b_i (for LU
the eps_i of ``docs/math.md``; we call every threshold a budget).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import rel_entr

from theory.validation import DEFAULT_VARIANT, VARIANTS, check_budgets, check_problem, check_variant, plain

__all__ = [
    "VARIANTS", "DEFAULT_VARIANT", "SUM_TOL", "KKT_TOL", "logsumexp", "validate", "check_supports", "kl",
    "g_values", "objective_value", "constraint_values", "violation", "lagrangian", "reverse_kl_target",
    "forward_kl_target", "likelihood_target", "refine",
]

SUM_TOL = 1e-9  # |sum(q) - 1| allowed on input
KKT_TOL = 1e-7  # relative tolerance of the KKT certificate (feasibility, complementary slackness)


def logsumexp(x: ArrayLike, axis: int | None = None) -> float | np.ndarray:
    """log sum exp(x) (scipy's version costs ~0.3 ms a call in array-API dispatch; this is hot)."""
    x = np.asarray(x, np.float64)
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    out = np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True)) + mx
    return out.item() if axis is None else np.squeeze(out, axis=axis)


# ---------------------------------------------------------------------------------------------
# validation (the rules shared with theory.gmm and toy live in theory.validation)
# ---------------------------------------------------------------------------------------------

def _index(bad: np.ndarray) -> int | tuple[int, ...]:
    """An ``np.argwhere`` row as plain ints: ``3`` for a vector, ``(0, 3)`` for a matrix."""
    idx = tuple(int(k) for k in bad)
    return idx[0] if len(idx) == 1 else idx


def _as_array(problem: str, name: str, x: ArrayLike, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{problem}: {name} must be a float array, got {plain(x)!r}") from exc
    if a.ndim != ndim:
        raise ValueError(f"{problem}: {name} must have {ndim} dimension(s), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{problem}: {name} must be finite, got {float(a[tuple(bad)])} at index {_index(bad)}")
    return a


def _check_distribution(problem: str, name: str, a: np.ndarray) -> None:
    if a.size == 0:
        raise ValueError(f"{problem}: {name} must not be empty, got shape {a.shape}")
    if np.any(a < 0):
        bad = np.argwhere(a < 0)[0]
        raise ValueError(f"{problem}: {name} must be non-negative, got {float(a[tuple(bad)])} at index "
                         f"{_index(bad)}")
    s = a.sum(axis=-1)
    off = np.abs(s - 1.0) > SUM_TOL
    if np.any(off):
        i = int(np.argmax(off)) if s.ndim else 0
        val = float(s.flat[i])
        where = f" (row {i})" if a.ndim == 2 else ""
        raise ValueError(f"{problem}: {name} must sum to 1{where}, got {val:.12g}")


def validate(problem: str, q: ArrayLike, forget: ArrayLike, lam: ArrayLike | None = None,
             budgets: ArrayLike | None = None) -> list[np.ndarray]:
    """``[q, forget]`` (then ``lam``, ``budgets`` when given) as float64 arrays with shapes, simplex
    membership, ``lam >= 0`` and the shared budget rules (``theory.validation.check_budgets``)
    checked; the ``ValueError`` names the problem and the offending value."""
    check_problem(problem)
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
        out.append(check_budgets(problem, budgets, m))
    return out


def check_supports(problem: str, q: np.ndarray, forget: np.ndarray, variant: str = DEFAULT_VARIANT) -> None:
    """Forget supports each problem allows (docs/theory-discrete.md, "supports")."""
    on = q > 0
    if problem == "reverse_kl" or (problem == "likelihood" and variant == "log_likelihood"):
        bad = np.argwhere((forget == 0) & on[None, :])
        if bad.size:
            i, x = bad[0]
            why = ("KL(p||q_i) = +inf for every p using that atom, so p = q meets any budget: RU needs "
                   "supp q inside supp q_i" if problem == "reverse_kl" else
                   "log q_i = -inf there: the log-likelihood variant needs supp q inside supp q_i")
            raise ValueError(f"{problem}: forget[{int(i)}] is 0 at atom {int(x)} where q = {q[x]:.6g} > 0; {why}")
    if problem == "forward_kl":
        bad = np.argwhere((forget > 0) & ~on[None, :])
        if bad.size:
            i, x = bad[0]
            raise ValueError(
                f"{problem}: forget[{int(i)}] has mass {forget[i, x]:.6g} at atom {int(x)} where q = 0; every p with "
                "KL(q||p) < inf may vanish there, making KL(q_i||p) = +inf: FU needs supp q_i inside supp q")


# ---------------------------------------------------------------------------------------------
# divergences, constraint functionals, targets
# ---------------------------------------------------------------------------------------------

def kl(p: ArrayLike, r: ArrayLike) -> float:
    """KL(p||r) = sum p log(p/r), with 0 log 0 = 0 and +inf (never NaN) when supp p is not in supp r."""
    return float(np.sum(rel_entr(np.asarray(p, float), np.asarray(r, float))))


def g_values(q: np.ndarray, forget: np.ndarray, variant: str) -> np.ndarray:
    """LU constraint functionals g_i(x) on all atoms (m, n); entries off supp q are never used."""
    if variant == "likelihood":
        return forget.copy()
    if variant == "log_likelihood":
        with np.errstate(divide="ignore"):
            return np.log(forget)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q[None, :] > 0, forget / np.where(q > 0, q, 1.0)[None, :], 0.0)


def objective_value(problem: str, q: ArrayLike, p: ArrayLike) -> float:
    """KL(p||q) for RU and LU, KL(q||p) for FU."""
    return kl(q, p) if problem == "forward_kl" else kl(p, q)


def constraint_values(problem: str, q: np.ndarray, forget: np.ndarray, p: np.ndarray,
                      variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """(m,) constraint functionals at p: KL(p||q_i) (RU), KL(q_i||p) (FU), E_p[g_i] (LU)."""
    if problem == "reverse_kl":
        return np.array([kl(p, qi) for qi in forget])
    if problem == "forward_kl":
        return np.array([kl(qi, p) for qi in forget])
    g = g_values(q, forget, variant)
    on = p > 0
    return np.array([float(np.dot(p[on], gi[on])) for gi in g])


def violation(problem: str, q: np.ndarray, forget: np.ndarray, p: np.ndarray, budgets: np.ndarray,
              variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """(m,) ``measured - budget`` oriented so that <= 0 is feasible (cooper's convention)."""
    c = constraint_values(problem, q, forget, p, variant)
    return c - budgets if problem == "likelihood" else budgets - c


def lagrangian(problem: str, q: np.ndarray, forget: np.ndarray, p: np.ndarray, lam: np.ndarray,
               budgets: np.ndarray, variant: str = DEFAULT_VARIANT) -> float:
    """L(p, lam) = objective(p) + lam · violation(p) (eqs. 5, 6, 11 and 15 of ``docs/math.md``)."""
    v = violation(problem, q, forget, p, budgets, variant)
    lv = np.where(lam > 0, lam * v, 0.0)
    return objective_value(problem, q, p) + float(np.sum(lv))


def _ru_parts(q, forget):
    on = q > 0
    log_q = np.log(q[on])
    with np.errstate(divide="ignore"):
        log_qi = np.log(forget[:, on])
    return on, log_q, log_qi


def reverse_kl_target(q: ArrayLike, forget: ArrayLike, lam: ArrayLike) -> np.ndarray:
    """RU Lagrangian minimiser argmin_p KL(p||q) - sum lam_i KL(p||q_i) (eqs. 7 and 10 of ``docs/math.md``).

    For Lam = sum(lam) < 1 the tilt ``p ∝ q prod (q/q_i)^eta_i``, ``eta = lam/(1-Lam)``. On a finite
    space the Lagrangian is linear (Lam = 1) or concave (Lam > 1) in p for larger Lam; its minimisers
    then live on ``argmin_x f(x)``, ``f = -log q + sum lam_i log q_i``: for Lam = 1 we return q
    restricted to that set (the limit of the tilt as Lam -> 1-), for Lam > 1 the vertex of that set
    with the largest q. Shapes: q (n,), forget (m, n), lam (m,); returns p (n,).
    """
    q, forget, lam = validate("reverse_kl", q, forget, lam=lam)
    check_supports("reverse_kl", q, forget)
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


def forward_kl_target(q: ArrayLike, forget: ArrayLike, lam: ArrayLike) -> np.ndarray:
    """FU Lagrangian minimiser, the signed mixture ``(q - sum lam_i q_i) / (1 - Lam)`` (eq. 12 of ``docs/math.md``).

    Defined on the dual domain ``q - sum lam_i q_i >= 0`` with Lam < 1; outside it the Lagrangian is
    unbounded below and a ValueError names the most negative entry. Returns p (n,).
    """
    q, forget, lam = validate("forward_kl", q, forget, lam=lam)
    check_supports("forward_kl", q, forget)
    w = q - lam @ forget
    Lam = float(lam.sum())
    if np.any(w < -1e-15) or Lam >= 1.0:
        x = int(np.argmin(w))
        raise ValueError(f"forward_kl: lam = {lam} is outside the dual domain q - sum lam_i q_i >= 0, "
                         f"sum(lam) < 1: min entry {w[x]:.6g} at atom {x}, sum(lam) = {Lam:.6g}")
    return np.maximum(w, 0.0) / (1.0 - Lam)


def likelihood_target(q: ArrayLike, forget: ArrayLike, lam: ArrayLike, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """LU Lagrangian minimiser, the Gibbs tilt ``p ∝ q exp(-sum lam_i g_i)`` (eq. 15 of ``docs/math.md``), with
    ``g_i`` given by ``variant`` (default ``"likelihood"``: g_i = q_i). Returns p (n,)."""
    q, forget, lam = validate("likelihood", q, forget, lam=lam)
    check_variant(variant, "likelihood")
    check_supports("likelihood", q, forget, variant)
    on = q > 0
    g = g_values(q, forget, variant)[:, on]
    logits = np.log(q[on]) - lam @ g
    p = np.zeros_like(q)
    p[on] = np.exp(logits - logsumexp(logits))
    return p


def refine(q: ArrayLike, forget: ArrayLike, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Split every atom into ``cells`` equal cells (q and each q_i uniform inside an atom): the finite
    approximation of a non-atomic base measure used to close RU's gap (eq. 22 of ``docs/math.md``). Returns
    (q (n*cells,), forget (m, n*cells))."""
    q, forget = validate("reverse_kl", q, forget)
    k = int(cells)
    if k != cells or k < 1:
        raise ValueError(f"refine: cells must be a positive integer, got {plain(cells)!r}")
    return np.repeat(q / k, k), np.repeat(forget / k, k, axis=1)
