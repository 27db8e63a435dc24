"""The DDPM / VP forward process in closed form (``docs/math.md`` §4, eqs. 23-24): noise schedules and the map from a
data law to its noised marginal. ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) z``.

Schedules match diffusers' ``DDPMScheduler`` (``linear``, ``scaled_linear``,
``squaredcos_cap_v2``) so that theory, toy and scale agree on ``alphas_cumprod`` exactly; time
indices are 0-based (``alphas_cumprod[t]``) as in diffusers.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def betas_for_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                       schedule: str = "linear") -> np.ndarray:
    """``beta_t`` for t = 0..T-1 in float64, as diffusers' ``DDPMScheduler`` builds them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps}")
    T = int(num_timesteps)
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    else:
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(T, dtype=np.float64)
        betas = np.minimum(1.0 - f((i + 1) / T) / f(i / T), 0.999)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"betas must lie in (0, 1), got range [{betas.min()}, {betas.max()}]")
    return betas


def alphas_cumprod_for_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                                beta_end: float = 0.02, schedule: str = "linear") -> np.ndarray:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (diffusers' ``alphas_cumprod``), float64."""
    return np.cumprod(1.0 - betas_for_schedule(num_timesteps, beta_start, beta_end, schedule))


def check_alpha_bar(alpha_bar: ArrayLike) -> np.ndarray:
    """Validate ``alpha_bar`` in (0, 1] (scalar or array), returned as float64."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    if not np.all(np.isfinite(ab)) or np.any(ab <= 0) or np.any(ab > 1):
        bad = ab[~(np.isfinite(ab) & (ab > 0) & (ab <= 1))].ravel()[:3]
        raise ValueError(f"alpha_bar must lie in (0, 1], got {bad.tolist()}")
    return ab


def eps_from_score(score: ArrayLike, alpha_bar: ArrayLike) -> np.ndarray:
    """Noise prediction from the score of the noised law (Tweedie):
    ``eps(x_t) = E[z | x_t] = -sqrt(1 - alpha_bar) grad log p_t(x_t)``.

    score: (N, d); alpha_bar: scalar or (N,). Returns (N, d).
    """
    s = np.asarray(score, dtype=np.float64)
    ab = check_alpha_bar(alpha_bar)
    return -np.sqrt(1.0 - np.broadcast_to(ab, (s.shape[0],)))[:, None] * s
