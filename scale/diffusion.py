"""Diffusion pieces only the scale tier needs, beside the shared process in ``toy.core.diffusion``:
SISS importance weights in log space (eq. 37) and the LU state-dependent weight (eq. 29). Pure
functions of tensors.
"""

from __future__ import annotations

import math

import torch

from toy.core.diffusion import append_dims


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


def likelihood_weight(log_ratio: torch.Tensor, constraint: str, clamp: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LU constraint function ``g`` and the weight ``c(x)`` of its tilt (eq. 29).

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
    raise ValueError(f"likelihood constraint must be 'likelihood_ratio' or 'log_likelihood_ratio', got {constraint!r}")
