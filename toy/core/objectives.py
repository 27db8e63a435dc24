"""Score-space targets, losses and constraint estimators of docs/math.md §4 (eqs. 26-32), shared by toy and scale.

All functions take torch tensors, keep the inputs' device, and compute losses, KLs and
multiplier arithmetic in float32 or wider (network outputs are cast up first).
Time indices ``t`` are 0-based into ``alphas_cumprod`` (diffusers' convention: step t has
``alpha_bar_t = alphas_cumprod[t]``).
"""

from __future__ import annotations

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def eta_from_lam(lam: torch.Tensor) -> torch.Tensor:
    """RU tilt exponents ``eta_i = lam_i / (1 - sum lam)`` (eq. 7); needs ``sum lam < 1``."""
    lam = torch.as_tensor(lam)
    Lam = lam.sum()
    if not float(Lam) < 1.0:
        raise ValueError(f"the RU tilt needs sum(lam) < 1, got {float(Lam):.6g}")
    return lam / (1.0 - Lam)


def lam_from_eta(eta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``eta_from_lam``: ``lam_i = eta_i / (1 + sum eta)`` (ESD's eta -> lam)."""
    eta = torch.as_tensor(eta)
    if torch.any(eta < 0):
        raise ValueError(f"eta must be >= 0, got {eta.tolist()}")
    return eta / (1.0 + eta.sum())


def composed_eps_target(eps_q: torch.Tensor, eps_forget: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """RU composed noise target ``eps* = eps_q - sum_i eta_i (eps_{q_i} - eps_q)`` (eq. 26).

    eps_q: (B, *S); eps_forget: (m, B, *S); eta: (m,) or (m, B) (per-sample weights).
    ESD is m = 1 with a fixed eta. Exact for the x_0 tilt's score only at t = 0; a surrogate at t > 0.
    """
    eps_q = _f32(eps_q)
    eps_forget = _f32(eps_forget)
    if eps_forget.dim() != eps_q.dim() + 1 or eps_forget.shape[1:] != eps_q.shape:
        raise ValueError(f"eps_forget must have shape (m, *{tuple(eps_q.shape)}), got {tuple(eps_forget.shape)}")
    eta = torch.as_tensor(eta, dtype=eps_q.dtype, device=eps_q.device)
    eta = eta.reshape(eta.shape + (1,) * (eps_forget.dim() - eta.dim()))
    return eps_q - (eta * (eps_forget - eps_q.unsqueeze(0))).sum(0)


def denoising_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising loss ``mean over non-batch dims of (eps_pred - eps)^2`` in float32."""
    d = _f32(eps_pred) - _f32(eps)
    return d.pow(2).flatten(1).mean(1)


def signed_denoising_objective(loss_retain: torch.Tensor, loss_forget: torch.Tensor,
                               lam: torch.Tensor) -> torch.Tensor:
    """FU Lagrangian in denoising form: ``E_q[l] - sum_i lam_i E_{q_i}[l]`` (eq. 28).

    loss_retain: scalar estimate of E_q[l_theta]; loss_forget: (m,) estimates of E_{q_i}[l_theta];
    lam: (m,). Its minimiser over scores is the signed mixture ``(q - sum lam_i q_i)/(1 - Lam)`` at
    every noise level (noising is linear in the law), so the target is exact. SISS is a fixed lam.
    """
    lam = torch.as_tensor(lam, dtype=loss_forget.dtype, device=loss_forget.device)
    return loss_retain - (lam * loss_forget).sum()




def path_kl_estimate(eps_p: torch.Tensor, eps_q: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Path-wise KL(P||Q) of two reverse processes along trajectories sampled from P.

    eps_p, eps_q: (S, B, *D) noise predictions of both models at the S visited steps of B
    trajectories drawn from P; weights: (S,) ``reverse_step_kl_weights`` at those steps.
    Returns the (B,)-mean of ``sum_s w_s ||eps_p - eps_q||^2`` (summed over data dims).
    """
    d2 = (_f32(eps_p) - _f32(eps_q)).pow(2).flatten(2).sum(2)  # (S, B)
    return (weights.to(d2).unsqueeze(1) * d2).sum(0).mean()


def log_ratio_from_denoising_losses(loss_cond: torch.Tensor, loss_ref: torch.Tensor,
                                    weights_t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Diffusion-classifier estimate of ``log q_c(x0) / q(x0)`` (eq. 32).

    With ``-log p(x0) ~= sum_t w_t E||eps - eps_theta(x_t, t)||^2 + C`` (ELBO, shared C), the log
    ratio is ``sum_t w_t (l_ref,t - l_cond,t)``. Given losses (B,) at timesteps drawn uniformly
    (weights_t their ``reverse_step_kl_weights`` times the data dimension when losses are means),
    the unbiased one-sample estimate is ``T * w_t * (l_ref - l_cond)``.
    """
    return num_timesteps * weights_t.to(_f32(loss_cond)) * (_f32(loss_ref) - _f32(loss_cond))
