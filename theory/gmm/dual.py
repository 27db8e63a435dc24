"""Dual functions and dual solutions of RU, FU and LU on Gaussian mixtures (eqs. 9, 13 and 16 of ``docs/math.md``).

For each problem, on the right dual domain:

- RU ``D(lam) = lam·b - (1 - Lam) log Z_lam``, ``Z_lam = int q^(1+H) prod q_i^(-eta_i)``,
  gradient ``b_i - KL(p_lam||q_i)``; domain ``Lam < 1`` and a finite ``Z`` (tails).
- FU ``D(lam) = KL(q||p_lam) - sum lam_i (KL(q_i||p_lam) - b_i)`` with the signed mixture
  ``p_lam``, gradient ``b_i - KL(q_i||p_lam)``; domain ``q - sum lam_i q_i >= 0``.
- LU ``D(lam) = -log E_q[exp(-lam·g)] - lam·eps``, gradient ``E_{p_lam}[g_i] - eps_i``;
  domain ``lam >= 0`` (``"log_likelihood"``: finite normaliser).

``solve`` maximises D (m = 1: a bracketed root of the monotone gradient, to ~1e-14; m > 1:
quasi-Newton then Newton on the active set) and certifies strong duality with the KKT
conditions: the target at lam* is built afresh (its own quadrature), its constraint values and
objective are measured, and ``gap = KL at p_lam* - D(lam*)`` is reported — zero up to
quadrature error when the target is feasible with complementary slackness.

The only case without a KKT certificate is FU with a budget beyond the signed-mixture path
(``b > KL(q_i || p_{lam_max})``): lam* sits on the domain boundary and the primal infimum is
approached (by pushing p towards 0 where ``q - lam_max q_1 ~ 0``) but not attained. For m = 1
``solve`` builds such a feasible p explicitly (``_fu_boundary_feasible``) and returns
``certificate="none"`` with ``primal_value`` = its objective, an upper bound on P*, so
``gap`` is a measured bound on the duality gap (~1e-10 on the default instance); ``info`` says
so. Closed forms for single Gaussians (``gaussian_*``) are the tests' independent oracles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from theory.gmm.mixture import Forget, GaussianMixture, SignedMixture, check_instance, min_log_ratio
from theory.gmm.quadrature import (boundary_log_mass, expectation, grid_for, kl_on_grid, log_integral,
                                   make_grid)
from theory.gmm.targets import (constraint_value, forward_kl_target, likelihood_target, log_tilt_tail_margin,
                                objective_value, reverse_kl_eta_max, reverse_kl_target, tilt_kind, tilt_length_scale,
                                tilt_log_unnorm)
from theory.solution import Solution
from theory.validation import DEFAULT_VARIANT, check_budgets, check_variant

_BOUNDARY_LOG_TOL = -36.0


# ---------------------------------------------------------------------------------------------
# closed forms for single Gaussians (oracles)
# ---------------------------------------------------------------------------------------------


def gaussian_kl(mu0: ArrayLike, S0: ArrayLike, mu1: ArrayLike, S1: ArrayLike) -> float:
    """``KL(N(mu0, S0) || N(mu1, S1))`` in closed form."""
    mu0, mu1 = np.atleast_1d(np.asarray(mu0, float)), np.atleast_1d(np.asarray(mu1, float))
    S0, S1 = np.atleast_2d(np.asarray(S0, float)), np.atleast_2d(np.asarray(S1, float))
    d = mu0.shape[0]
    P1 = np.linalg.inv(S1)
    diff = mu1 - mu0
    return float(0.5 * (np.trace(P1 @ S0) + diff @ P1 @ diff - d
                        + np.linalg.slogdet(S1)[1] - np.linalg.slogdet(S0)[1]))


def gaussian_power_tilt(mu: ArrayLike, S: ArrayLike, mu1: ArrayLike, S1: ArrayLike, a: float,
                        c: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``N(mu,S)^a N(mu1,S1)^(-c)`` integrated and normalised in closed form.

    The exponent is ``-x^T A x / 2 + x^T beta + const`` with ``A = a P - c P1``,
    ``beta = a P mu - c P1 mu1``; returns ``(mean A^-1 beta, cov A^-1, log Z)`` with
    ``log Z = const + beta^T A^-1 beta / 2 + d/2 log 2pi - log|A| / 2``. ``ValueError`` if A is
    not positive definite (the normaliser diverges)."""
    mu, mu1 = np.atleast_1d(np.asarray(mu, float)), np.atleast_1d(np.asarray(mu1, float))
    S, S1 = np.atleast_2d(np.asarray(S, float)), np.atleast_2d(np.asarray(S1, float))
    d = mu.shape[0]
    P, P1 = np.linalg.inv(S), np.linalg.inv(S1)
    A = a * P - c * P1
    ev = np.linalg.eigvalsh(A)
    if ev.min() <= 0:
        raise ValueError(f"power tilt diverges: a P - c P1 has eigenvalue {ev.min():.3g} <= 0")
    beta = a * P @ mu - c * P1 @ mu1
    cov = np.linalg.inv(A)
    mean = cov @ beta
    const = (-0.5 * a * (mu @ P @ mu + np.linalg.slogdet(2 * np.pi * S)[1])
             + 0.5 * c * (mu1 @ P1 @ mu1 + np.linalg.slogdet(2 * np.pi * S1)[1]))
    log_Z = const + 0.5 * beta @ mean + 0.5 * d * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(A)[1]
    return mean, cov, float(log_Z)


