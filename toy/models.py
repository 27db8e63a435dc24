"""Noise-prediction models of the toy tier, all behind one contract (k-diffusion's
"one shared model contract with adapters at the edge"):

    model(x_t: (B, d) tensor, t: (B,) long tensor of 0-based timesteps) -> eps (B, d)

- ``EpsMLP``: a small MLP with a sinusoidal time embedding (the learned model).
- ``MixtureEps``: the exact ``E[z | x_t]`` of a Gaussian mixture (or of a finite point set, a
  mixture of zero-covariance atoms) noised by the DDPM schedule, in torch (docs/math.md §4) — a port of
  ``theory.gmm.GaussianMixture.eps`` that runs inside training loops; tested equal to it.
- ``ComposedEps``: the RU/ESD composed target ``eps_q - sum eta_i (eps_{q_i} - eps_q)`` of any models.
- ``SignedMixtureEps``: the FU target, exact at every t: the noise prediction of
  ``(q_t - sum lam_i q_{i,t}) / (1 - Lam)`` from the models' densities.
- ``GibbsTiltEps``: the LU surrogate target ``eps_q - lam_i g_i,t(x_t) * (...)`` (see its docstring).

Exact models compute in float64 and return the input's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from theory.gmm import GaussianMixture
from toy.core.hints import Floats

_LOG_2PI = math.log(2.0 * math.pi)


def _f64(a) -> torch.Tensor:
    """float64 tensor copy of an array or tensor (numpy arrays may be read-only)."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).clone()
    return torch.as_tensor(np.array(a, dtype=np.float64))


def timestep_embedding(t: torch.Tensor, dim: int, num_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of ``t / num_timesteps`` with frequencies 1..1000 (log-spaced)."""
    half = dim // 2
    s = t.to(torch.float32).unsqueeze(1) / float(num_timesteps)
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))
    ang = 2.0 * math.pi * s * freqs.unsqueeze(0)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class EpsMLP(nn.Module):
    """``eps_theta(x_t, t)``: [x_t, emb(t)] -> ``layers`` SiLU layers of width ``hidden`` -> d.

    Config-serialisable: ``EpsMLP(**model.config)`` rebuilds the architecture.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_dim: int = 32,
                 num_timesteps: int = 100):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("layers", layers), ("time_dim", time_dim),
                        ("num_timesteps", num_timesteps)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        self.config = dict(dim=int(dim), hidden=int(hidden), layers=int(layers), time_dim=int(time_dim),
                           num_timesteps=int(num_timesteps))
        mods: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*mods)
        # the embedding of every timestep, looked up rather than recomputed per call (a fifth of a
        # small batch's evaluation time); not persistent: saved models do not carry it
        self.register_buffer("_emb", timestep_embedding(torch.arange(num_timesteps), time_dim, num_timesteps),
                             persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.long()
        if t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))
            if lo < 0 or hi >= self.config["num_timesteps"]:
                raise ValueError(f"timesteps must lie in [0, {self.config['num_timesteps']}), got [{lo}, {hi}]")
        emb = self._emb[t]
        return self.net(torch.cat([x_t, emb.to(x_t.dtype)], dim=1))


