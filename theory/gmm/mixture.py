"""Gaussian mixtures under the diffusion process (``docs/math.md``): exact densities, scores and
noise predictions at every noise level, signed mixtures (the FU target), the default instance and
the validation of an instance. The lowest module of ``theory.gmm``: it imports none of the others.

A mixture ``sum_k w_k N(mu_k, Sigma_k)`` noised by the VP process is the mixture
``sum_k w_k N(sqrt(ab) mu_k, ab Sigma_k + (1 - ab) I)``. With ``Sigma_k = U_k diag(s_k) U_k^T``
the noised covariance is ``U_k diag(ab s_k + 1 - ab) U_k^T``, so one eigendecomposition serves
every time, and a batch with a different ``alpha_bar`` per sample costs no more than one time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from theory.diffusion import check_alpha_bar, eps_from_score

__all__ = ["GaussianMixture", "SignedMixture", "Forget", "min_log_ratio", "default_instance", "check_instance",
           "tail_rates", "unit_directions"]

_LOG_2PI = np.log(2.0 * np.pi)


def _mixture_arrays(weights, means, covs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(weights (K,), means (K, d), covs (K, d, d))`` with shapes and finiteness checked
    (a single component may be given as a (d,) mean and (d, d) covariance); ``ValueError`` names
    the offending array. Shared by ``GaussianMixture`` and ``SignedMixture``."""
    w = np.atleast_1d(np.asarray(weights, dtype=np.float64))
    mu = np.asarray(means, dtype=np.float64)
    cov = np.asarray(covs, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {w.shape}")
    K = w.shape[0]
    if mu.ndim == 1 and K == 1:
        mu = mu[None]
    if mu.ndim != 2 or mu.shape[0] != K:
        raise ValueError(f"means must have shape ({K}, d), got {mu.shape}")
    d = mu.shape[1]
    if cov.ndim == 2 and K == 1:
        cov = cov[None]
    if cov.shape != (K, d, d):
        raise ValueError(f"covs must have shape ({K}, {d}, {d}), got {cov.shape}")
    for name, a in (("weights", w), ("means", mu), ("covs", cov)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {a[~np.isfinite(a)][:3].tolist()}")
    return w, mu, cov


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covs[k])`` in d dimensions, float64, validated.

    weights: (K,) positive, summing to 1; means: (K, d); covs: (K, d, d) symmetric positive
    definite. Raises ``ValueError`` naming the offending value otherwise.
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    _eig_vals: np.ndarray = field(init=False, repr=False, compare=False)
    _eig_vecs: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        w, mu, cov = _mixture_arrays(self.weights, self.means, self.covs)
        if np.any(w <= 0):
            raise ValueError(f"weights must be positive, got {w.tolist()}")
        if abs(w.sum() - 1.0) > 1e-8:
            raise ValueError(f"weights must sum to 1, got {w.sum():.12g}")
        asym = np.abs(cov - np.swapaxes(cov, 1, 2)).max()
        if asym > 1e-9 * max(1.0, np.abs(cov).max()):
            raise ValueError(f"covs must be symmetric, got asymmetry {asym:.3g}")
        vals, vecs = np.linalg.eigh(0.5 * (cov + np.swapaxes(cov, 1, 2)))
        if np.any(vals <= 0):
            k = int(np.argmin(vals.min(axis=1)))
            raise ValueError(f"covs must be positive definite: component {k} has eigenvalue {vals[k].min():.3g}")
        for name, a in (("weights", w), ("means", mu), ("covs", cov)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "_eig_vals", vals)
        object.__setattr__(self, "_eig_vecs", vecs)

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    #: ``eps`` is exact at every noise level (same flag as the unlearning targets carry).
    eps_is_exact = True

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1 and self.dim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            bad = x[~np.isfinite(x)][:3].tolist()
            raise ValueError(f"x must be finite, got {bad}")
        return x

    def _terms(self, x, alpha_bar=1.0, keep_components: bool = False, need_score: bool = True):
        """One pass over the components of the mixture noised to ``alpha_bar`` (scalar or (N,)).

        Returns ``log_terms`` (N, K) = ``log w_k + log N_k(x)``, ``log p`` (N,), ``r`` (N, K)
        responsibilities, the mixture score (N, d) and, if ``keep_components``, the component
        scores (N, K, d) and the traces of the noised precisions (N or 1, K). In each eigenbasis
        ``y = U_k^T (x - sqrt(ab) mu_k)``, ``var = ab s_k + 1 - ab``, so one matrix product per
        component does the work; arrays are laid out (d, N) and (K, N) so that every reduction
        runs over the short axis (several times faster than (N, K) reductions in numpy).
        """
        x = self._check_x(x)
        ab = check_alpha_bar(alpha_bar)
        N, K, d = x.shape[0], self.n_components, self.dim
        if ab.ndim == 1 and ab.shape[0] != N:
            raise ValueError(f"alpha_bar has {ab.shape[0]} entries for {N} points")
        per_point = ab.ndim == 1
        ab_c = ab[None, :] if per_point else ab  # broadcast against (d, N)
        sq = np.sqrt(ab_c)
        X = np.ascontiguousarray(x.T)  # (d, N)
        log_w = np.log(self.weights)
        log_terms = np.empty((K, N))
        zs = []
        tr_prec = np.empty((K, N if per_point else 1))
        for k in range(K):
            U = self._eig_vecs[k]
            var = ab_c * self._eig_vals[k][:, None] + (1.0 - ab_c)  # (d, 1) or (d, N)
            if per_point:  # rotate into the eigenbasis, where the noised precision is diagonal
                Y = U.T @ X - sq * (self.means[k] @ U)[:, None]
                Z = Y / var
            else:  # one precision for all points: P (x - sqrt(ab) mu) in one product, no rotation back
                Y = X - sq * self.means[k][:, None]
                Z = ((U / var[:, 0]) @ U.T) @ Y  # already the component's score (negated)
            maha = (Y * Z).sum(axis=0) if d > 1 else (Y * Z)[0]
            logdet = np.log(var).sum(axis=0)
            log_terms[k] = (log_w[k] - 0.5 * d * _LOG_2PI) - 0.5 * (maha + logdet)
            zs.append(Z)
            tr_prec[k] = (1.0 / var).sum(axis=0)
        m = log_terms.max(axis=0)
        e = np.exp(log_terms - m)
        tot = e.sum(axis=0)
        r = e / tot
        log_p = m + np.log(tot)
        if not (need_score or keep_components):
            return log_terms.T, log_p, r.T, None, None, tr_prec.T
        S = np.zeros((d, N))
        comp = np.empty((N, K, d)) if keep_components else None
        for k in range(K):
            s_k = self._eig_vecs[k] @ zs[k] if per_point else zs[k]  # Sigma_k(ab)^{-1} (x - sqrt(ab) mu_k)
            S -= r[k] * s_k
            if keep_components:
                comp[:, k] = -s_k.T
        return log_terms.T, log_p, r.T, S.T, comp, tr_prec.T

    def _component_terms(self, x, alpha_bar=1.0):
        """Per-component ``log w_k + log N_k(x)`` (N, K) and scores ``-Sigma_k^{-1}(x - mu_k)``
        (N, K, d) of the mixture noised to ``alpha_bar`` (scalar or (N,))."""
        log_terms, _, _, _, comp, _ = self._terms(x, alpha_bar, keep_components=True)
        return log_terms, comp

    def log_prob(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``log p_t(x)`` (N,) of the mixture noised to ``alpha_bar`` (1 = the data law)."""
        return self._terms(x, alpha_bar, need_score=False)[1]

    def score(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``grad_x log p_t(x)`` (N, d): responsibilities times component scores."""
        return self._terms(x, alpha_bar)[3]

    def responsibilities(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``r_k(x) = w_k N_k(x) / p_t(x)`` (N, K): the posterior probability of each component."""
        return self._terms(x, alpha_bar, need_score=False)[2]

    def check_x(self, x: ArrayLike) -> np.ndarray:
        """``x`` as a float64 (N, d) array of finite points (a vector when d = 1); ``ValueError`` otherwise."""
        return self._check_x(x)

    def score_divergence(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``tr grad_x score = Laplacian log p_t`` (N,): ``sum_k r_k (|s_k|^2 - tr P_k) - |s|^2`` with
        responsibilities r_k, component scores s_k and noised precisions P_k (for the
        probability-flow ODE's change of log-density)."""
        _, _, r, s, comp, tr_prec = self._terms(x, alpha_bar, keep_components=True)
        return np.sum(r * (np.sum(comp ** 2, axis=2) - tr_prec), axis=1) - np.sum(s * s, axis=1)

    def eps(self, x_t: ArrayLike, alpha_bar: ArrayLike) -> np.ndarray:
        """Exact noise prediction ``E[z | x_t] = -sqrt(1 - alpha_bar) grad log p_t(x_t)`` (N, d)."""
        ab = check_alpha_bar(alpha_bar)
        return eps_from_score(self.score(x_t, ab), ab)

    def noised(self, alpha_bar: float) -> "GaussianMixture":
        """The marginal at ``alpha_bar``: ``N(sqrt(ab) mu_k, ab Sigma_k + (1 - ab) I)``."""
        ab = float(check_alpha_bar(alpha_bar))
        eye = np.eye(self.dim)
        return GaussianMixture(self.weights, np.sqrt(ab) * self.means, ab * self.covs + (1.0 - ab) * eye)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` samples (n, d); ``rng`` is an explicit ``np.random.Generator``."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        k = rng.choice(self.n_components, size=int(n), p=self.weights)
        z = rng.standard_normal((int(n), self.dim))
        L = self._eig_vecs * np.sqrt(self._eig_vals)[:, None, :]  # Sigma_k = L L^T
        return self.means[k] + np.einsum("nde,ne->nd", L[k], z)

    # -- helpers shared by signed mixtures, tilts and quadrature (not part of the public API) --

    @property
    def precisions(self) -> np.ndarray:
        """(K, d, d) inverse covariances."""
        return np.einsum("kde,ke,kfe->kdf", self._eig_vecs, 1.0 / self._eig_vals, self._eig_vecs)

    def box(self, pad: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """An axis-aligned box ``mu_k +- pad * sd_k`` around every component (lo (d,), hi (d,))."""
        sd = np.sqrt(np.einsum("kdd->kd", self.covs))
        return (self.means - pad * sd).min(axis=0), (self.means + pad * sd).max(axis=0)

    @property
    def min_std(self) -> float:
        """The smallest standard deviation of any component along any direction."""
        return float(np.sqrt(self._eig_vals.min()))


# ---------------------------------------------------------------------------------------------
# Signed mixtures (the forward-KL target, eq. 12 of docs/math.md, noised by linearity, §4)
# ---------------------------------------------------------------------------------------------


def tail_rates(mix: GaussianMixture, v: np.ndarray) -> np.ndarray:
    """``min_k v^T Sigma_k^{-1} v`` for unit directions v (n, d): the quadratic decay rate of the
    mixture along each ray (its log-density is ``-r^2/2 * rate + O(r)``)."""
    return np.einsum("nd,kde,ne->nk", v, mix.precisions, v).min(axis=1)


def unit_directions(d: int, n: int = 2048, rng: np.random.Generator | None = None) -> np.ndarray:
    if d == 1:
        return np.ones((1, 1))
    if d == 2:
        th = np.linspace(0.0, np.pi, n, endpoint=False)
        return np.stack([np.cos(th), np.sin(th)], axis=1)
    v = (rng or np.random.default_rng(0)).standard_normal((8 * n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def min_log_ratio(num: GaussianMixture, den: GaussianMixture) -> float:
    """``inf_x [log num(x) - log den(x)]`` for two normalised mixtures (may be ``-inf``).

    Tails first: along a ray the log-ratio is ``-r^2/2 (rate_num - rate_den) + O(r)``, so if the
    denominator decays strictly slower in some direction the infimum is ``-inf``. Then a
    multi-start quasi-Newton search from every component mean (and, for d <= 2, the best points
    of a grid), plus far points along every ray, where the infimum may only be approached. In
    d > 2 the tail test samples directions and, when no slower direction is found, additionally
    requires the sufficient condition "every denominator precision dominates some numerator
    precision"; otherwise a ``ValueError`` says the tails cannot be certified.
    """
    from scipy.optimize import minimize

    if num.dim != den.dim:
        raise ValueError(f"dimension mismatch: {num.dim} vs {den.dim}")
    d = num.dim
    v = unit_directions(d)
    gap = tail_rates(num, v) - tail_rates(den, v)
    scale = max(np.abs(tail_rates(num, v)).max(), 1e-300)
    if np.any(gap > 1e-9 * scale):
        return -np.inf
    if d > 2:
        P_num, P_den = num.precisions, den.precisions
        ok = all(any(np.linalg.eigvalsh(Pj - Pk).min() >= -1e-12 for Pk in P_num) for Pj in P_den)
        if not ok:
            raise ValueError("cannot certify the tails of num/den in d > 2: no numerator "
                             "component is wider than every denominator component")

    def f(x):
        x = x[None]
        return float(num.log_prob(x)[0] - den.log_prob(x)[0])

    def g(x):
        x = x[None]
        return (num.score(x) - den.score(x))[0]

    starts = [m for m in den.means] + [m for m in num.means]
    lo = np.minimum(num.box(6.0)[0], den.box(6.0)[0])
    hi = np.maximum(num.box(6.0)[1], den.box(6.0)[1])
    if d <= 2:
        n = 60 if d == 2 else 600
        axes = [np.linspace(lo[i], hi[i], n) for i in range(d)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
        vals = num.log_prob(grid) - den.log_prob(grid)
        starts += list(grid[np.argsort(vals)[:8]])
    best = np.inf
    for x0 in starts:
        res = minimize(f, np.asarray(x0, float), jac=g, method="BFGS", options={"gtol": 1e-10})
        if np.isfinite(res.fun):
            best = min(best, res.fun, f(np.asarray(x0, float)))
    # far along rays (the infimum may sit at infinity when the tails tie)
    centre = 0.5 * (lo + hi)
    span = float(np.max(hi - lo))
    vv = np.concatenate([v, -v])
    for r in (2.0, 8.0, 32.0):
        pts = centre + r * span * vv
        vals = num.log_prob(pts) - den.log_prob(pts)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            best = min(best, float(vals.min()))
    return float(best)


@dataclass(frozen=True)
class SignedMixture:
    """``sum_k weights[k] N(means[k], covs[k])`` with weights of either sign summing to 1 and a
    density that is non-negative everywhere (checked at construction, ``ValueError`` otherwise).

    Written as ``W_+ P - W_- N`` with ``P``, ``N`` normalised ``GaussianMixture`` objects. Noising
    is linear in the law, so the noised signed mixture is ``W_+ P_t - W_- N_t`` (``docs/math.md`` §4: noising is linear in the law) and
    stays non-negative; ``log_prob``, ``score`` and ``eps`` are exact at every ``alpha_bar``.
    Components that coincide (same mean and covariance) are merged first, so
    ``q - lam * (a component of q)`` just lowers that component's weight.
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    check: bool = True
    _pos: GaussianMixture = field(init=False, repr=False, compare=False)
    _neg: GaussianMixture | None = field(init=False, repr=False, compare=False)
    _w_pos: float = field(init=False, repr=False, compare=False)
    _w_neg: float = field(init=False, repr=False, compare=False)
    min_log_ratio: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        w, mu, cov = _mixture_arrays(self.weights, self.means, self.covs)
        if abs(w.sum() - 1.0) > 1e-8:
            raise ValueError(f"weights must sum to 1, got {w.sum():.12g}")
        # merge coincident components
        keep_w, keep_mu, keep_cov = [], [], []
        for k in range(w.shape[0]):
            for j in range(len(keep_w)):
                if np.array_equal(keep_mu[j], mu[k]) and np.array_equal(keep_cov[j], cov[k]):
                    keep_w[j] += w[k]
                    break
            else:
                keep_w.append(float(w[k])), keep_mu.append(mu[k]), keep_cov.append(cov[k])
        w, mu, cov = np.array(keep_w), np.array(keep_mu), np.array(keep_cov)
        tol = 1e-13
        w = np.where(np.abs(w) <= tol, 0.0, w)
        pos, neg = w > 0, w < 0
        if not np.any(pos):
            raise ValueError(f"a signed mixture needs a positive weight, got {w.tolist()}")
        w_pos, w_neg = float(w[pos].sum()), float(-w[neg].sum())
        P = GaussianMixture(w[pos] / w_pos, mu[pos], cov[pos])
        N = GaussianMixture(-w[neg] / w_neg, mu[neg], cov[neg]) if np.any(neg) else None
        mlr = np.inf
        if N is not None and self.check:
            mlr = min_log_ratio(P, N) + np.log(w_pos) - np.log(w_neg)
            if mlr < -1e-9:
                raise ValueError(f"signed mixture goes negative: inf_x log(W+ P / W- N) = {mlr:.4g} < 0 "
                                 f"(weights {np.round(w, 6).tolist()})")
        keep = w != 0
        for name, a in (("weights", w[keep]), ("means", mu[keep]), ("covs", cov[keep])):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        object.__setattr__(self, "_pos", P)
        object.__setattr__(self, "_neg", N)
        object.__setattr__(self, "_w_pos", w_pos)
        object.__setattr__(self, "_w_neg", w_neg)
        object.__setattr__(self, "min_log_ratio", float(mlr))

    #: ``eps`` is exact at every noise level (noising is linear in the law).
    eps_is_exact = True

    @property
    def dim(self) -> int:
        return self._pos.dim

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    @property
    def min_std(self) -> float:
        return min(self._pos.min_std, self._neg.min_std if self._neg is not None else np.inf)

    def box(self, pad: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._pos.box(pad)
        return lo, hi

    def _log_rho(self, x, alpha_bar):
        """``log(W_- N_t / (W_+ P_t))`` (N,), ``-inf`` without a negative part."""
        if self._neg is None:
            return np.full(np.asarray(x).shape[0], -np.inf)
        return (np.log(self._w_neg) - np.log(self._w_pos)
                + self._neg.log_prob(x, alpha_bar) - self._pos.log_prob(x, alpha_bar))

    def log_prob(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``log(W_+ P_t(x) - W_- N_t(x))`` (N,); ``-inf`` where the density is exactly 0."""
        lp = np.log(self._w_pos) + self._pos.log_prob(x, alpha_bar)
        lr = np.minimum(self._log_rho(x, alpha_bar), 0.0)
        with np.errstate(divide="ignore"):
            return lp + np.log1p(-np.exp(lr))

    def score(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``(s_P - rho s_N) / (1 - rho)``, ``rho = W_- N_t / (W_+ P_t)`` (N, d)."""
        s = self._pos.score(x, alpha_bar)
        if self._neg is None:
            return s
        rho = np.exp(np.minimum(self._log_rho(x, alpha_bar), 0.0))[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (s - rho * self._neg.score(x, alpha_bar)) / (1.0 - rho)
        if not np.all(np.isfinite(out)):
            raise ValueError("score requested where the signed mixture's density is 0")
        return out

    def score_divergence(self, x: ArrayLike, alpha_bar: ArrayLike = 1.0) -> np.ndarray:
        """``Laplacian log r_t = (Lap r_t) / r_t - |score|^2`` (N,), with
        ``Lap r / r = ((div s_P + |s_P|^2) - rho (div s_N + |s_N|^2)) / (1 - rho)``."""
        s_p = self._pos.score(x, alpha_bar)
        lap_p = self._pos.score_divergence(x, alpha_bar) + np.sum(s_p * s_p, axis=1)
        if self._neg is None:
            return lap_p - np.sum(s_p * s_p, axis=1)
        s_n = self._neg.score(x, alpha_bar)
        lap_n = self._neg.score_divergence(x, alpha_bar) + np.sum(s_n * s_n, axis=1)
        rho = np.exp(np.minimum(self._log_rho(x, alpha_bar), 0.0))
        s = self.score(x, alpha_bar)
        return (lap_p - rho * lap_n) / (1.0 - rho) - np.sum(s * s, axis=1)

    def eps(self, x_t: ArrayLike, alpha_bar: ArrayLike) -> np.ndarray:
        """Exact noise prediction ``-sqrt(1 - ab) grad log p_t(x_t)`` (N, d)."""
        ab = check_alpha_bar(alpha_bar)
        return eps_from_score(self.score(x_t, ab), ab)

    def noised(self, alpha_bar: float) -> "SignedMixture":
        ab = float(check_alpha_bar(alpha_bar))
        out = SignedMixture(self.weights, np.sqrt(ab) * self.means,
                            ab * self.covs + (1.0 - ab) * np.eye(self.dim), check=False)
        object.__setattr__(out, "min_log_ratio", self.min_log_ratio)
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Exact samples by rejection from ``P``: accept with probability ``1 - rho(x)`` in [0, 1]."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n}")
        n = int(n)
        out = np.empty((0, self.dim))
        while out.shape[0] < n:
            m = max(64, int(1.3 * (n - out.shape[0]) * self._w_pos))
            x = self._pos.sample(m, rng)
            acc = rng.random(m) < 1.0 - np.exp(np.minimum(self._log_rho(x, 1.0), 0.0))
            out = np.concatenate([out, x[acc]])
        return out[:n]


# ---------------------------------------------------------------------------------------------
# the shared default instance
# ---------------------------------------------------------------------------------------------


def default_instance() -> tuple[GaussianMixture, list[GaussianMixture], dict[str, np.ndarray]]:
    """``(q, forget, budgets)``: a 2-D mixture of three Gaussians with one mode to unlearn, used by
    the theory and toy tiers alike.

    q: weights (0.35, 0.35, 0.30), means (-2, -1), (2, -1), (0, 2); the third (forget) component
    is isotropic with variance 0.6, wider than the other two in every direction (so the RU tilt
    is defined for every sum(lam) < 1 and the FU domain is exactly lam <= 0.30).
    forget: ``[N((0, 2), 0.6 I)]`` — the third component itself.
    budgets (every constraint active, see ``solve``): reverse_kl ``KL(p||q_1) >= 12`` (6.59 at
    p = q); forward_kl ``KL(q_1||p) >= 2.5`` (1.15 at p = q); likelihood ``E_p[q_1(x)] <= 0.004``
    (0.040 at p = q; the default variant ``"likelihood"``).
    """
    q = GaussianMixture(
        weights=[0.35, 0.35, 0.30],
        means=[[-2.0, -1.0], [2.0, -1.0], [0.0, 2.0]],
        covs=[[[0.5, 0.15], [0.15, 0.35]], [[0.4, -0.1], [-0.1, 0.5]], [[0.6, 0.0], [0.0, 0.6]]],
    )
    forget = [GaussianMixture([1.0], [[0.0, 2.0]], [[[0.6, 0.0], [0.0, 0.6]]])]
    budgets = {"reverse_kl": np.array([12.0]), "forward_kl": np.array([2.5]), "likelihood": np.array([0.004])}
    return q, forget, budgets


#: One forget distribution or a sequence of m of them, as every public function takes ``forget``.
Forget = GaussianMixture | Sequence[GaussianMixture]


# ---------------------------------------------------------------------------------------------
# validation of an instance (the budget and variant rules shared with theory.discrete and toy are
# in theory.validation)
# ---------------------------------------------------------------------------------------------


def check_instance(q: GaussianMixture, forget: Forget, lam: ArrayLike | None = None,
                   name: str = "lam") -> tuple[tuple[GaussianMixture, ...], np.ndarray | None]:
    """Validate ``q`` (a ``GaussianMixture``), ``forget`` (a non-empty list of them in the same
    dimension) and, if given, ``lam`` (m,) finite and >= 0. Returns ``(tuple(forget), lam)``."""
    if not isinstance(q, GaussianMixture):
        raise ValueError(f"q must be a GaussianMixture, got {type(q).__name__}")
    if isinstance(forget, GaussianMixture):
        forget = [forget]
    forget = tuple(forget)
    if len(forget) == 0:
        raise ValueError("forget must hold at least one GaussianMixture, got none")
    for i, f in enumerate(forget):
        if not isinstance(f, GaussianMixture):
            raise ValueError(f"forget[{i}] must be a GaussianMixture, got {type(f).__name__}")
        if f.dim != q.dim:
            raise ValueError(f"forget[{i}] has dimension {f.dim}, q has {q.dim}")
    if lam is None:
        return forget, None
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    if lam.shape != (len(forget),):
        raise ValueError(f"{name} must have shape ({len(forget)},), got {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{name} must be finite, got {lam.tolist()}")
    if np.any(lam < 0):
        raise ValueError(f"{name} must be >= 0, got {lam.tolist()}")
    return forget, lam