def gaussian_reverse_kl_solution(mu: ArrayLike, S: ArrayLike, mu1: ArrayLike, b: float) -> dict:
    """RU with ``q = N(mu, S)``, one forget ``q_1 = N(mu1, S)`` (equal covariances) in closed form.

    The tilt is ``N(mu + eta (mu - mu1), S)``; with ``Delta^2 = (mu - mu1)^T S^-1 (mu - mu1)``,
    ``KL(p_eta||q_1) = (1 + eta)^2 Delta^2 / 2`` and ``KL(p_eta||q) = eta^2 Delta^2 / 2``, so the
    active solution is ``eta* = sqrt(2 b) / Delta - 1``, ``lam* = 1 - Delta / sqrt(2 b)``,
    ``P* = D* = (sqrt(2 b) - Delta)^2 / 2`` (inactive, lam* = 0 and P* = 0, when
    ``b <= Delta^2 / 2``)."""
    mu, mu1 = np.atleast_1d(np.asarray(mu, float)), np.atleast_1d(np.asarray(mu1, float))
    diff = mu - mu1
    delta = float(np.sqrt(diff @ np.linalg.solve(np.atleast_2d(S), diff)))
    if b <= 0.5 * delta ** 2:
        return {"lam": 0.0, "eta": 0.0, "primal_value": 0.0, "mean": mu}
    eta = np.sqrt(2 * b) / delta - 1.0
    return {"lam": 1.0 - delta / np.sqrt(2 * b), "eta": eta,
            "primal_value": 0.5 * (np.sqrt(2 * b) - delta) ** 2, "mean": mu + eta * diff}


# ---------------------------------------------------------------------------------------------
# the dual on a quadrature grid
# ---------------------------------------------------------------------------------------------


