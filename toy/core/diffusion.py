"""The diffusion process in tensors, written once for the toy and scale tiers (docs/math.md §4):
forward noising (eq. 23), the reverse-step schedule and its coefficients, the ancestral (DDPM) and
deterministic DDIM reverse steps on a possibly strided schedule, and Tweedie's x_0 estimate (eq. 24).
Pure functions of tensors; every random draw takes an explicit generator. Time indices are 0-based
into ``alphas_cumprod`` as in diffusers.
"""

from __future__ import annotations

import torch

from toy.core.hints import Floats


def step_schedule(alphas_cumprod: Floats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha_bar_t, alpha_t, beta_t)`` in float64 for t = 0..T-1, with ``alpha_t = ab_t / ab_{t-1}``
    (``ab_{-1} = 1``) and ``beta_t = 1 - alpha_t``: the per-step schedule of a (strided) chain."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    alpha = ab / ab_prev
    return ab, alpha, 1.0 - alpha


def reverse_step_kl_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Weights ``w_t = beta_t / (2 alpha_t (1 - alpha_bar_t))`` (eq. 30) such that the KL between two
    DDPM reverse steps with variance ``sigma_t^2 = beta_t`` and noise predictions eps_p, eps_q is
    ``w_t ||eps_p - eps_q||^2`` (the means differ by ``beta_t/(sqrt(alpha_t) sqrt(1-alpha_bar_t))``
    times the eps difference). Summed over steps this is the path-wise KL (eq. 30), and the same
    weights turn denoising losses into the ELBO (eq. 31).
    """
    ab, alpha, beta = step_schedule(alphas_cumprod.double())
    return beta / (2.0 * alpha * (1.0 - ab))


def noised(x0: torch.Tensor, alphas_cumprod: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, z)`` for ``t`` uniform on 0..T-1 and standard normal ``z``: the forward process
    (eq. 23) in one draw, as denoising score matching uses it."""
    T = alphas_cumprod.shape[0]
    t = torch.randint(0, T, (x0.shape[0],), generator=generator)
    z = torch.randn(x0.shape, generator=generator)
    return add_noise(x0, z, alphas_cumprod[t]), t, z


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions up to ``ndim`` (per-sample scalars against images)."""
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