class MixtureEps:
    """Exact noise prediction of ``sum_k w_k N(mu_k, Sigma_k)`` under the VP process (eqs. 23-24).

    At ``alpha_bar`` the mixture is ``N(sqrt(ab) mu_k, U_k diag(ab s_k + 1 - ab) U_k^T)``; eigenvalues
    ``s_k`` may be 0 (atoms: a finite training set), which is fine for every ``alpha_bar < 1``.
    ``alphas_cumprod``: (T,) schedule; ``t`` indexes it. ``log_prob(x, t)`` is the noised log density
    (``t=None``: the data law, atoms not allowed there).
    """

    def __init__(self, weights, means, eig_vals, eig_vecs, alphas_cumprod):
        self.log_w = torch.log(_f64(weights))
        self.means = _f64(means)
        self.eig_vals = torch.as_tensor(eig_vals, dtype=torch.float64)
        self.eig_vecs = torch.as_tensor(eig_vecs, dtype=torch.float64)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if torch.any(self.eig_vals < 0):
            raise ValueError(f"eigenvalues must be >= 0, got min {float(self.eig_vals.min())}")
        self.dim = self.means.shape[1]

    @classmethod
    def from_mixture(cls, g: GaussianMixture, alphas_cumprod: Floats) -> "MixtureEps":
        vals, vecs = np.linalg.eigh(g.covs)
        return cls(g.weights, g.means, vals, vecs, alphas_cumprod)

    @classmethod
    def from_points(cls, points: Floats, alphas_cumprod: Floats, weights: Floats | None = None) -> "MixtureEps":
        """The empirical law of ``points`` (n, d) (uniform weights unless given): atoms."""
        pts = torch.as_tensor(points, dtype=torch.float64)
        n, d = pts.shape
        w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return cls(w, pts, torch.zeros(n, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64).expand(n, d, d), alphas_cumprod)

    def _terms(self, x: torch.Tensor, ab: torch.Tensor):
        """Per-component log terms (K, B) and scores (K, B, d), component-major so that every
        product is one batched matmul (this runs once per sampler or pool step: few ops matter)."""
        x = x.to(torch.float64)
        ab = ab.to(torch.float64).reshape(1, -1, 1)
        var = ab * self.eig_vals.unsqueeze(1) + (1.0 - ab)  # (K,B,d)
        diff = x.unsqueeze(0) - ab.sqrt() * self.means.unsqueeze(1)
        y = torch.matmul(diff, self.eig_vecs)  # (K,B,d) @ (K,d,d): coordinates in each eigenbasis
        y_var = y / var
        log_terms = self.log_w.unsqueeze(1) - 0.5 * ((y * y_var).sum(2) + var.log().sum(2) + self.dim * _LOG_2PI)
        comp_score = -torch.matmul(y_var, self.eig_vecs.transpose(1, 2))
        return log_terms, comp_score

    def _ab(self, x, t):
        if t is None:
            if torch.any(self.eig_vals == 0):
                raise ValueError("the data law of a point set has no density; pass a timestep t")
            return torch.ones(x.shape[0], dtype=torch.float64)
        return self.alphas_cumprod[t.long().cpu()].expand(x.shape[0]) if t.dim() == 0 else self.alphas_cumprod[t.long().cpu()]

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """``log q_t(x)`` (B,) in float64."""
        log_terms, _ = self._terms(x, self._ab(x, t))
        return torch.logsumexp(log_terms, dim=0)

    def score(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        log_terms, comp_score = self._terms(x, self._ab(x, t))
        r = torch.softmax(log_terms, dim=0)
        return (r.unsqueeze(2) * comp_score).sum(0)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._ab(x_t, t)
        eps = -(1.0 - ab).sqrt().unsqueeze(1) * self.score(x_t, t)
        return eps.to(x_t.dtype)


class ComposedEps:
    """RU composed target ``eps_q - sum_i eta_i (eps_{q_i} - eps_q)`` (eq. 26) of any models;
    ``eta`` (m,). Exact for the x_0 tilt only at t = 0; a surrogate at t > 0."""

    def __init__(self, base, forget: list, eta):
        from toy.core.objectives import composed_eps_target
        self._target = composed_eps_target
        self.base, self.forget = base, list(forget)
        self.eta = torch.as_tensor(eta, dtype=torch.float64).reshape(-1)

    def __call__(self, x_t, t):
        with torch.no_grad():
            eps_q = self.base(x_t, t)
            eps_f = torch.stack([f(x_t, t) for f in self.forget])
        return self._target(eps_q, eps_f, self.eta.to(eps_q.dtype)).to(x_t.dtype)


class SignedMixtureEps:
    """FU target ``(q_t - sum lam_i q_{i,t}) / (1 - Lam)``, exact at every t (eq. 28):
    ``eps = (eps_q - sum_i lam_i rho_i eps_i) / (1 - sum_i lam_i rho_i)``, ``rho_i = q_{i,t}/q_t``.
    ``q`` and ``forget`` are ``MixtureEps`` (densities needed)."""

    def __init__(self, q: MixtureEps, forget: list, lam):
        self.q, self.forget = q, list(forget)
        self.lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)

    def __call__(self, x_t, t):
        log_q = self.q.log_prob(x_t, t)
        num = self.q(x_t, t).double()
        den = torch.ones_like(log_q)
        for lam_i, f in zip(self.lam, self.forget):
            rho = torch.exp(f.log_prob(x_t, t) - log_q)
            num = num - lam_i * rho.unsqueeze(1) * f(x_t, t).double()
            den = den - lam_i * rho
        if torch.any(den <= 0):
            raise ValueError(f"signed mixture is not a density at lam={self.lam.tolist()} (min 1-sum lam rho = {float(den.min()):.3g})")
        return (num / den.unsqueeze(1)).to(x_t.dtype)