class _Quadrature:
    """``log q`` and ``log q_i`` on a grid (d <= 2), re-gridded when a tilt needs a wider box or a
    finer spacing. Stateful cache, private to this module."""

    def __init__(self, q: GaussianMixture, forget):
        self.q, self.forget = q, tuple(forget)
        self._build(grid_for(q, *forget))
        self.n_regrid = 0

    def _build(self, grid):
        self.grid = grid
        self.log_q = self.q.log_prob(grid.nodes)
        self.log_qi = np.stack([f.log_prob(grid.nodes) for f in self.forget])
        self.log_qi_norm = self.log_qi - np.array([log_integral(l, grid) for l in self.log_qi])[:, None]
        self.log_q_norm = self.log_q - log_integral(self.log_q, grid)

    def tilt(self, kind: str, a: float, c: np.ndarray):
        """Normalised ``log p`` on the grid and ``log Z`` of ``exp(a log q - sum c_i h_i)``."""
        h_need = tilt_length_scale(self.q, self.forget, kind, a, c) / 3.0
        for _ in range(10):
            g = self.grid
            if np.max(g.h) > h_need * 1.0001 and np.prod(g.shape) < 590_000:
                self._build(make_grid(g.lo, g.hi, h_need))
                self.n_regrid += 1
                continue
            log_f = tilt_log_unnorm(kind, a, c, self.log_q, self.log_qi)
            if not np.any(np.isfinite(log_f)):
                raise ValueError(f"tilt vanishes on the grid (a={a}, c={np.round(c, 6).tolist()})")
            if boundary_log_mass(log_f, g) < _BOUNDARY_LOG_TOL:
                log_Z = log_integral(log_f, g)
                return log_f - log_Z, log_Z
            w = np.exp(log_f - log_f.max())
            mean = (w @ g.nodes) / w.sum()
            r = 0.5 * (g.hi - g.lo)
            self._build(make_grid(np.minimum(g.lo, mean - 1.6 * r), np.maximum(g.hi, mean + 1.6 * r),
                                  min(np.max(g.h), h_need)))
            self.n_regrid += 1
        raise ValueError(f"the tilt's normaliser appears to diverge (a={a}, c={np.round(c, 6).tolist()}): "
                         "mass keeps reaching the edge of the box")


def _lu_values(kind, log_q, log_qi):
    if kind == "lik":
        return np.exp(log_qi)
    if kind == "log":
        return log_qi
    return np.exp(log_qi - log_q[None])


def _dual_on(quad: _Quadrature, problem: str, lam: np.ndarray, budgets: np.ndarray, variant: str):
    """``(D, grad, P_lam, constraint values)`` at lam on the quadrature; P_lam is the objective at
    the Lagrangian minimiser."""
    g = quad.grid
    if problem == "reverse_kl":
        Lam = float(lam.sum())
        if Lam >= 1:
            raise ValueError(f"reverse_kl dual needs sum(lam) < 1, got {Lam}")
        eta = lam / (1.0 - Lam)
        log_p, log_Z = quad.tilt("log", 1.0 + eta.sum(), eta)
        g = quad.grid
        kl = np.array([kl_on_grid(log_p, l, g) for l in quad.log_qi_norm])
        P = kl_on_grid(log_p, quad.log_q_norm, g)
        D = float(lam @ budgets - (1.0 - Lam) * log_Z)
        return D, budgets - kl, P, kl
    if problem == "forward_kl":
        Lam = float(lam.sum())
        p = SignedMixture(np.concatenate([quad.q.weights] + [-li * f.weights for li, f in zip(lam, quad.forget)])
                          / (1.0 - Lam),
                          np.concatenate([quad.q.means] + [f.means for f in quad.forget]),
                          np.concatenate([quad.q.covs] + [f.covs for f in quad.forget]), check=False)
        with np.errstate(invalid="ignore"):
            log_p = p.log_prob(g.nodes)
        log_p = np.where(np.isnan(log_p), -np.inf, log_p)
        kl = np.array([kl_on_grid(l, log_p, g) for l in quad.log_qi_norm])
        P = kl_on_grid(quad.log_q_norm, log_p, g)
        D = float(P - lam @ (kl - budgets))
        return D, budgets - kl, P, kl
    kind = tilt_kind("likelihood", variant)
    log_p, log_Z = quad.tilt(kind, 1.0, lam)
    g = quad.grid
    vals = expectation(log_p, _lu_values(kind, quad.log_q, quad.log_qi).T, g)
    P = kl_on_grid(log_p, quad.log_q_norm, g)
    D = float(-log_Z - lam @ budgets)
    return D, vals - budgets, P, vals


