"""Probability-flow ODE sampling with exact log-densities (``docs/math.md`` §4, eq. 24), and the gap between the
composed-score surrogate and the exact tilted target.

The VP probability-flow ODE in DDIM variables ``y = x / sqrt(ab)``, ``sigma = sqrt((1 - ab)/ab)``
is ``dy/dsigma = eps(sqrt(ab) y, ab)``; with ``u = log sigma`` it is
``dy/du = sigma * eps``. Along a trajectory the log-density changes by the divergence of the
drift (instantaneous change of variables):
``d log p / du = -div_y(sigma eps) = sigma * sqrt(ab) * sqrt(1 - ab) * tr grad_x s(x)``,
and ``tr grad_x s`` is available in closed form for mixtures and for the composed tilt formulas
(``score_divergence``). So every sample comes with its exact log-density under the sampler's
law, and ``KL(sampler || target) = E[log p_sampler - log p_target]`` is a plain Monte Carlo mean
with a standard error — no density estimation. The ODE is solved by scipy's DOP853 (8th order,
rtol 1e-9 by default); running it with a mixture's exact eps must reproduce ``log q`` at the
end, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from theory.gmm.mixture import GaussianMixture

_LOG_2PI = np.log(2.0 * np.pi)


@dataclass(frozen=True)
class ODESamples:
    """Samples ``x`` (n, d) at ``sigma_min`` (in x-space), their log-density ``log_prob`` (n,) under
    the ODE's pushforward of the start law, and solver statistics."""

    x: np.ndarray
    log_prob: np.ndarray
    nfev: int


def probability_flow_sample(model: Any, n: int, rng: np.random.Generator, sigma_max: float = 1000.0,
                            sigma_min: float = 1e-3, rtol: float = 1e-9, atol: float = 1e-9) -> ODESamples:
    """Sample the PF-ODE of ``model`` (any object with ``score(x, alpha_bar)`` and
    ``score_divergence(x, alpha_bar)``: a ``GaussianMixture``, ``SignedMixture`` or the composed
    ``TiltedMixture`` formula) from ``x_T ~ N(0, I)`` at ``sigma_max`` down to ``sigma_min``,
    tracking each sample's exact log-density."""
    from scipy.integrate import solve_ivp

    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    d = model.q.dim if hasattr(model, "q") else model.dim
    n = int(n)
    ab_T = 1.0 / (1.0 + sigma_max ** 2)
    x_T = rng.standard_normal((n, d))
    y0 = x_T / np.sqrt(ab_T)
    # log-density of y0 = x_T / sqrt(ab_T): N(0, I/ab_T)
    logp0 = -0.5 * np.sum(x_T ** 2, axis=1) - 0.5 * d * _LOG_2PI + 0.5 * d * np.log(ab_T)

    def rhs(u, z):
        sigma = np.exp(u)
        ab = 1.0 / (1.0 + sigma ** 2)
        y = z[: n * d].reshape(n, d)
        x = np.sqrt(ab) * y
        s = model.score(x, ab)
        dy = -sigma * np.sqrt(1.0 - ab) * s  # sigma * eps
        dlogp = sigma * np.sqrt(ab) * np.sqrt(1.0 - ab) * model.score_divergence(x, ab)
        return np.concatenate([dy.ravel(), dlogp])

    sol = solve_ivp(rhs, (np.log(sigma_max), np.log(sigma_min)), np.concatenate([y0.ravel(), logp0]),
                    method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise ValueError(f"probability-flow ODE failed: {sol.message}")
    z = sol.y[:, -1]
    ab_min = 1.0 / (1.0 + sigma_min ** 2)
    x = np.sqrt(ab_min) * z[: n * d].reshape(n, d)
    # d log p / du = -div(dy/du) integrated from u_max to u_min, written with the sign flipped
    logp_y = z[n * d:]
    logp_x = logp_y - 0.5 * d * np.log(ab_min)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(logp_x))):
        raise ValueError("probability-flow ODE produced non-finite values")
    return ODESamples(x=x, log_prob=logp_x, nfev=int(sol.nfev))


@dataclass(frozen=True)
class SurrogateGap:
    """Surrogate (composed-score ODE) vs the exact x_0 tilt at one lam: ``kl`` =
    ``KL(surrogate || tilt)`` with standard error ``kl_se``; ``forget_mass`` of each (the mass
    on the forget mode, ``E[r_forget(x)]`` with q's responsibilities), and the mean of each."""

    lam: np.ndarray
    kl: float
    kl_se: float
    forget_mass_surrogate: float
    forget_mass_exact: float
    mean_surrogate: np.ndarray
    mean_exact: np.ndarray
    nfev: int


def forget_mode_mass_fn(q: GaussianMixture, forget_component: int) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> r_k(x)``, q's responsibility of one component (the "mass on the forget mode")."""
    def fn(x):
        return q.responsibilities(x)[:, forget_component]
    return fn


def surrogate_gap(target: Any, n: int, rng: np.random.Generator, forget_component: int | None = None,
                  **ode_kwargs: float) -> SurrogateGap:
    """Measure how far the surrogate's generated law (PF-ODE of ``target.score`` at every noise
    level: the composed score) is from the exact tilt ``target`` at x_0."""
    out = probability_flow_sample(target, n, rng, **ode_kwargs)
    diff = out.log_prob - target.log_prob(out.x)
    kl = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(diff.shape[0]))
    if forget_component is None:
        forget_component = target.q.n_components - 1
    r = forget_mode_mass_fn(target.q, forget_component)
    return SurrogateGap(lam=np.asarray(target.lam), kl=kl, kl_se=se,
                        forget_mass_surrogate=float(r(out.x).mean()),
                        forget_mass_exact=float(target.expect(r)),
                        mean_surrogate=out.x.mean(axis=0), mean_exact=target.expect(lambda x: x),
                        nfev=out.nfev)


def ddpm_sample(eps_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, d: int, rng: np.random.Generator,
                alphas_cumprod: ArrayLike | None = None) -> np.ndarray:
    """Ancestral DDPM sampling (the reverse SDE's standard discretisation, diffusers'
    ``DDPMScheduler`` with ``variance_type="fixed_small"``):
    ``x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps(x_t, ab_t)) / sqrt(alpha_t) + sigma_t z``,
    ``sigma_t^2 = beta_t (1 - ab_{t-1}) / (1 - ab_t)``, from ``x_T ~ N(0, I)``; default schedule
    diffusers' linear one with T = 1000. ``eps_fn(x, alpha_bar)`` is any noise prediction, e.g. a
    target's ``eps`` or ``surrogate_eps``. For an exact eps this samples the data law up to the
    discretisation; for a composed surrogate (not the score of any noised family) it can differ
    from the PF-ODE's law — which is what it is used to measure."""
    from theory.diffusion import alphas_cumprod_for_schedule

    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    ab = alphas_cumprod_for_schedule(1000) if alphas_cumprod is None else np.asarray(alphas_cumprod, float)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    alpha = ab / ab_prev
    beta = 1.0 - alpha
    x = rng.standard_normal((int(n), d))
    for t in range(len(ab) - 1, -1, -1):
        e = eps_fn(x, ab[t])
        x = (x - beta[t] / np.sqrt(1.0 - ab[t]) * e) / np.sqrt(alpha[t])
        if t > 0:
            x = x + np.sqrt(beta[t] * (1.0 - ab_prev[t]) / (1.0 - ab[t])) * rng.standard_normal(x.shape)
    if not np.all(np.isfinite(x)):
        raise ValueError("DDPM sampling produced non-finite values")
    return x
