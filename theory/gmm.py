"""Gaussian mixtures under the diffusion process (MATH.md §2-4): exact densities, scores and
noise predictions at every noise level.

A mixture ``sum_k w_k N(mu_k, Sigma_k)`` noised by the VP process is the mixture
``sum_k w_k N(sqrt(ab) mu_k, ab Sigma_k + (1 - ab) I)``. With ``Sigma_k = U_k diag(s_k) U_k^T``
the noised covariance is ``U_k diag(ab s_k + 1 - ab) U_k^T``, so one eigendecomposition serves
every time, and a batch with a different ``alpha_bar`` per sample costs no more than one time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from theory.diffusion import check_alpha_bar

_LOG_2PI = np.log(2.0 * np.pi)


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
        w = np.atleast_1d(np.asarray(self.weights, dtype=np.float64))
        mu = np.asarray(self.means, dtype=np.float64)
        cov = np.asarray(self.covs, dtype=np.float64)
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

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1 and self.dim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {x.shape}")
        return x

    def _component_terms(self, x, alpha_bar=1.0):
        """Per-component ``log w_k + log N_k(x)`` (N, K) and scores ``-Sigma_k^{-1}(x - mu_k)``
        (N, K, d) of the mixture noised to ``alpha_bar`` (scalar or (N,))."""
        x = self._check_x(x)
        ab = check_alpha_bar(alpha_bar)
        if ab.ndim == 1 and ab.shape[0] != x.shape[0]:
            raise ValueError(f"alpha_bar has {ab.shape[0]} entries for {x.shape[0]} points")
        ab_n = np.broadcast_to(ab, (x.shape[0],))[:, None, None]  # (N,1,1)
        var = ab_n * self._eig_vals[None] + (1.0 - ab_n)  # (N,K,d) eigenvalues of noised covs
        diff = x[:, None, :] - np.sqrt(ab_n) * self.means[None]  # (N,K,d)
        y = np.einsum("nkd,kde->nke", diff, self._eig_vecs)  # rotate into each eigenbasis
        maha = np.sum(y * y / var, axis=2)
        logdet = np.sum(np.log(var), axis=2)
        log_terms = np.log(self.weights)[None] - 0.5 * (maha + logdet + self.dim * _LOG_2PI)
        comp_score = -np.einsum("nke,kde->nkd", y / var, self._eig_vecs)
        return log_terms, comp_score

    def log_prob(self, x, alpha_bar=1.0) -> np.ndarray:
        """``log p_t(x)`` (N,) of the mixture noised to ``alpha_bar`` (1 = the data law)."""
        log_terms, _ = self._component_terms(x, alpha_bar)
        return logsumexp(log_terms, axis=1)

    def score(self, x, alpha_bar=1.0) -> np.ndarray:
        """``grad_x log p_t(x)`` (N, d): responsibilities times component scores."""
        log_terms, comp_score = self._component_terms(x, alpha_bar)
        r = np.exp(log_terms - logsumexp(log_terms, axis=1, keepdims=True))
        return np.einsum("nk,nkd->nd", r, comp_score)

    def eps(self, x_t, alpha_bar) -> np.ndarray:
        """Exact noise prediction ``E[z | x_t] = -sqrt(1 - alpha_bar) grad log p_t(x_t)`` (N, d)."""
        ab = check_alpha_bar(alpha_bar)
        s = self.score(x_t, ab)
        return -np.sqrt(1.0 - np.broadcast_to(ab, (s.shape[0],)))[:, None] * s

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