def dual_function(problem: str, q: GaussianMixture, forget: Forget, lam: ArrayLike, budgets: ArrayLike,
                  variant: str = DEFAULT_VARIANT) -> tuple[float, np.ndarray]:
    """``(D(lam), grad D(lam))`` of ``problem`` (module docstring) by quadrature (d <= 2)."""
    forget, lam = check_instance(q, forget, lam)
    budgets = check_budgets(problem, budgets, len(forget))
    variant = check_variant(variant, problem)
    if q.dim > 2:
        raise ValueError(f"dual_function uses quadrature (d <= 2), got d = {q.dim}")
    D, grad, _, _ = _dual_on(_Quadrature(q, forget), problem, lam, budgets, variant)
    return D, grad


# ---------------------------------------------------------------------------------------------
# solve
# ---------------------------------------------------------------------------------------------


def _lu_infimum(q, f, variant):
    """``inf_x g(x)``, the smallest value ``E_p[g]`` can approach (budgets must exceed it)."""
    if variant == "likelihood":
        return 0.0
    if variant == "log_likelihood":
        return -np.inf
    return float(np.exp(min_log_ratio(f, q)))


def _root(fun, lo, hi, f_lo, f_hi):
    from scipy.optimize import brentq

    return brentq(fun, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=200) if f_lo * f_hi < 0 else (
        lo if f_lo == 0 else hi)


def _solve_1d(quad, problem, q, forget, budgets, variant, info):
    """m = 1: the dual gradient is monotone in the multiplier, so lam* is a bracketed root."""
    b = budgets
    f = forget[0]

    def slack(lam):
        return _dual_on(quad, problem, np.array([lam]), b, variant)[1][0]

    if problem == "reverse_kl":
        eta_max = reverse_kl_eta_max(q, f)
        info["eta_max"] = eta_max
        to_lam = lambda e: e / (1.0 + e)  # noqa: E731
        s0 = slack(0.0)
        if s0 <= 0:
            return np.zeros(1)
        lo, hi = 0.0, 1.0 if np.isinf(eta_max) else 0.5 * eta_max
        s_hi = slack(to_lam(hi))
        k = 0
        while s_hi > 0:
            k += 1
            if k > 60:
                raise ValueError(f"reverse_kl budget {b[0]} not reached for eta up to {hi:.3g}")
            lo = hi
            hi = 2.0 * hi if np.isinf(eta_max) else eta_max * (1.0 - 2.0 ** (-k - 1))
            try:
                s_hi = slack(to_lam(hi))
            except ValueError as e:  # the normaliser blows up before the budget is met
                raise ValueError(f"reverse_kl budget {b[0]} needs eta beyond {lo:.6g}, where the tilt's "
                                 f"normaliser becomes numerically unbounded (eta_max = {eta_max:.6g}): {e}") from None
        eta = _root(lambda e: slack(to_lam(e)), lo, hi, slack(to_lam(lo)), s_hi)
        return np.array([to_lam(eta)])

    if problem == "forward_kl":
        lam_max = float(np.exp(min_log_ratio(q, f)))
        lam_max = min(lam_max, 1.0 - 1e-12)
        info["lam_max"] = lam_max
        s0 = slack(0.0)
        if s0 <= 0:
            return np.zeros(1)
        if lam_max <= 0:
            info["boundary"] = "the FU dual domain is {0}: q - lam q_1 < 0 for every lam > 0"
            return np.zeros(1)
        s_max = slack(lam_max)
        if s_max > 0:
            info["boundary"] = (f"budget {b[0]} exceeds KL(q_1||p) = {b[0] - s_max:.6g} at the domain edge "
                                f"lam_max = {lam_max:.6g}: lam* = lam_max, P* = D* is approached but not attained")
            return np.array([lam_max])
        return np.array([_root(slack, 0.0, lam_max, s0, s_max)])

    # likelihood: the slack E_p[g] - eps decreases in lam
    s0 = slack(0.0)
    if s0 <= 0:
        return np.zeros(1)
    lam_cap = np.inf
    if variant == "log_likelihood":
        margin_1 = log_tilt_tail_margin(q, [f], 1.0, np.array([1.0]))
        lam_cap = np.inf if margin_1 >= 1 else 1.0 / (1.0 - margin_1)
        info["lam_max"] = lam_cap
    lo, hi = 0.0, 1.0 if np.isinf(lam_cap) else 0.5 * lam_cap
    s_hi = slack(hi)
    k = 0
    while s_hi > 0:
        k += 1
        if k > 80:
            raise ValueError(f"likelihood budget {b[0]} not reached for lam up to {hi:.3g}")
        lo = hi
        hi = 4.0 * hi if np.isinf(lam_cap) else lam_cap * (1.0 - 2.0 ** (-k - 1))
        s_hi = slack(hi)
    return np.array([_root(slack, lo, hi, slack(lo), s_hi)])


