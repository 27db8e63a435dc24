"""Samplers for any model of the toy contract ``model(x_t, t) -> eps`` (networks and exact
mixtures alike), on a DDPM schedule ``alphas_cumprod`` (0-based t, diffusers' convention).

- ``ddpm_sample``: ancestral sampling with reverse variance ``sigma_t^2 = beta_t`` (the variance the
  path-KL weights ``toy.core.objectives.reverse_step_kl_weights`` assume); no noise at the last step.
- ``ddim_sample``: deterministic DDIM (eta = 0), the probability-flow discretisation, on a strided
  subset of timesteps.
- ``path_kl_to_models``: path-wise KL(P_model || P_other_i) along the model's own ancestral
  trajectories (eq. 30), together with the trajectories' end points.
- ``TrajectoryPool``: the same path KL and model samples amortised into training: a persistent
  pool of chains staggered over t, advanced one step per training step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from toy.core.diffusion import reverse_step_kl_weights, step_schedule
from toy.core.hints import EpsModel, Floats
from toy.core.objectives import path_kl_estimate




def _check_finite(x: torch.Tensor, t: int, what: str) -> None:
    if not torch.all(torch.isfinite(x)):
        raise FloatingPointError(f"non-finite {what} at sampling timestep {t}")


@torch.no_grad()
def ddpm_sample(model: EpsModel, n: int, alphas_cumprod: Floats, generator: torch.Generator, dim: int = 2,
                on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """``n`` samples (n, dim) float32 by ancestral DDPM; ``on_step(t, x_t, eps)`` is called at every
    step before the update (used to evaluate other models along the trajectory)."""
    ab, alpha, beta = step_schedule(alphas_cumprod)
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
def ddim_sample(model: EpsModel, n: int, alphas_cumprod: Floats, generator: torch.Generator, num_steps: int = 50,
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


def sample(model: EpsModel, n: int, alphas_cumprod: Floats, generator: torch.Generator, sampler: str = "ddpm",
           dim: int = 2, num_steps: int = 50) -> torch.Tensor:
    """Dispatch to ``ddpm_sample`` or ``ddim_sample``."""
    if sampler == "ddpm":
        return ddpm_sample(model, n, alphas_cumprod, generator, dim)
    if sampler == "ddim":
        return ddim_sample(model, n, alphas_cumprod, generator, num_steps, dim)
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")


@torch.no_grad()
def path_kl_to_models(model: EpsModel, others: list[EpsModel], n: int, alphas_cumprod: Floats, generator: torch.Generator,
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




class TrajectoryPool:
    """A persistent pool of the model's own ancestral DDPM chains, staggered over the timesteps, that
    advances every chain by one reverse step per call (one batched model evaluation with per-chain t).

    It turns the path-KL estimate and the model-sample estimates, which a fresh sampler pays for
    with T sequential evaluations every ``dual_every`` steps, into one evaluation per training step:

    - **Path KL** ``KL(P_model || P_other_i) = sum_t w_t E_{x_t ~ P_model} ||eps_model - eps_i||^2``:
      the chains sit at every timestep in equal numbers (``k = n / T`` per t, enforced), so at each
      advance ``sum_j w_{t_j} ||eps_model(x_j) - eps_i(x_j)||^2 / k`` is an unbiased estimate of the
      whole sum over t (stratified in t) — no trajectory has to finish. ``take_path_kl`` returns the
      mean over the advances since it was last called and its standard error. The terms are summed
      per chain slot: slots are independent of each other (each runs its own succession of
      independent chains), so the standard error is the spread across slots; it is conservative
      when the advances are not a multiple of T (slots then cover different t and their means
      differ, which the spread counts as noise).
    - **Samples** ``x_0 ~ p_model``: the ``k`` chains that reach t = 0 at each advance are end points;
      the last ``buffer`` of them are kept (``samples()``) and the chains restart from N(0, I).

    The price is staleness: a chain's early (high-noise) steps were taken by the model as it was up
    to ``T`` advances ago. Under slowly changing weights (the primal step is small) the pool's law is
    the current model's up to that lag. ``fill`` starts the pool with one full ancestral pass (chain j
    snapshotted at its assigned timestep), so the first estimates are not biased by a cold start.
    ``state_dict``/``load_state_dict`` make it checkpointable (the randomness comes from the caller's
    generator, which the caller checkpoints).
    """

    def __init__(self, alphas_cumprod, n_chains: int, buffer: int, dim: int = 2):
        ab, alpha, beta = step_schedule(alphas_cumprod)
        self.T = int(ab.shape[0])
        if n_chains < self.T or n_chains % self.T:
            raise ValueError(f"n_chains must be a positive multiple of the number of timesteps T = {self.T} "
                             f"(equal chains per timestep), got {n_chains}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self.n, self.k, self.dim, self.buffer = int(n_chains), int(n_chains) // self.T, int(dim), int(buffer)
        self._c_eps = (beta / (1.0 - ab).sqrt()).float()
        self._inv_sqrt_alpha = (1.0 / alpha.sqrt()).float()
        self._sigma = beta.sqrt().float()
        # per-t update x <- a_t x - c_t eps + s_t z in one gather (s_0 = 0: the last step is the mean)
        self._coef = torch.stack([self._inv_sqrt_alpha, self._c_eps * self._inv_sqrt_alpha,
                                  torch.where(torch.arange(self.T) > 0, self._sigma, 0.0)], 1).unsqueeze(2)
        self._ab = ab
        self._w = reverse_step_kl_weights(ab)
        # after a advances chain j sits at timestep (T-1 - j - a) mod T: every t holds k chains, and the
        # whole layout is a function of the phase a mod T, so each phase's timesteps, update
        # coefficients and finishing slots are tabulated once (an advance is then a few views)
        j = torch.arange(self.n)
        self._t_phase = torch.stack([(self.T - 1 - j - a) % self.T for a in range(self.T)]).long()  # (T, n)
        self._coef_phase = self._coef[self._t_phase]  # (T, n, 3, 1)
        self._done_phase = [torch.nonzero(self._t_phase[a] == 0).squeeze(1) for a in range(self.T)]
        self._phase = 0
        self.t = self._t_phase[0]
        self.x = torch.zeros(self.n, self.dim)
        self.ends = torch.zeros(0, self.dim)
        self._kl_slots: torch.Tensor | None = None  # (m, n) per-slot sums of path-KL terms
        self._advances = 0
        self.filled = False
        self.others_seconds = 0.0  # wall time of the last advance's evaluation of ``others``

    @torch.no_grad()
    def fill(self, model: EpsModel, generator: torch.Generator) -> None:
        """One ancestral pass of ``n`` chains from N(0, I); chain j keeps its state at its own
        timestep; the pass's end points seed the sample buffer."""
        snap = torch.empty(self.n, self.dim)

        def keep(t, x, eps):  # chain j's state when the pass reaches its own timestep
            at = self.t == t
            snap[at] = x[at]

        x = ddpm_sample(model, self.n, self._ab, generator, self.dim, on_step=keep)
        self.x = snap
        self.ends = x[-self.buffer:].clone()
        self.filled = True

    @torch.no_grad()
    def advance(self, model: EpsModel, generator: torch.Generator, others: tuple[EpsModel, ...] = ()) -> None:
        """One reverse step of every chain; with ``others`` also one stratified path-KL term each."""
        if not self.filled:
            raise RuntimeError("call fill(model, generator) before advance")
        eps = model(self.x, self.t).to(torch.float32)
        if not bool(torch.isfinite(eps).all()):
            raise FloatingPointError(f"non-finite eps at sampling timestep {int(self.t.min())}")
        self.others_seconds = 0.0
        if others:
            t0 = time.perf_counter()
            w = self._w[self.t]
            terms = torch.stack([w * (eps.double() - o(self.x, self.t).double()).pow(2).sum(1) for o in others])
            self._kl_slots = terms if self._kl_slots is None else self._kl_slots + terms
            self._advances += 1
            self.others_seconds = time.perf_counter() - t0
        a, c, sig = self._coef_phase[self._phase].unbind(1)
        noise = torch.randn(self.n, self.dim, generator=generator)
        x = torch.addcmul(torch.addcmul(a * self.x, c, eps, value=-1.0), sig, noise)
        # the k chains at t = 0 end here (sig = 0 there): keep their end points, restart those slots
        done = self._done_phase[self._phase]
        self.ends = torch.cat([self.ends, x.index_select(0, done)])[-self.buffer:]
        self.x = x.index_copy_(0, done, noise.index_select(0, done))
        self._phase = (self._phase + 1) % self.T
        self.t = self._t_phase[self._phase]

    def take_path_kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean path-KL estimate (m,) over the advances since the last call and its standard error
        (m,) from the spread across the independent chain slots; resets the accumulator."""
        if self._kl_slots is None:
            raise RuntimeError("no path-KL terms accumulated: advance(model, generator, others) first")
        scale = 1.0 / (self.k * self._advances)
        est = self._kl_slots.sum(1) * scale
        se = self._kl_slots.std(1) * np.sqrt(self.n) * scale
        self._kl_slots, self._advances = None, 0
        return est, se

    def samples(self) -> torch.Tensor:
        """The most recent ``buffer`` end points (fewer while fewer chains than that have finished:
        ``fill`` seeds ``min(n_chains, buffer)``)."""
        return self.ends

    def state_dict(self) -> dict:
        return {"x": self.x.clone(), "t": self.t.clone(), "ends": self.ends.clone(),
                "kl_slots": None if self._kl_slots is None else self._kl_slots.clone(),
                "advances": self._advances, "filled": self.filled,
                "shape": (self.T, self.n, self.buffer, self.dim)}

    def load_state_dict(self, s: dict) -> None:
        if tuple(s["shape"]) != (self.T, self.n, self.buffer, self.dim):
            raise ValueError(f"pool state of shape {tuple(s['shape'])} does not fit this pool "
                             f"{(self.T, self.n, self.buffer, self.dim)}")
        self.x, self.ends = s["x"].clone(), s["ends"].clone()
        self._phase = int((self.T - 1 - int(s["t"][0])) % self.T)
        if not torch.equal(s["t"].long(), self._t_phase[self._phase]):
            raise ValueError("pool state's timesteps are not a staggered layout of this pool")
        self.t = self._t_phase[self._phase]
        self._kl_slots = None if s["kl_slots"] is None else s["kl_slots"].clone()
        self._advances = int(s["advances"])
        self.filled = bool(s["filled"])


__all__ = ["ddpm_sample", "ddim_sample", "sample", "path_kl_to_models", "path_kl_estimate", "TrajectoryPool"]
