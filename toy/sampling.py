"""Samplers for any model of the toy contract ``model(x_t, t) -> eps`` (networks and exact
mixtures alike), on a DDPM schedule ``alphas_cumprod`` (0-based t, diffusers' convention).

- ``ddpm_sample``: ancestral sampling with reverse variance ``sigma_t^2 = beta_t`` (the variance the
  path-KL weights ``toy.objectives.reverse_step_kl_weights`` assume); no noise at the last step.
- ``ddim_sample``: deterministic DDIM (eta = 0), the probability-flow discretisation, on a strided
  subset of timesteps.
- ``path_kl_to_models``: path-wise KL(P_model || P_other_i) along the model's own ancestral
  trajectories (MATH.md §4), together with the trajectories' end points.
"""

from __future__ import annotations

import torch

from toy.objectives import path_kl_estimate, reverse_step_kl_weights


def _schedule(alphas_cumprod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    alpha = ab / ab_prev
    return ab, alpha, 1.0 - alpha


def _check_finite(x: torch.Tensor, t: int, what: str) -> None:
    if not torch.all(torch.isfinite(x)):
        raise FloatingPointError(f"non-finite {what} at sampling timestep {t}")


@torch.no_grad()
def ddpm_sample(model, n: int, alphas_cumprod, generator: torch.Generator, dim: int = 2,
                on_step=None) -> torch.Tensor:
    """``n`` samples (n, dim) float32 by ancestral DDPM; ``on_step(t, x_t, eps)`` is called at every
    step before the update (used to evaluate other models along the trajectory)."""
    ab, alpha, beta = _schedule(alphas_cumprod)
    T = ab.shape[0]
    x = torch.randn(n, dim, generator=generator)
    for t in range(T - 1, -1, -1):
        tt = torch.full((n,), t, dtype=torch.long)
        eps = model(x, tt).to(torch.float32)
        _check_finite(eps, t, "eps")
        if on_step is not None:
            on_step(t, x, eps)
        mean = (x - (beta[t] / (1.0 - ab[t]).sqrt()).float() * eps) / alpha[t].sqrt().float()
        x = mean + beta[t].sqrt().float() * torch.randn(n, dim, generator=generator) if t > 0 else mean
    return x


@torch.no_grad()
def ddim_sample(model, n: int, alphas_cumprod, generator: torch.Generator, num_steps: int = 50,
                dim: int = 2) -> torch.Tensor:
    """``n`` samples by deterministic DDIM on ``num_steps`` evenly spaced timesteps (T-1 ... 0)."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    T = ab.shape[0]
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must lie in [1, {T}], got {num_steps}")
    steps = torch.linspace(T - 1, 0, num_steps).round().long().unique_consecutive()
    x = torch.randn(n, dim, generator=generator)
    for k, t in enumerate(steps.tolist()):
        tt = torch.full((n,), t, dtype=torch.long)
        eps = model(x, tt).to(torch.float32)
        _check_finite(eps, t, "eps")
        a_t = ab[t]
        a_prev = ab[steps[k + 1]] if k + 1 < len(steps) else ab.new_tensor(1.0)
        x0 = (x - (1 - a_t).sqrt().float() * eps) / a_t.sqrt().float()
        x = a_prev.sqrt().float() * x0 + (1 - a_prev).sqrt().float() * eps
    return x


def sample(model, n: int, alphas_cumprod, generator: torch.Generator, sampler: str = "ddpm",
           dim: int = 2, num_steps: int = 50) -> torch.Tensor:
    """Dispatch to ``ddpm_sample`` or ``ddim_sample``."""
    if sampler == "ddpm":
        return ddpm_sample(model, n, alphas_cumprod, generator, dim)
    if sampler == "ddim":
        return ddim_sample(model, n, alphas_cumprod, generator, num_steps, dim)
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")


@torch.no_grad()
def path_kl_to_models(model, others: list, n: int, alphas_cumprod, generator: torch.Generator,
                      dim: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Path-wise ``KL(P_model || P_other_i)`` (m,) for the DDPM reverse processes (equal variances
    ``beta_t``; both start at N(0, I), so the x_T term is 0): ``E_P sum_t w_t ||eps_p - eps_i||^2``
    along ``n`` ancestral trajectories of ``model``. Returns (kl (m,), per-trajectory terms (m, n),
    end points (n, dim))."""
    w = reverse_step_kl_weights(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    per_traj = torch.zeros(len(others), n, dtype=torch.float64)

    def on_step(t, x, eps):
        for i, other in enumerate(others):
            d2 = (eps.double() - other(x, torch.full((n,), t, dtype=torch.long)).double()).pow(2).sum(1)
            per_traj[i] += w[t] * d2

    x0 = ddpm_sample(model, n, alphas_cumprod, generator, dim, on_step=on_step)
    return per_traj.mean(1), per_traj, x0


__all__ = ["ddpm_sample", "ddim_sample", "sample", "path_kl_to_models", "path_kl_estimate"]