def _solve_nd(quad, problem, q, forget, budgets, variant, info):
    """m > 1: maximise the concave dual (L-BFGS-B / SLSQP), then Newton on the active set."""
    from scipy.optimize import minimize

    m = len(forget)
    b = budgets

    def neg(lam):
        D, grad, _, _ = _dual_on(quad, problem, lam, b, variant)
        return -D, -grad

    if problem == "reverse_kl":
        def neg_eta(eta):
            H = eta.sum()
            lam = eta / (1.0 + H)
            try:
                nD, ng = neg(lam)
            except ValueError:
                return 1e10, -np.ones(m)
            J = np.eye(m) / (1.0 + H) - eta[:, None] / (1.0 + H) ** 2  # dlam_i/deta_j
            return nD, J.T @ ng
        res = minimize(neg_eta, np.full(m, 0.1), jac=True, method="L-BFGS-B", bounds=[(0, None)] * m,
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 500})
        lam = res.x / (1.0 + res.x.sum())
    elif problem == "forward_kl":
        lam_max = np.array([min(np.exp(min_log_ratio(q, f)), 1.0 - 1e-12) for f in forget])
        info["lam_max"] = lam_max.tolist()

        def margin(lam):  # grid-wise q - sum lam_i q_i >= 0 as min log ratio
            s = np.exp(quad.log_qi - quad.log_q[None]).T @ lam
            return -np.log(max(s.max(), 1e-300))
        cons = [{"type": "ineq", "fun": margin}, {"type": "ineq", "fun": lambda lam: 1.0 - 1e-9 - lam.sum()}]
        res = minimize(neg, 0.5 * lam_max / m, jac=True, method="SLSQP", bounds=[(0, u) for u in lam_max],
                       constraints=cons, options={"ftol": 1e-14, "maxiter": 500})
        lam = np.clip(res.x, 0, lam_max)
    else:
        res = minimize(neg, np.full(m, 1.0), jac=True, method="L-BFGS-B", bounds=[(0, None)] * m,
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000})
        lam = np.maximum(res.x, 0)
    info["optimizer"] = {"nit": int(res.nit), "message": str(res.message)}
    return _newton_polish(quad, problem, lam, b, variant, info)


def _newton_polish(quad, problem, lam, b, variant, info, iters=30):
    """Newton on ``grad_A D = 0`` over the active set A (finite-difference Jacobian)."""
    lam = lam.copy()
    for it in range(iters):
        _, grad, _, _ = _dual_on(quad, problem, lam, b, variant)
        active = (lam > 1e-12) | (grad > 0)
        if not np.any(active) or np.max(np.abs(grad[active])) < 1e-12:
            break
        A = np.flatnonzero(active)
        J = np.empty((A.size, A.size))
        for jj, j in enumerate(A):
            step = 1e-6 * max(1e-3, lam[j])
            lp, lm = lam.copy(), lam.copy()
            lp[j] += step
            lm[j] = max(lm[j] - step, 0.0)
            gp = _dual_on(quad, problem, lp, b, variant)[1]
            gm = _dual_on(quad, problem, lm, b, variant)[1]
            J[:, jj] = (gp[A] - gm[A]) / (lp[j] - lm[j])
        try:
            delta = np.linalg.solve(J, -grad[A])
        except np.linalg.LinAlgError:
            break
        new = lam.copy()
        new[A] = np.maximum(lam[A] + delta, 0.0)
        try:
            _dual_on(quad, problem, new, b, variant)
        except ValueError:
            break
        lam = new
    info["newton_iters"] = it
    return lam


