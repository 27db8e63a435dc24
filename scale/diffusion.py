"""Model-agnostic diffusion pieces the scale tier needs beside ``toy.objectives`` (MATH.md §4):
forward noising, the ancestral (DDPM) reverse step on a strided schedule, Tweedie's x_0 estimate,
SISS importance weights in log space and the LU state-dependent weight. Pure functions of tensors;
every random draw takes an explicit generator. Time indices are 0-based into ``alphas_cumprod``.
"""

from __future__ import annotations

import math

import torch

from toy.objectives import reverse_step_kl_weights


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (ndim - x.dim()))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` with per-sample alpha_bar_t (B,)."""
    ab = append_dims(alpha_bar_t.to(x0.dtype), x0.dim())
    return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps


def predict_x0(x_t: torch.Tensor, eps_pred: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Tweedie: ``x_0 ~= (x_t - sqrt(1 - alpha_bar_t) eps_pred) / sqrt(alpha_bar_t)``."""
    ab = append_dims(alpha_bar_t.to(torch.float32), x_t.dim())
    return (x_t.float() - (1.0 - ab).sqrt() * eps_pred.float()) / ab.sqrt()


def strided_timesteps(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` distinct timesteps from ``T-1`` down to 0 (the visited steps of the sampler)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_train_timesteps}], got {num_steps}")
    ts = torch.linspace(num_train_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long()
    return torch.unique_consecutive(ts)


def strided_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar at the visited steps in *increasing* time order (the strided chain's schedule)."""
    return alphas_cumprod.double()[timesteps.flip(0)]


def strided_kl_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``reverse_step_kl_weights`` of the strided chain, returned in the sampler's (descending) order."""
    return reverse_step_kl_weights(strided_alphas_cumprod(alphas_cumprod, timesteps)).flip(0)


def ancestral_step(x_t: torch.Tensor, eps_pred: torch.Tensor, alpha_bar_t: torch.Tensor,
                   alpha_bar_prev: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDPM reverse step from alpha_bar_t to alpha_bar_prev with variance ``beta = 1 - alpha``
    (the variance ``reverse_step_kl_weights`` assumes): ``mean = (x_t - beta/sqrt(1-ab_t) eps)/sqrt(alpha)``.
    ``noise=None`` gives the mean (the last step). alpha_bar_* are per-sample (B,) tensors.
    """
    ab_t = append_dims(alpha_bar_t.to(torch.float32), x_t.dim())
    ab_prev = append_dims(alpha_bar_prev.to(torch.float32), x_t.dim())
    alpha = ab_t / ab_prev
    beta = 1.0 - alpha
    mean = (x_t.float() - beta / (1.0 - ab_t).sqrt() * eps_pred.float()) / alpha.sqrt()
    if noise is None:
        return mean
    return mean + beta.sqrt() * noise.float()


def ddim_step(x_t: torch.Tensor, eps_pred: torch.Tensor, alpha_bar_t: torch.Tensor,
              alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from alpha_bar_t to alpha_bar_prev:
    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps`` with Tweedie's ``x0_hat``. alpha_bar_* (B,)."""
    ab_prev = append_dims(alpha_bar_prev.to(torch.float32), x_t.dim())
    x0 = predict_x0(x_t, eps_pred, alpha_bar_t)
    return ab_prev.sqrt() * x0 + (1.0 - ab_prev).sqrt() * eps_pred.float()


def siss_log_weights(x_t: torch.Tensor, x0: torch.Tensor, a0: torch.Tensor, alpha_bar_t: torch.Tensor,
                     mix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SISS importance weights ``q(x_t|x)/q_mix(x_t)`` and ``q(x_t|a)/q_mix(x_t)`` in log space, with
    ``q_mix = (1-mix) q(x_t|x) + mix q(x_t|a)`` and ``q(x_t|x) = N(sqrt(ab) x, (1-ab) I)``.

    The Gaussian normalisers cancel; the log densities ``-||x_t - sqrt(ab) x||^2 / (2 (1-ab))``
    are combined with ``logsumexp`` (the published code exponentiates them first, which overflows
    at small t where ``1 - ab`` is tiny). Returns ``(log_w_x, log_w_a)``, each (B,), float64.
    """
    if not 0.0 < mix < 1.0:
        raise ValueError(f"mixture weight must lie in (0, 1), got {mix}")
    ab = append_dims(alpha_bar_t.double(), x_t.dim())
    var = 1.0 - ab
    lx = -((x_t.double() - ab.sqrt() * x0.double()) ** 2 / (2 * var)).flatten(1).sum(1)
    la = -((x_t.double() - ab.sqrt() * a0.double()) ** 2 / (2 * var)).flatten(1).sum(1)
    log_mix = torch.logaddexp(math.log1p(-mix) + lx, math.log(mix) + la)
    return lx - log_mix, la - log_mix


def lu_weight(log_ratio: torch.Tensor, constraint: str, clamp: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LU constraint function ``g`` and the weight ``c(x)`` of its tilt (MATH.md §4).

    ``p ∝ q exp(-lam g)`` has score ``score_q - lam grad g``; for ``g = r = q_i/q``,
    ``grad g = r (score_i - score_q)`` and for ``g = log r``, ``grad g = score_i - score_q``. In noise
    units both are ESD-form targets ``eps_q - lam c(x) (eps_i - eps_q)`` with ``c = r`` or ``c = 1``.
    For ``g = log r`` the estimate is used as it is (linear in the ELBO difference, so an unbiased
    estimate of it stays unbiased; no clamp). For ``g = r`` the log ratio (B,) is clamped to
    ``[-clamp, clamp]`` before exponentiation (a noisy estimate must not overflow; the true log ratio
    of a conditional is at most ``-log q(c)``). Returns ``(g, c)``, float64.
    """
    lr = log_ratio.double()
    if constraint == "likelihood_ratio":
        r = lr.clamp(-clamp, clamp).exp()
        return r, r
    if constraint == "log_likelihood_ratio":
        return lr, torch.ones_like(lr)
    raise ValueError(f"LU constraint must be 'likelihood_ratio' or 'log_likelihood_ratio', got {constraint!r}")
