"""Unlearning targets on Gaussian mixtures (``docs/math.md`` §2 and §4): the Lagrangian minimiser p_lam of
each problem, at x_0 and through the diffusion process.

- FU (``forward_kl_target``): the signed mixture ``(q - sum lam_i q_i) / (1 - Lam)``, a
  ``SignedMixture``, exact at every noise level (noising is linear in the law).
- RU (``reverse_kl_target``): the tilt ``p ∝ q^(1+H) prod q_i^(-eta_i)``, ``eta = lam/(1-Lam)``,
  ``H = sum eta``. Exact at x_0 (normaliser by quadrature for d <= 2, importance sampling with a
  standard error above). At t > 0, ``.eps`` is the composed-score *surrogate*
  ``eps_q - sum eta_i (eps_{q_i} - eps_q)`` (ESD's form); the exact noised tilt's noise
  prediction is ``.exact_eps`` (Tweedie: ``(x_t - sqrt(ab) E[x_0 | x_t]) / sqrt(1 - ab)`` with
  the posterior mean by quadrature, d <= 2) or ``.posterior_eps`` (through q's Gaussian-mixture
  posterior, Gauss-Hermite, any d).
- LU (``likelihood_target``): the Gibbs tilt ``p ∝ q exp(-sum lam_i g_i)`` for the constraint
  functions ``g_i`` of ``VARIANTS``: ``"likelihood"`` (default) ``g_i = q_i(x)``,
  ``"log_likelihood"`` ``g_i = log q_i(x)``, ``"likelihood_ratio"`` ``g_i = q_i(x) / q(x)``.
  ``.eps`` is the *exact* noised tilt's noise prediction (``posterior_eps``); the same formula
  applied to the noised mixtures is ``.surrogate_eps`` (a poor surrogate, measured).

Every tilt is ``exp(a log q - sum_i c_i h_i(x))`` with ``h_i`` one of ``log q_i``, ``q_i`` or
``q_i / q``; ``tilt_log_unnorm`` writes that once for points and for quadrature grids alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import logsumexp

from theory.diffusion import check_alpha_bar, eps_from_score
from theory.gmm.mixture import Forget, GaussianMixture, SignedMixture, check_instance, tail_rates, unit_directions
from theory.gmm.quadrature import (Grid, boundary_log_mass, expectation, grid_for, importance_log_normaliser,
                                   kl_on_grid, log_integral, make_grid)
from theory.validation import DEFAULT_VARIANT, check_problem, check_variant


#: Boundary cells may hold at most exp(-this) of a tilt's mass before the box is widened.
_BOUNDARY_LOG_TOL = -36.0


# ---------------------------------------------------------------------------------------------
# the tilt formula, once
# ---------------------------------------------------------------------------------------------


def tilt_log_unnorm(kind: str, a: float, c: np.ndarray, log_q: np.ndarray, log_qi: np.ndarray) -> np.ndarray:
    """``a log q - sum_i c_i h_i`` with ``h_i = log q_i`` (kind ``"log"``), ``q_i`` (``"lik"``)
    or ``q_i / q`` (``"ratio"``); ``log_q`` (N,), ``log_qi`` (m, N)."""
    if kind == "log":
        return a * log_q - c @ log_qi
    with np.errstate(over="ignore"):
        h = np.exp(log_qi) if kind == "lik" else np.exp(log_qi - log_q[None])
    with np.errstate(invalid="ignore"):
        out = a * log_q - c @ h
    return np.where(np.isnan(out), -np.inf, out)


def tilt_kind(problem: str, variant: str) -> str:
    if problem == "reverse_kl":
        return "log"
    return {"likelihood": "lik", "log_likelihood": "log", "likelihood_ratio": "ratio"}[variant]


def log_tilt_tail_margin(q: GaussianMixture, forget: Forget, a: float, c: np.ndarray) -> float:
    """``min_v [a rate_q(v) - sum_i c_i rate_i(v)] / rate_q(v)`` over unit directions: the tilt
    ``q^a prod q_i^(-c_i)`` is integrable iff this is > 0 (a tie at 0 is treated as divergent).
    Exact via eigenvalues when every forget mixture is one Gaussian; otherwise by directions
    (d <= 2), or, in d > 2, a sampled necessary check plus the sufficient all-combinations test."""
    d = q.dim
    if all(f.n_components == 1 for f in forget):
        M = a * q.precisions - sum(ci * f.precisions[0] for ci, f in zip(c, forget))
        # generalised eigenvalues of M relative to a q precision give the relative margin
        out = np.inf
        for Mk, Pk in zip(M, q.precisions):
            L = np.linalg.cholesky(Pk)
            Li = np.linalg.inv(L)
            out = min(out, float(np.linalg.eigvalsh(Li @ Mk @ Li.T).min()))
        return out
    v = unit_directions(d)
    rq = tail_rates(q, v)
    margin = float(((a * rq - sum(ci * tail_rates(f, v) for ci, f in zip(c, forget))) / rq).min())
    if d > 2 and margin > 0:
        import itertools

        for Pk in q.precisions:
            for combo in itertools.product(*[range(f.n_components) for f in forget]):
                M = a * Pk - sum(ci * f.precisions[j] for ci, f, j in zip(c, forget, combo))
                if np.linalg.eigvalsh(M).min() <= 0:
                    raise ValueError("cannot certify that the tilt's normaliser is finite in d > 2 "
                                     "for mixture forget sets at these multipliers")
    return margin


def tilt_length_scale(q: GaussianMixture, forget: Forget, kind: str, a: float, c: np.ndarray) -> float:
    """A length below which the tilt ``exp(a log q - sum c_i h_i)`` has no structure: the smallest
    standard deviation of its local Gaussian shapes. For ``log`` tilts with single-Gaussian forget
    sets the curvature at component k is ``a P_k - sum c_i P_i`` (floored at ``P_k``); otherwise
    ``a P_k`` bounds it. ``lik`` tilts add ``c_i peak(q_i) P_i``."""
    lam_max = 0.0
    single = all(f.n_components == 1 for f in forget)
    for Pk in q.precisions:
        top = np.linalg.eigvalsh(Pk).max()
        if kind == "log" and single:
            M = a * Pk - sum(ci * f.precisions[0] for ci, f in zip(c, forget))
            top = max(top, np.linalg.eigvalsh(M).max())
        elif kind == "log" or kind == "ratio":
            top = max(top, a * top) if kind == "log" else top * (1.0 + float(np.sum(c)))
        lam_max = max(lam_max, top)
    if kind == "lik":
        for ci, f in zip(c, forget):
            peak = float(np.exp(f.log_prob(f.means).max()))
            lam_max = max(lam_max, (1.0 + ci * peak) * np.linalg.eigvalsh(f.precisions).max())
    return float(1.0 / np.sqrt(lam_max))


# ---------------------------------------------------------------------------------------------
# tilted mixtures (RU and LU targets)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TiltedMixture:
    """``p(x) = exp(a log q(x) - sum_i c_i h_i(x)) / Z`` (see ``tilt_log_unnorm``), the RU and LU
    targets. Built by ``reverse_kl_target`` / ``likelihood_target``; validated there.

    Attributes: ``problem``, ``variant`` (LU only), ``lam`` (m,), ``a``, ``c`` (m,) (RU:
    ``a = 1 + H``, ``c = eta``; LU: ``a = 1``, ``c = lam``), ``log_normaliser`` ``log Z``,
    ``log_normaliser_se`` (its standard error: 0 for quadrature up to ~1e-12), ``grid`` and
    ``log_p_grid`` (the normalised density on the quadrature grid, d <= 2), ``eps_is_exact``
    (RU False: ``.eps`` is the composed surrogate; LU True: ``.eps`` is the exact noised tilt's).
    ``.score(x, alpha_bar)`` is always the tilt *formula* on the (noised) mixtures: exact at
    ``alpha_bar = 1``, the surrogate's score below (what the surrogate PF-ODE integrates).
    """

    problem: str
    q: GaussianMixture
    forget: tuple
    lam: np.ndarray
    variant: str | None
    a: float
    c: np.ndarray
    rng: np.random.Generator | None = None
    n_importance: int = 200_000
    kind: str = field(init=False)
    grid: Grid | None = field(init=False, repr=False)
    log_p_grid: np.ndarray | None = field(init=False, repr=False)
    log_normaliser: float = field(init=False)
    log_normaliser_se: float = field(init=False)
    eps_is_exact: bool = field(init=False, default=False)

    def __post_init__(self):
        object.__setattr__(self, "kind", tilt_kind(self.problem, self.variant))
        object.__setattr__(self, "eps_is_exact", self.problem == "likelihood")
        if self.dim <= 2:
            grid, log_f = self._fit_grid()
            log_Z = log_integral(log_f, grid)
            object.__setattr__(self, "grid", grid)
            object.__setattr__(self, "log_p_grid", log_f - log_Z)
            object.__setattr__(self, "log_normaliser", log_Z)
            object.__setattr__(self, "log_normaliser_se", 0.0)
        else:
            if not isinstance(self.rng, np.random.Generator):
                raise ValueError("in d > 2 the tilt's normaliser is estimated by importance sampling: "
                                 "pass rng=np.random.Generator")
            prop = self._proposal()
            x = prop.sample(self.n_importance, self.rng)
            log_Z, se = importance_log_normaliser(self.log_unnorm(x) - prop.log_prob(x))
            object.__setattr__(self, "grid", None)
            object.__setattr__(self, "log_p_grid", None)
            object.__setattr__(self, "log_normaliser", log_Z)
            object.__setattr__(self, "log_normaliser_se", se)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.q.dim

    @property
    def min_std(self) -> float:
        """A length scale the tilt does not vary faster than (sets the grid spacing)."""
        return tilt_length_scale(self.q, self.forget, self.kind, self.a, self.c)

    def box(self, pad: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        if self.grid is not None:
            return self.grid.lo, self.grid.hi
        return self.q.box(pad)

    def _fit_grid(self):
        grid = grid_for(self.q, *self.forget, h_max=self.min_std / 3.0)
        lo, hi = grid.lo, grid.hi
        for _ in range(8):
            log_f = self.log_unnorm(grid.nodes)
            if not np.any(np.isfinite(log_f)):
                raise ValueError(f"the {self.problem} tilt vanishes on the whole box at lam={self.lam.tolist()}")
            if boundary_log_mass(log_f, grid) < _BOUNDARY_LOG_TOL:
                return grid, log_f
            r = 0.5 * (hi - lo)
            # widen towards where the mass is: recentre on the tilt's mean, then grow
            w = np.exp(log_f - log_f.max())
            mean = (w @ grid.nodes) / w.sum()
            lo, hi = np.minimum(lo, mean - 1.6 * r), np.maximum(hi, mean + 1.6 * r)
            grid = make_grid(lo, hi, self.min_std / 3.0)
        raise ValueError(f"the {self.problem} tilt's normaliser appears to diverge at lam={self.lam.tolist()}: "
                         f"mass keeps reaching the edge of a box of width {np.max(hi - lo):.3g}")

    def _proposal(self) -> GaussianMixture:
        return GaussianMixture(self.q.weights, self.q.means, 2.0 * self.q.covs)

    # -- density -------------------------------------------------------------------------------

    def _log_parts(self, x, alpha_bar=1.0):
        log_q = self.q.log_prob(x, alpha_bar)
        log_qi = np.stack([f.log_prob(x, alpha_bar) for f in self.forget])
        return log_q, log_qi

    def log_unnorm(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``a log q - sum c_i h_i`` at x (N,) (of the noised mixtures when ``alpha_bar < 1``)."""
        return tilt_log_unnorm(self.kind, self.a, self.c, *self._log_parts(x, alpha_bar))

    def log_prob(self, x: ArrayLike) -> np.ndarray:
        """``log p_lam(x)`` at x_0 (N,)."""
        return self.log_unnorm(x) - self.log_normaliser

    def log_weight(self, x: ArrayLike) -> np.ndarray:
        """``log(p_lam(x) / q(x))`` (N,) at x_0: the importance weight of reweighted denoising score
        matching, ``E_{x_0~q}[w(x_0) ||eps_theta(x_t, t) - z||^2]``, whose minimiser is the exact noised
        tilt's eps at every t (docs/theory-gmm.md §3). LU: ``-lam·g(x) - log Z`` (bounded above by
        ``-log Z`` for the likelihood and ratio variants); RU: ``H log q - sum eta_i log q_i - log Z``."""
        return self.log_prob(x) - self.q.log_prob(x)

    def score(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """The tilt formula's score with the (noised) mixtures' scores, (N, d). Exact at
        ``alpha_bar = 1``; at ``alpha_bar < 1`` it is the composed surrogate of ``eps``.

        RU ``a s_q - sum eta_i s_i``; LU likelihood ``s_q - sum lam_i q_i s_i``; log-likelihood
        ``s_q - sum lam_i s_i``; likelihood ratio ``s_q - sum lam_i (q_i/q)(s_i - s_q)``."""
        s_q = self.q.score(x, alpha_bar)
        out = self.a * s_q
        for ci, f in zip(self.c, self.forget):
            s_i = f.score(x, alpha_bar)
            if self.kind == "log":
                out = out - ci * s_i
            elif self.kind == "lik":
                out = out - ci * np.exp(f.log_prob(x, alpha_bar))[:, None] * s_i
            else:
                rho = np.exp(f.log_prob(x, alpha_bar) - self.q.log_prob(x, alpha_bar))[:, None]
                out = out - ci * rho * (s_i - s_q)
        return out

    def score_divergence(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``tr grad_x score(x, alpha_bar)`` (N,) of the tilt formula (for the ODE's log-density)."""
        out = self.a * self.q.score_divergence(x, alpha_bar)
        if self.kind == "ratio":
            s_q = self.q.score(x, alpha_bar)
            div_q = self.q.score_divergence(x, alpha_bar)
        for ci, f in zip(self.c, self.forget):
            div_i = f.score_divergence(x, alpha_bar)
            if self.kind == "log":
                out = out - ci * div_i
            elif self.kind == "lik":
                s_i = f.score(x, alpha_bar)
                out = out - ci * np.exp(f.log_prob(x, alpha_bar)) * (np.sum(s_i * s_i, axis=1) + div_i)
            else:
                diff = f.score(x, alpha_bar) - s_q
                rho = np.exp(f.log_prob(x, alpha_bar) - self.q.log_prob(x, alpha_bar))
                out = out - ci * rho * (np.sum(diff * diff, axis=1) + div_i - div_q)
        return out

    def surrogate_eps(self, x_t: ArrayLike, alpha_bar: ArrayLike) -> np.ndarray:
        """The tilt formula on the noised mixtures, ``-sqrt(1 - ab) * score(x_t, ab)``: for RU exactly
        ``eps_q - sum eta_i (eps_{q_i} - eps_q)`` (eq. 26 of ``docs/math.md``, ESD's form); for LU
        ``eps_q + lam_i sqrt(1-ab) grad g_{i,t}``. Exact at t = 0 only. For LU's ``"likelihood"``
        variant it is a poor target: ``lam q_{1,t}`` does not fade at high noise and its
        PF-ODE collapses onto a ring around the forget mode (docs/theory-gmm.md)."""
        ab = check_alpha_bar(alpha_bar)
        return eps_from_score(self.score(x_t, ab), ab)

    def eps(self, x_t: ArrayLike, alpha_bar: ArrayLike) -> np.ndarray:
        """The target's noise prediction for training. RU: the composed surrogate
        (``surrogate_eps``, ESD's form, what the paper's RU algorithm trains on; ``eps_is_exact``
        False; ``exact_eps`` gives the exact noised tilt). LU: the exact noised Gibbs tilt via q's
        posterior (``posterior_eps``, Gauss-Hermite, agrees with the grid ``exact_eps`` to ~1e-5;
        ``eps_is_exact`` True). ``alpha_bar`` scalar or (N,)."""
        if self.problem == "reverse_kl":
            return self.surrogate_eps(x_t, alpha_bar)
        ab = check_alpha_bar(alpha_bar)
        x_t = self.q.check_x(x_t)
        if ab.ndim == 0:
            return self.posterior_eps(x_t, float(ab))
        out = np.empty_like(x_t)
        for v in np.unique(ab):  # group points that share a noise level
            idx = ab == v
            out[idx] = self.posterior_eps(x_t[idx], float(v))
        return out

    def exact_eps(self, x_t: ArrayLike, alpha_bar: ArrayLike, n_local: int = 96, chunk: int = 64) -> np.ndarray:
        """Exact noise prediction of the *noised tilt* (d <= 2), by Tweedie's formula
        ``(x_t - sqrt(ab) E[x_0|x_t]) / sqrt(1 - ab)``; the posterior
        ``∝ p_lam(x_0) N(x_0; x_t/sqrt(ab), sigma0^2 I)``, ``sigma0^2 = (1 - ab)/ab``, is
        integrated by the midpoint rule on a window ``+-8 sigma0`` around ``x_t/sqrt(ab)``
        clipped to the tilt's box, ``n_local`` nodes per axis."""
        if self.grid is None:
            raise ValueError("exact_eps needs quadrature (d <= 2)")
        x_t = self.q.check_x(x_t)
        ab = np.broadcast_to(check_alpha_bar(alpha_bar), (x_t.shape[0],)).astype(float)
        out = np.empty_like(x_t)
        one = ab >= 1.0
        if np.any(one):  # at t = 0 the noise prediction is 0 * score
            out[one] = 0.0
        idx = np.flatnonzero(~one)
        lo_b, hi_b = self.grid.lo, self.grid.hi
        u = (np.arange(n_local) + 0.5) / n_local
        U = np.stack(np.meshgrid(*[u] * self.dim, indexing="ij"), -1).reshape(-1, self.dim)  # (n^d, d) in [0,1]
        for s in range(0, idx.size, chunk):
            j = idx[s:s + chunk]
            sq = np.sqrt(ab[j])[:, None]
            sig0 = np.sqrt((1.0 - ab[j]) / ab[j])[:, None]
            m = x_t[j] / sq
            lo = np.clip(m - 8 * sig0, lo_b, hi_b)
            hi = np.clip(m + 8 * sig0, lo_b, hi_b)
            short = (hi - lo) < 1e-9 * (hi_b - lo_b)
            lo = np.where(short, lo_b, lo)
            hi = np.where(short, hi_b, hi)
            X = lo[:, None] + (hi - lo)[:, None] * U[None]  # (c, n^d, d)
            flat = X.reshape(-1, self.dim)
            lp = self.log_unnorm(flat).reshape(X.shape[:2])
            lk = -0.5 * np.sum((X - m[:, None]) ** 2, axis=2) / sig0 ** 2
            lw = lp + lk + np.sum(np.log(hi - lo), axis=1, keepdims=True)
            w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
            x0 = np.einsum("cn,cnd->cd", w, X)
            out[j] = (x_t[j] - sq * x0) / np.sqrt(1.0 - ab[j])[:, None]
        return out

    def posterior_eps(self, x_t: ArrayLike, alpha_bar: ArrayLike, n_gh: int = 24) -> np.ndarray:
        """Exact noise prediction of the noised tilt through q's exact posterior (any d, cost
        ``K n_gh^d`` tilt evaluations per point): ``q(x_0 | x_t)`` is a Gaussian mixture with
        weights ``pi_k ∝ w_k N(x_t; sqrt(ab) mu_k, ab S_k + (1-ab) I)``, means
        ``m_k = mu_k + sqrt(ab) S_k A_k^-1 (x_t - sqrt(ab) mu_k)`` and covariances
        ``C_k = S_k - ab S_k A_k^-1 S_k`` (``A_k = ab S_k + (1-ab) I``); then
        ``E_p[x_0|x_t] = E_q[w x_0 | x_t] / E_q[w | x_t]`` with ``w = p_lam / q`` (up to Z), each
        Gaussian expectation by tensor Gauss-Hermite quadrature in C_k's eigenbasis. Accurate when
        w is smooth on the posterior's scale — LU's bounded weights ``exp(-lam g)``; for RU's
        unbounded ``(q/q_1)^eta`` prefer ``exact_eps`` (checked against each other in the tests)."""
        x_t = self.q.check_x(x_t)
        ab = float(check_alpha_bar(alpha_bar))
        d, q = self.dim, self.q
        if ab >= 1.0:
            return np.zeros_like(x_t)
        z, wz = np.polynomial.hermite_e.hermegauss(n_gh)  # nodes for N(0, 1)
        Z = np.stack(np.meshgrid(*[z] * d, indexing="ij"), -1).reshape(-1, d)  # (G, d)
        logWz = np.sum(np.log(np.stack(np.meshgrid(*[wz] * d, indexing="ij"), -1).reshape(-1, d)), axis=1)
        logWz = logWz - logsumexp(logWz)
        num = np.zeros((x_t.shape[0], d))
        log_terms = []
        acc = []
        eye = np.eye(d)
        for k in range(q.n_components):
            S_k, mu_k = q.covs[k], q.means[k]
            A = ab * S_k + (1.0 - ab) * eye
            G = np.linalg.solve(A, S_k).T  # S_k A^-1
            m = mu_k + np.sqrt(ab) * (x_t - np.sqrt(ab) * mu_k) @ G.T  # (N, d)
            C = S_k - ab * G @ S_k
            C = 0.5 * (C + C.T)
            ev, U = np.linalg.eigh(C)
            L = U * np.sqrt(np.maximum(ev, 0.0))
            X0 = m[:, None, :] + (Z @ L.T)[None]  # (N, G, d)
            flat = X0.reshape(-1, d)
            lw = (self.log_unnorm(flat) - q.log_prob(flat)).reshape(X0.shape[:2]) + logWz[None]
            log_pi = np.log(q.weights[k]) + GaussianMixture([1.0], [np.sqrt(ab) * mu_k], [A]).log_prob(x_t)
            log_terms.append(log_pi[:, None] + lw)  # (N, G)
            acc.append(X0)
        LT = np.concatenate(log_terms, axis=1)
        W = np.exp(LT - logsumexp(LT, axis=1, keepdims=True))
        num = np.einsum("ng,ngd->nd", W, np.concatenate(acc, axis=1))
        return (x_t - np.sqrt(ab) * num) / np.sqrt(1.0 - ab)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` samples (n, d). d <= 2: exact rejection sampling from the piecewise-constant
        density on the quadrature grid (proposal a grid cell, then a uniform point in it; accept
        with ``p(x) / (C p(cell centre))``, ``C`` checked a posteriori). d > 2: sampling-
        importance-resampling from the importance proposal (asymptotically exact)."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        n = int(n)
        if self.grid is None:
            prop = self._proposal()
            x = prop.sample(20 * n, rng)
            lw = self.log_unnorm(x) - prop.log_prob(x)
            w = np.exp(lw - logsumexp(lw))
            return x[rng.choice(x.shape[0], size=n, p=w)]
        g = self.grid
        p_cell = np.exp(self.log_p_grid + g.log_vol)
        p_cell = p_cell / p_cell.sum()
        C = 1.5
        while True:
            out, log_ratio_max = [], -np.inf
            have = 0
            while have < n:
                k = max(64, int(1.2 * C * (n - have)))
                cell = rng.choice(p_cell.size, size=k, p=p_cell)
                x = g.nodes[cell] + (rng.random((k, self.dim)) - 0.5) * g.h
                lr = self.log_prob(x) - self.log_p_grid[cell] - np.log(C)
                log_ratio_max = max(log_ratio_max, float(lr.max()))
                acc = np.log(rng.random(k)) < lr
                out.append(x[acc])
                have += int(acc.sum())
            if log_ratio_max <= 0.0:
                return np.concatenate(out)[:n]
            C *= 2.0 * np.exp(log_ratio_max)

    # -- expectations --------------------------------------------------------------------------

    def expect(self, fn: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator | None = None, n: int = 200_000) -> np.ndarray:
        """``E_p[fn(x)]`` by quadrature (d <= 2) or self-normalised importance sampling."""
        if self.grid is not None:
            return expectation(self.log_p_grid, fn(self.grid.nodes), self.grid)
        if not isinstance(rng, np.random.Generator):
            raise ValueError("in d > 2 expectations use importance sampling: pass rng")
        prop = self._proposal()
        x = prop.sample(n, rng)
        lw = self.log_unnorm(x) - prop.log_prob(x)
        w = np.exp(lw - logsumexp(lw))
        return np.tensordot(w, fn(x), axes=(0, 0))



#: A density the constraint and objective functionals accept.
Density = GaussianMixture | SignedMixture | TiltedMixture

# ---------------------------------------------------------------------------------------------
# the three targets
# ---------------------------------------------------------------------------------------------


def reverse_kl_target(q: GaussianMixture, forget: Forget, lam: ArrayLike,
                      rng: np.random.Generator | None = None) -> TiltedMixture:
    """RU Lagrangian minimiser (eq. 7 of ``docs/math.md``):
    ``p_lam ∝ q prod (q/q_i)^eta_i = q^(1+H) prod q_i^(-eta_i)``,
    ``eta_i = lam_i / (1 - Lam)``, ``H = sum eta``. Needs ``Lam = sum lam < 1`` and a finite
    normaliser: ``(1 + H) rate_q(v) > sum eta_i rate_i(v)`` along every direction (a forget
    Gaussian narrower than q caps eta). ``ValueError`` naming the bound otherwise.
    ``rng`` is needed only in d > 2 (importance-sampled normaliser)."""
    forget, lam = check_instance(q, forget, lam)
    Lam = float(lam.sum())
    if Lam >= 1.0:
        raise ValueError(f"reverse_kl target needs sum(lam) < 1, got {Lam:.6g} (D = -inf beyond on a "
                         "non-atomic space)")
    eta = lam / (1.0 - Lam)
    a = 1.0 + float(eta.sum())
    margin = log_tilt_tail_margin(q, forget, a, eta)
    if margin <= 0:
        cap = ""
        if len(forget) == 1 and (q.dim <= 2 or forget[0].n_components == 1):
            e_max = reverse_kl_eta_max(q, forget[0])
            cap = f"; the tilt exists for eta < {e_max:.6g}, i.e. lam < {e_max / (1 + e_max):.6g}"
        raise ValueError(f"reverse_kl tilt at lam={lam.tolist()} (eta={eta.tolist()}) has an infinite "
                         f"normaliser: a forget Gaussian is narrower than q^(1+H)/q_i^eta allows "
                         f"(relative tail margin {margin:.3g} <= 0){cap}")
    return TiltedMixture("reverse_kl", q, forget, lam, None, a, eta, rng=rng)


def reverse_kl_eta_max(q: GaussianMixture, forget_i: GaussianMixture) -> float:
    """Largest ``eta`` (m = 1) with a finite RU normaliser: ``sup{eta: (1+eta) rate_q > eta rate_1}``
    (``inf`` when no forget component is narrower than q in any direction)."""
    if forget_i.n_components == 1:
        out = np.inf
        for Pk in q.precisions:
            L = np.linalg.cholesky(Pk)
            Li = np.linalg.inv(L)
            mu = np.linalg.eigvalsh(Li @ (forget_i.precisions[0] - Pk) @ Li.T).max()
            if mu > 0:
                out = min(out, 1.0 / mu)
        return float(out)
    if q.dim > 2:
        raise ValueError("eta_max for mixture forget sets is computed for d <= 2 only")
    v = unit_directions(q.dim)
    rq, r1 = tail_rates(q, v), tail_rates(forget_i, v)
    pos = r1 > rq
    return float(np.min(rq[pos] / (r1[pos] - rq[pos]))) if np.any(pos) else np.inf


def forward_kl_target(q: GaussianMixture, forget: Forget, lam: ArrayLike) -> SignedMixture:
    """FU Lagrangian minimiser (eq. 12 of ``docs/math.md``): the signed mixture ``(q - sum lam_i q_i) / (1 - Lam)``,
    exact at every noise level. ``ValueError`` outside the dual domain ``q - sum lam_i q_i >= 0``."""
    forget, lam = check_instance(q, forget, lam)
    Lam = float(lam.sum())
    if Lam >= 1.0:
        raise ValueError(f"forward_kl target needs sum(lam) < 1, got {Lam:.6g}")
    w = [q.weights / (1.0 - Lam)] + [-li * f.weights / (1.0 - Lam) for li, f in zip(lam, forget)]
    mu = [q.means] + [f.means for f in forget]
    cov = [q.covs] + [f.covs for f in forget]
    try:
        return SignedMixture(np.concatenate(w), np.concatenate(mu), np.concatenate(cov))
    except ValueError as e:
        raise ValueError(f"forward_kl target at lam={lam.tolist()} is outside the dual domain "
                         f"q - sum lam_i q_i >= 0: {e}") from None


def likelihood_target(q: GaussianMixture, forget: Forget, lam: ArrayLike, variant: str = DEFAULT_VARIANT,
                      rng: np.random.Generator | None = None) -> TiltedMixture:
    """LU Lagrangian minimiser (eq. 15 of ``docs/math.md``): the Gibbs tilt ``p_lam ∝ q exp(-sum lam_i g_i)`` with
    ``g_i`` of ``variant`` (``VARIANTS``; default ``"likelihood"``, ``g_i = q_i``). All lam >= 0
    are allowed except for ``"log_likelihood"``, whose tilt ``q prod q_i^(-lam_i)`` needs
    ``rate_q > sum lam_i rate_i`` along every direction."""
    forget, lam = check_instance(q, forget, lam)
    variant = check_variant(variant)
    if variant == "log_likelihood":
        margin = log_tilt_tail_margin(q, forget, 1.0, lam)
        if margin <= 0:
            raise ValueError(f"likelihood (log_likelihood) tilt at lam={lam.tolist()} has an infinite "
                             f"normaliser (relative tail margin {margin:.3g} <= 0)")
    return TiltedMixture("likelihood", q, forget, lam, variant, 1.0, lam.copy(), rng=rng)


def target(problem: str, q: GaussianMixture, forget: Forget, lam: ArrayLike, variant: str = DEFAULT_VARIANT,
           rng: np.random.Generator | None = None) -> TiltedMixture | SignedMixture:
    """Dispatch to the problem's target."""
    check_problem(problem)
    if problem == "reverse_kl":
        return reverse_kl_target(q, forget, lam, rng=rng)
    if problem == "forward_kl":
        return forward_kl_target(q, forget, lam)
    return likelihood_target(q, forget, lam, variant=variant, rng=rng)


# ---------------------------------------------------------------------------------------------
# constraint functionals
# ---------------------------------------------------------------------------------------------


def constraint_function(forget_i: GaussianMixture, variant: str = DEFAULT_VARIANT,
                        q: GaussianMixture | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The LU constraint function ``g_i(x)`` of ``variant`` as a callable on (N, d) points."""
    variant = check_variant(variant)
    if variant == "likelihood":
        return lambda x: np.exp(forget_i.log_prob(x))
    if variant == "log_likelihood":
        return forget_i.log_prob
    if q is None:
        raise ValueError("the likelihood_ratio variant needs q")
    return lambda x: np.exp(forget_i.log_prob(x) - q.log_prob(x))


def _log_prob_on(p, x):
    return p.log_prob(x)


def constraint_value(problem: str, p: Density, forget_i: GaussianMixture, variant: str = DEFAULT_VARIANT,
                     q: GaussianMixture | None = None, rng: np.random.Generator | None = None,
                     n_mc: int = 400_000) -> float:
    """The constraint functional of ``problem`` at the distribution ``p`` (a ``GaussianMixture``,
    ``SignedMixture`` or ``TiltedMixture``): RU ``KL(p||q_i)``, FU ``KL(q_i||p)``, LU ``E_p[g_i]``.
    Quadrature for d <= 2 (on a grid holding both), Monte Carlo with ``rng`` above."""
    check_problem(problem)
    if not isinstance(forget_i, GaussianMixture):
        raise ValueError(f"forget_i must be a GaussianMixture, got {type(forget_i).__name__}")
    if forget_i.dim != p.dim:
        raise ValueError(f"forget_i has dimension {forget_i.dim}, p has {p.dim}")
    if p.dim <= 2:
        if isinstance(p, TiltedMixture) and problem != "forward_kl":
            grid, log_p = p.grid, p.log_p_grid
        else:
            grid = grid_for(p, forget_i)
            log_p = _log_prob_on(p, grid.nodes)
        if problem == "reverse_kl":
            return kl_on_grid(log_p, forget_i.log_prob(grid.nodes), grid)
        if problem == "forward_kl":
            return kl_on_grid(forget_i.log_prob(grid.nodes), log_p, grid)
        return float(expectation(log_p, constraint_function(forget_i, variant, q)(grid.nodes), grid))
    if not isinstance(rng, np.random.Generator):
        raise ValueError("in d > 2 constraint values are Monte Carlo estimates: pass rng")
    if problem == "forward_kl":
        x = forget_i.sample(n_mc, rng)
        return float(np.mean(forget_i.log_prob(x) - p.log_prob(x)))
    if isinstance(p, TiltedMixture):
        if problem == "reverse_kl":
            return float(p.expect(lambda x: p.log_prob(x) - forget_i.log_prob(x), rng=rng, n=n_mc))
        return float(p.expect(constraint_function(forget_i, variant, q), rng=rng, n=n_mc))
    x = p.sample(n_mc, rng)
    if problem == "reverse_kl":
        return float(np.mean(p.log_prob(x) - forget_i.log_prob(x)))
    return float(np.mean(constraint_function(forget_i, variant, q)(x)))


def objective_value(problem: str, p: Density, q: GaussianMixture, rng: np.random.Generator | None = None,
                    n_mc: int = 400_000) -> float:
    """The objective at p: ``KL(p||q)`` (RU, LU) or ``KL(q||p)`` (FU)."""
    if problem == "forward_kl":
        return constraint_value("forward_kl", p, q, rng=rng, n_mc=n_mc)
    return constraint_value("reverse_kl", p, q, rng=rng, n_mc=n_mc)