def gibbs_tilt_eps_target(eps_q: torch.Tensor, eps_forget: torch.Tensor, g_forget: torch.Tensor,
                          lam: torch.Tensor, variant: str) -> torch.Tensor:
    """LU noise target at the Gibbs tilt ``q exp(-sum lam_i g_i)`` (eq. 29), evaluated with the
    noised quantities at t (the surrogate; exact at t = 0 where the tilt is defined).

    score = s_q - sum lam_i grad g_i with
      - ``likelihood`` g = q_i:           grad g = q_i s_i        -> eps_q - sum lam_i q_i eps_i
      - ``ratio``      g = q_i / q:       grad g = g (s_i - s_q)  -> eps_q - sum lam_i g_i (eps_i - eps_q)
      - ``log_likelihood`` g = log q_i:   grad g = s_i            -> eps_q - sum lam_i eps_i
    eps_q: (B, d); eps_forget: (m, B, d); g_forget: (m, B) values of g_i at (x_t, t); lam: (m,).
    """
    lam = torch.as_tensor(lam, dtype=eps_q.dtype, device=eps_q.device).reshape(-1, 1, 1)
    g = g_forget.to(eps_q.dtype).unsqueeze(2)
    if variant == "likelihood":
        return eps_q - (lam * g * eps_forget).sum(0)
    if variant == "likelihood_ratio":
        return eps_q - (lam * g * (eps_forget - eps_q.unsqueeze(0))).sum(0)
    if variant == "log_likelihood":
        return eps_q - (lam * eps_forget).sum(0)
    raise ValueError(f"variant must be likelihood, likelihood_ratio or log_likelihood, got {variant!r}")


def constraint_function(variant: str, log_q_forget: torch.Tensor, log_q: torch.Tensor | None) -> torch.Tensor:
    """LU ``g_i(x)`` from log densities: ``q_i``, ``q_i/q`` or ``log q_i`` (eq. 4)."""
    if variant == "likelihood":
        return log_q_forget.exp()
    if variant == "likelihood_ratio":
        if log_q is None:
            raise ValueError("the ratio variant needs log q")
        return (log_q_forget - log_q).exp()
    if variant == "log_likelihood":
        return log_q_forget
    raise ValueError(f"variant must be likelihood, likelihood_ratio or log_likelihood, got {variant!r}")


class GibbsTiltEps:
    """LU surrogate target as a model: base eps (a network or exact) plus exact forget mixtures
    (and the exact q for the ratio variant, whose g needs q_t)."""

    def __init__(self, base, forget: list, lam, variant: str = "likelihood", q: MixtureEps | None = None):
        self.base, self.forget, self.variant, self.q = base, list(forget), variant, q
        self.lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)

    def __call__(self, x_t, t):
        with torch.no_grad():
            eps_q = self.base(x_t, t).double()
            eps_f = torch.stack([f(x_t, t).double() for f in self.forget])
            log_q = self.q.log_prob(x_t, t) if self.q is not None else None
            g = torch.stack([constraint_function(self.variant, f.log_prob(x_t, t), log_q) for f in self.forget])
        return gibbs_tilt_eps_target(eps_q, eps_f, g, self.lam, self.variant).to(x_t.dtype)


class torch_threads:
    """Context manager (and plain setter) for the thread count of toy work: torch's intra-op
    threads and, when ``threadpoolctl`` is installed (it comes with scikit-learn), the BLAS/OpenMP
    pools numpy and scipy use (the theory tier's quadratures, energy distances):
    ``with torch_threads(1): ...``. Networks of this tier (128-wide MLPs on a few hundred rows) run
    fastest on one thread, and several threads fight any other busy process for the cores
    (docs/toy.md, "Threads"). Restores the previous counts on exit."""

    def __init__(self, n: int):
        if int(n) != n or n < 1:
            raise ValueError(f"threads must be a positive integer, got {n}")
        self.n = int(n)
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        self._limits = None
        try:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=self.n)
        except ImportError:  # pragma: no cover - torch's own count is still set
            pass

    def __enter__(self) -> "torch_threads":
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)
        if self._limits is not None:
            self._limits.restore_original_limits()
