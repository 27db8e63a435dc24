"""Hypothesis strategies for Gaussian mixtures (constructive: covariances ``L L^T + delta I``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from theory.gmm import GaussianMixture


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def covariances(draw, d: int, delta: float = 0.15, scale: float = 0.6):
    """``L L^T + delta I`` with L's entries in ``[-scale, scale]``: symmetric positive definite."""
    L = np.array(draw(st.lists(_floats(-scale, scale), min_size=d * d, max_size=d * d))).reshape(d, d)
    return L @ L.T + delta * np.eye(d)


@st.composite
def mixture_weights(draw, k: int, floor: float = 0.05):
    """Weights on the k-simplex, each at least ``floor`` (positive, summing to 1 exactly-ish)."""
    raw = np.array(draw(st.lists(_floats(0.0, 1.0), min_size=k, max_size=k)))
    w = floor + (1.0 - k * floor) * raw / max(raw.sum(), 1e-12) if raw.sum() > 0 else np.full(k, 1.0 / k)
    return w / w.sum()


@st.composite
def gaussian_mixtures(draw, d: int = 2, k_min: int = 1, k_max: int = 3, spread: float = 3.0,
                      delta: float = 0.15, scale: float = 0.6):
    """A ``GaussianMixture`` with k_min..k_max components, means in ``[-spread, spread]^d``."""
    k = draw(st.integers(k_min, k_max))
    w = draw(mixture_weights(k))
    mu = np.array(draw(st.lists(_floats(-spread, spread), min_size=k * d, max_size=k * d))).reshape(k, d)
    cov = np.stack([draw(covariances(d, delta, scale)) for _ in range(k)])
    return GaussianMixture(w, mu, cov)


@st.composite
def unlearning_instances(draw, d: int = 2, k_max: int = 3):
    """``(q, [q_1])`` with q a mixture of 2..k_max components and q_1 one of q's components
    (the "one mode to unlearn" set-up): every RU tilt with ``Lam < 1`` is then integrable when q_1
    is the widest component, which is arranged by giving it ``cov + c I`` with c large enough."""
    q0 = draw(gaussian_mixtures(d=d, k_min=2, k_max=k_max))
    j = draw(st.integers(0, q0.n_components - 1))
    cov = q0.covs.copy()
    top = max(np.linalg.eigvalsh(c).max() for c in cov)
    cov[j] = cov[j] + top * np.eye(d)  # dominates every other component: Sigma_j >= Sigma_k
    q = GaussianMixture(q0.weights, q0.means, cov)
    return q, [GaussianMixture([1.0], q.means[j:j + 1], q.covs[j:j + 1])]


alpha_bars = st.one_of(st.just(1.0), _floats(1e-4, 1.0))