@dataclass(frozen=True, eq=False)
class SuppressedDensity:
    """``p(x) ∝ base(x) exp(-kappa u(x))``, ``u(x) = exp(-|x - centre|^2 / (2 width^2))``: a
    density pushed towards 0 on a small region (FU beyond the signed-mixture path, see
    ``_fu_boundary_feasible``). ``log_normaliser`` by quadrature on ``grid``."""

    base: object
    centre: np.ndarray
    width: float
    kappa: float
    log_normaliser: float

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def min_std(self) -> float:
        return min(self.base.min_std, self.width)

    def box(self, pad: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        return self.base.box(pad)

    def log_prob(self, x: ArrayLike) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        u = np.exp(-0.5 * np.sum((x - self.centre) ** 2, axis=1) / self.width ** 2)
        return self.base.log_prob(x) - self.kappa * u - self.log_normaliser


def _fu_boundary_feasible(q, f, lam_max: float, b: float, width_factor: float = 0.5):
    """An explicit feasible p for FU when ``b`` exceeds the signed-mixture path (m = 1).

    Start from the edge target ``p_e = (q - lam_max q_1)/(1 - lam_max)`` and suppress it on a bump
    of width ``width_factor`` times q_1's smallest sd, centred where ``p_e / q_1`` is smallest
    within q_1's bulk: ``p_kappa ∝ p_e exp(-kappa u)``, with kappa the root of
    ``KL(q_1||p_kappa) = b``. There ``q - lam_max q_1 ~ 0``, so the Lagrangian at lam_max barely
    changes while the constraint is met: ``KL(q||p_kappa)`` is a certified upper bound on P*, and
    ``KL(q||p_kappa) - D(lam_max)`` a measured gap (~1e-10 on the default instance). Returns
    ``(p_kappa, KL(q||p_kappa), KL(q_1||p_kappa))``."""
    from scipy.optimize import brentq

    width = width_factor * f.min_std
    edge = SignedMixture(np.concatenate([q.weights, -lam_max * f.weights]) / (1.0 - lam_max),
                         np.concatenate([q.means, f.means]), np.concatenate([q.covs, f.covs]), check=False)
    g = grid_for(q, f, h_max=min(q.min_std, f.min_std, width) / 3.0)
    X = g.nodes
    with np.errstate(invalid="ignore"):
        lpe = edge.log_prob(X)
    lpe = np.where(np.isnan(lpe), -np.inf, lpe)
    lq1 = f.log_prob(X)
    lq1 = lq1 - log_integral(lq1, g)
    lq = q.log_prob(X)
    lq = lq - log_integral(lq, g)
    bulk = lq1 > lq1.max() - 9.0
    centre = X[bulk][np.argmin((lpe - lq1)[bulk])]
    u = np.exp(-0.5 * np.sum((X - centre) ** 2, axis=1) / width ** 2)

    def log_p(kappa):
        lp = lpe - kappa * u
        return lp - log_integral(lp, g)

    def excess(kappa):
        return kl_on_grid(lq1, log_p(kappa), g) - b

    hi = 1.0
    while excess(hi) < 0:
        hi *= 2.0
        if hi > 1e300:
            raise ValueError("could not build a feasible FU point beyond the path")
    kappa = brentq(excess, 0.0, hi, xtol=1e-12 * hi)
    lp = lpe - kappa * u
    p = SuppressedDensity(edge, centre, width, kappa, log_integral(lp, g))
    lp = log_p(kappa)
    return p, kl_on_grid(lq, lp, g), kl_on_grid(lq1, lp, g)


def solve(problem: str, q: GaussianMixture, forget: Forget, budgets: ArrayLike,
          variant: str = DEFAULT_VARIANT) -> Solution:
    """Dual optimum lam*, D* and a certified primal P* of ``problem`` (``theory.PROBLEMS``) with
    q a ``GaussianMixture`` and ``forget`` a list of m of them, ``budgets`` (m,): RU
    ``KL(p||q_i) >= b_i``, FU ``KL(q_i||p) >= b_i``, LU ``E_p[g_i] <= eps_i`` (``variant``).

    d <= 2 (quadrature). The certificate is KKT: the target at lam* (a ``TiltedMixture`` or
    ``SignedMixture``, or q itself when every constraint is inactive) is feasible with
    complementary slackness to ``1e-7``; then ``primal_value`` is its objective measured on the
    target's own quadrature, ``dual_value`` is D(lam*) from the dual formula, and ``gap`` their
    difference (~1e-10). See the module docstring for FU's boundary case."""
    t0 = time.perf_counter()
    forget, _ = check_instance(q, forget)
    m = len(forget)
    variant = check_variant(variant, problem)
    budgets = check_budgets(problem, budgets, m, variant=variant if problem == "likelihood" else None)
    if q.dim > 2:
        raise ValueError(f"solve on mixtures uses quadrature and needs d <= 2, got d = {q.dim}")
    if problem == "likelihood":
        for i, f in enumerate(forget):
            lo = _lu_infimum(q, f, variant)
            if budgets[i] <= lo:
                raise ValueError(f"likelihood budget eps[{i}] = {budgets[i]:.6g} cannot be met: E_p[g] > "
                                 f"inf g = {lo:.6g} for every p ({variant} variant); choose eps > {lo:.6g}")
    info: dict = {"variant": variant if problem == "likelihood" else None}
    quad = _Quadrature(q, forget)
    if m == 1:
        lam = _solve_1d(quad, problem, q, forget, budgets, variant, info)
    else:
        lam = _solve_nd(quad, problem, q, forget, budgets, variant, info)
    D, grad, P_lam, cons_quad = _dual_on(quad, problem, lam, budgets, variant)
    info["grid_nodes"] = int(quad.grid.nodes.shape[0])
    info["regrids"] = quad.n_regrid
    # the target at lam*, built afresh, measured on its own quadrature
    if np.all(lam == 0):
        p = q
    elif problem == "reverse_kl":
        p = reverse_kl_target(q, forget, lam)
    elif problem == "forward_kl":
        p = forward_kl_target(q, forget, lam)
    else:
        p = likelihood_target(q, forget, lam, variant=variant)
    cons = np.array([constraint_value(problem, p, f, variant=variant, q=q) for f in forget])
    violation = cons - budgets if problem == "likelihood" else budgets - cons
    scale = np.maximum(1.0, np.abs(budgets))
    feas = float(np.max(np.maximum(violation, 0.0) / scale))
    cs = float(np.max(np.abs(lam * violation) / scale))
    stat = float(np.max(np.where(lam > 0, np.abs(grad), np.maximum(grad, 0.0)) / scale))
    kkt = {"feasibility": feas, "complementary_slackness": cs, "dual_stationarity": stat}
    tol = 1e-7
    p_dual = p
    if feas <= tol and cs <= tol and "boundary" not in info:
        certificate = "kkt"
        primal = objective_value(problem, p, q)
    elif problem == "forward_kl" and "boundary" in info and m == 1:
        # no attained optimum: a feasible point whose value sandwiches P* against D*
        certificate = "none"
        p, primal, c1 = _fu_boundary_feasible(q, forget[0], float(lam[0]), float(budgets[0]))
        cons = np.array([c1])
        info["primal_from"] = ("explicit feasible p: the edge signed mixture suppressed on a bump where "
                               "q - lam_max q_1 ~ 0 (P* <= primal_value, D* <= P*)")
    else:
        certificate = "none"
        primal = np.inf
    info["seconds"] = time.perf_counter() - t0
    info["objective_at_p_lam_dual_quadrature"] = P_lam
    return Solution(problem=problem, p=p, lam=lam, primal_value=float(primal), dual_value=float(D),
                    gap=float(primal - D), budgets=budgets, constraint_values=cons, certificate=certificate,
                    p_dual=p_dual, kkt=kkt, info=info)
