"""The unlearning algorithms as a table in code, written once against the model contract
``model(x_t, t) -> eps`` (docs/math.md §4). Every row is an ``Algorithm``: a *primal step* (the
regression rows the trainable network fits at the current multipliers, a ``Batch``) and, for the
primal-dual variants, a *constraint estimator* feeding the dual update (``toy.core.dual``). One loop,
``toy.loop.train``, runs every row, for one network or a stacked ensemble of them.

| problem | algorithm | primal step at lam (``Batch``) | constraint estimator |
|---|---|---|---|
| RU | primal_dual | ``composed_step``: composed eps, eta = lam/(1-Lam) (eq. 26) | ``path_kl_pool`` / ``path_kl_fresh`` (eq. 30) |
| RU | dual_only | ``composed_step`` at lam* of the explicit x_0 tilt (fixed) | - |
| RU | esd | ``composed_step`` at lam = eta/(1+eta) (fixed, eq. 8) | - |
| FU | primal_dual | ``signed_step``: E_q[l] - sum lam_i E_{q_i}[l] (eq. 27) | ``elbo_estimate``: T E[w_t d (l_theta - l_i*)] on the step's forget rows (eq. 31) |
| FU | siss | ``signed_step`` at a fixed lam | - |
| LU | primal_dual | ``gibbs_step``: Gibbs-tilt eps (eq. 28) | ``g_exact`` / ``g_network`` at the model's samples (eq. 32) |

RU and LU also train the exact target instead of the surrogate: ``reweighted_step``, the
self-normalised importance-weighted denoising loss with the x_0 tilt as weights (``target =
"reweighted"``). A fixed multiplier (ESD, SISS, dual-only) lives in the dual state with step size 0,
set once by the run's dual set-up; the primal steps read the multipliers only from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from toy.core.diffusion import noised, reverse_step_kl_weights
from toy.core.objectives import composed_eps_target, denoising_loss, eta_from_lam, \
    log_ratio_from_denoising_losses, signed_denoising_objective
from toy.models import constraint_function, gibbs_tilt_eps_target
from toy.sampling import TrajectoryPool, ddpm_sample, path_kl_to_models

if TYPE_CHECKING:
    from toy.core.dual import DualState
    from toy.core.hints import EpsModel
    from toy.models import MixtureEps

#: a constraint estimator's answer: the estimates (m,) and their standard errors (m,) or None
Estimate = tuple[torch.Tensor, torch.Tensor | None]

log = logging.getLogger(__name__)

ALGORITHMS = {
    "reverse_kl": ("primal_dual", "dual_only", "esd"),
    "forward_kl": ("primal_dual", "siss"),
    "likelihood": ("primal_dual",),
}


@dataclass
class Models:
    """Everything an algorithm touches. ``net`` is trained; ``frozen`` is the pretrained model (eps
    of q); ``forget`` are eps models of the q_i (exact or networks); ``forget_exact``/``q_exact``
    are ``MixtureEps`` where densities are needed (FU control variate, LU g); ``retain_data`` and
    ``forget_data`` draw x_0 minibatches (``state``/``set_state`` for resumption)."""

    net: torch.nn.Module
    frozen: Callable
    forget: list
    retain_data: Callable
    forget_data: list
    alphas_cumprod: torch.Tensor
    forget_exact: list = field(default_factory=list)
    q_exact: object = None
    forget_nets: list = field(default_factory=list)
    dim: int = 2


@dataclass(frozen=True)
class LoopConfig:
    """The unlearning loop's settings: the ``train`` section of ``toy.config.ToyConfig`` (these are its
    defaults). ``None`` means "derived from the rest of the run's config": ``toy.config.resolve``
    fills it in before a run, so ``unlearn`` always sees concrete values."""

    steps: int = 3000
    batch: int = 512
    forget_batch: int = 256
    lr: float = 1e-3
    dual_every: int = 20
    dual_batch: int = 128  # model samples behind each LU estimate / own x_0 kept for the composed target
    checkpoint_every: int = 250
    average_frac: float = 0.25
    lr_final_frac: float = 0.1  # cosine decay of the primal learning rate to lr * this (1: constant)
    pool_frac: float = 0.5  # RU composed target: fraction of x_0 drawn from the model's own samples (else 0)
    target: str | None = None  # RU/LU primal target: composed-score surrogate or reweighted DSM (exact); None: LU reweighted, else composed
    estimate: str | None = None  # RU/LU constraint: "pool" (TrajectoryPool, amortised) or "fresh"; None: pool
    pool_chains: int | None = None  # TrajectoryPool chains (a multiple of T); None: LU 2 T, else pool_every * T
    pool_every: int = 4  # advance the pool every this many steps (dual_every must be a multiple)
    # primal recovery: after ``steps``, this fraction of them more at the reported multiplier (fixed) and
    # the final lr, so the final network is the Lagrangian minimiser at that lam, not at the last noisy
    # dual iterate (docs/toy.md, "Settling at the reported multiplier")
    settle_frac: float = 0.1

    @property
    def settle_steps(self) -> int:
        return int(round(self.settle_frac * self.steps))

    @property
    def total_steps(self) -> int:
        """Training steps in all: ``steps`` with dual steps, then ``settle_steps`` at a fixed multiplier."""
        return self.steps + self.settle_steps




# ---------------------------------------------------------------- the contract of a row

@dataclass(frozen=True)
class Composed:
    """A regression target that needs the pretrained model at its rows: ``eps_q - sum eta_i (eps_i -
    eps_q)`` (eq. 26). The trainer evaluates ``eps_q`` (batched across an ensemble, with the trained
    network's arithmetic, so that at eta = 0 the target is the network's own output) and calls
    ``resolve``."""

    eps_forget: torch.Tensor  # (m, B, d)
    eta: torch.Tensor  # (m,) float32

    def resolve(self, eps_q: torch.Tensor) -> torch.Tensor:
        return composed_eps_target(eps_q, self.eps_forget, self.eta)


@dataclass
class Batch:
    """What one primal step asks the network to fit: segments ``(x_t, t, target)`` (a target is a
    tensor or ``Composed``) and the ``objective`` that combines the per-row denoising losses of the
    segments (a list of (B_k,) tensors) into the step's scalar loss. ``extras`` carries what a
    constraint estimator reads from the same draws (FU: the forget rows' timesteps and the exact
    forget model's losses)."""

    segments: list
    objective: Callable[[list], torch.Tensor]
    extras: dict = field(default_factory=dict)


@dataclass
class Context:
    """One member's view of training: its models and data streams, the schedule (``ab``) and the
    path-KL weights, the loop settings, its generator and trajectory pool, the trainer's callable for
    its network (``net``, the model contract) and LU's ``variant``."""

    problem: str
    models: Models
    ab: torch.Tensor
    kl_weights: torch.Tensor
    loop: "LoopConfig"
    gen: torch.Generator
    net: Callable | None = None
    pool: TrajectoryPool | None = None
    variant: str = "likelihood"


@dataclass(frozen=True)
class Algorithm:
    """One row of the table: ``primal(ctx, lam) -> Batch``; ``estimate(ctx, batch, losses) ->
    (measured (m,), stderr (m,) or None)``, or None for fixed multipliers; ``every``: steps between
    dual steps (0: never); ``pool``: whether the row keeps a ``TrajectoryPool`` of the model's chains,
    and ``pool_others`` whether its advances also accumulate path-KL terms against the forget models."""

    problem: str
    name: str
    primal: Callable[[Context, torch.Tensor], Batch]
    estimate: Callable | None = None
    every: int = 0
    pool: bool = False
    pool_others: bool = False


# ---------------------------------------------------------------- primal steps

def _mean_loss(losses: list) -> torch.Tensor:
    return losses[0].mean()


def composed_step(ctx: Context, lam: torch.Tensor) -> Batch:
    """RU (primal-dual, dual-only, ESD): the composed target at ``eta = lam / (1 - Lam)`` at x_t from
    the noised retain data, a fraction ``pool_frac`` of the x_0 drawn from the model's own samples."""
    loop, models, gen = ctx.loop, ctx.models, ctx.gen
    eta = eta_from_lam(lam).float()
    x0 = models.retain_data(loop.batch)
    if loop.pool_frac > 0:
        # the regression target is a fixed function of (x_t, t); it must be fitted where the
        # model's own sampler goes, which a strong tilt moves outside q's support
        own = ctx.pool.samples()
        k = int(round(loop.pool_frac * loop.batch))
        x0 = torch.cat([x0[: loop.batch - k], own[torch.randint(0, own.shape[0], (k,), generator=gen)]])
    x_t, t, _ = noised(x0, ctx.ab, gen)
    with torch.no_grad():
        eps_f = torch.stack([f(x_t, t) for f in models.forget])
    return Batch([(x_t, t, Composed(eps_f, eta))], _mean_loss)


def reweighted_step(ctx: Context, lam: torch.Tensor) -> Batch:
    """RU/LU exact target: the denoising loss weighted by the x_0 tilt ``target / q``
    (self-normalised; ``tilt_log_weights``), whose minimiser is the exact noised target at every t."""
    models = ctx.models
    x0 = models.retain_data(ctx.loop.batch)
    log_w = tilt_log_weights(ctx.problem, lam, x0, models.q_exact, models.forget_exact, ctx.variant)
    x_t, t, z = noised(x0, ctx.ab, ctx.gen)
    w = torch.softmax(log_w, 0).to(torch.float32)
    return Batch([(x_t, t, z)], lambda losses: (w * losses[0]).sum(), {"log_w": log_w})


def signed_step(ctx: Context, lam: torch.Tensor) -> Batch:
    """FU (primal-dual, SISS): the signed denoising objective ``E_q[l] - sum lam_i E_{q_i}[l]``
    (eq. 27) on a retain batch and one forget batch per constraint; the exact forget models' losses
    on the same forget rows ride along for the ELBO estimate."""
    loop, models, gen = ctx.loop, ctx.models, ctx.gen
    x0r = models.retain_data(loop.batch)
    x0f = [d(loop.forget_batch) for d in models.forget_data]
    x_t, t, z = noised(x0r, ctx.ab, gen)
    segments, tf_, l_ref = [(x_t, t, z)], [], []
    for i, x in enumerate(x0f):
        xf_t, tf, zf = noised(x, ctx.ab, gen)
        segments.append((xf_t, tf, zf))
        tf_.append(tf)
        with torch.no_grad():
            l_ref.append(denoising_loss(models.forget_exact[i](xf_t, tf), zf) if models.forget_exact
                         else torch.zeros(xf_t.shape[0]))
    lam32 = lam.to(torch.float32)

    def objective(losses: list) -> torch.Tensor:
        return signed_denoising_objective(losses[0].mean(), torch.stack([l.mean() for l in losses[1:]]), lam32)

    return Batch(segments, objective, {"t_forget": tf_, "l_ref": l_ref})


def gibbs_step(ctx: Context, lam: torch.Tensor) -> Batch:
    """LU with the composed target: regression on the Gibbs-tilt eps (eq. 28) at x_t from the
    noised retain data, with the exact forget densities (and q's, for the ratio variant)."""
    models = ctx.models
    x_t, t, _ = noised(models.retain_data(ctx.loop.batch), ctx.ab, ctx.gen)
    with torch.no_grad():
        eps_q = models.frozen(x_t, t)
        eps_f = torch.stack([f(x_t, t) for f in models.forget_exact])
        log_q = models.q_exact.log_prob(x_t, t) if ctx.variant == "likelihood_ratio" else None
        g = torch.stack([constraint_function(ctx.variant, f.log_prob(x_t, t), log_q) for f in models.forget_exact])
        target = gibbs_tilt_eps_target(eps_q, eps_f, g, lam, ctx.variant)
    return Batch([(x_t, t, target)], _mean_loss)


def segment_losses(net: EpsModel, frozen: EpsModel, batch: Batch) -> list[torch.Tensor]:
    """Per-row denoising losses of one plain network on each of ``batch``'s segments (``Composed``
    targets resolved with ``frozen``, without gradient)."""
    losses = []
    for x_t, t, target in batch.segments:
        if isinstance(target, Composed):
            with torch.no_grad():
                target = target.resolve(frozen(x_t, t))
        losses.append(denoising_loss(net(x_t, t), target))
    return losses


def batch_loss(net: EpsModel, frozen: EpsModel, batch: Batch) -> torch.Tensor:
    """The step's loss for one plain network: ``batch.objective`` of its ``segment_losses``."""
    return batch.objective(segment_losses(net, frozen, batch))


def ru_primal_loss(net: EpsModel, frozen: EpsModel, forget: list[EpsModel], x0: torch.Tensor, ab: torch.Tensor,
                   gen: torch.Generator, eta: torch.Tensor) -> torch.Tensor:
    """Regression of ``net`` on the composed target ``eps_q - sum eta_i (eps_i - eps_q)`` at x_t
    drawn from the noised data ``x0`` (``composed_step``'s loss, for a given eta)."""
    x_t, t, _ = noised(x0, ab, gen)
    with torch.no_grad():
        target = Composed(torch.stack([f(x_t, t) for f in forget]), eta).resolve(frozen(x_t, t))
    return denoising_loss(net(x_t, t), target).mean()


# ---------------------------------------------------------------- the x_0 tilt and the estimators

def tilt_log_weights(problem: str, lam: torch.Tensor, x0: torch.Tensor, q_exact: MixtureEps, forget_exact: list[MixtureEps],
                     variant: str = "likelihood") -> torch.Tensor:
    """log of the x_0 density ratio target/q up to a constant (B,): RU ``sum eta_i (log q - log q_i)``,
    LU ``-sum lam_i g_i``. Exact densities here; at scale a diffusion classifier gives the ratios."""
    log_qi = torch.stack([f.log_prob(x0) for f in forget_exact])
    log_q = q_exact.log_prob(x0)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if problem == "reverse_kl":
        return (eta_from_lam(lam).unsqueeze(1) * (log_q.unsqueeze(0) - log_qi)).sum(0)
    if problem == "likelihood":
        g = torch.stack([constraint_function(variant, lq, log_q) for lq in log_qi])
        return -(lam.unsqueeze(1) * g).sum(0)
    raise ValueError(f"no x_0 tilt for {problem!r}")


def elbo_constraint_terms(l_theta: torch.Tensor, l_ref: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
                          dim: int) -> torch.Tensor:
    """Per-sample unbiased terms of ``KL(Q_i -> || P_theta) = sum_t w_t E[||z - eps_theta||^2 -
    ||z - eps_i*||^2]`` (path KL of the forget law's forward process to the model's reverse
    process, up to the exact reverse's discretisation error) for t uniform on 0..T-1:
    ``T w_t d (l_theta - l_ref)`` with l per-dimension mean losses. ``l_ref`` is the loss of the
    exact forget eps (identically 0 for a single training point, whose eps*(x_t) is z)."""
    T = w.shape[0]
    return T * w[t].to(l_theta) * dim * (l_theta - l_ref)


def effective_sample_size(log_w: torch.Tensor) -> float:
    w = torch.softmax(log_w.double(), 0)
    return float(1.0 / (w * w).sum())



def ru_constraint_path_kl(net: EpsModel, forget: list[EpsModel], n: int, ab: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RU: path-wise KL(P_theta || Q_i) (m,) and its standard error from n fresh own trajectories
    (``estimate="fresh"``; the default amortises the same sum along a ``TrajectoryPool``)."""
    kl, per, _ = path_kl_to_models(net, forget, n, ab, gen)
    return kl, per.std(1) / np.sqrt(n)


def lu_constraint_exact(net: EpsModel, forget_exact: list[MixtureEps], q_exact: MixtureEps, n: int, ab: torch.Tensor,
                        gen: torch.Generator, variant: str,
                        x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LU: ``E_{p_theta}[g_i(x_0)]`` (m,) with the exact g at n DDPM samples of the network (or at
    the given samples ``x0`` of it, e.g. a ``TrajectoryPool``'s end points)."""
    if x0 is None:
        x0 = ddpm_sample(net, n, ab, gen)
    n = x0.shape[0]
    log_q = q_exact.log_prob(x0) if variant == "likelihood_ratio" else None
    g = torch.stack([constraint_function(variant, f.log_prob(x0), log_q) for f in forget_exact])
    return g.mean(1), g.std(1) / np.sqrt(n)


@torch.no_grad()
def diffusion_classifier_log_ratio(x0: torch.Tensor, model_c: EpsModel, model_ref: EpsModel, ab: torch.Tensor,
                                   gen: torch.Generator, n_t: int | None = None) -> torch.Tensor:
    """``log q_c(x0)/q_ref(x0)`` (B,) from denoising-loss differences (eq. 32,
    ``toy.core.objectives.log_ratio_from_denoising_losses``), summed over every timestep (n_t None) with
    one shared noise draw per (sample, t)."""
    ab = torch.as_tensor(ab, dtype=torch.float32)
    T = ab.shape[0]
    w = reverse_step_kl_weights(ab).float()
    B, d = x0.shape
    ts = range(T) if n_t is None else torch.randint(0, T, (n_t,), generator=gen).tolist()
    out = torch.zeros(B, dtype=torch.float64)
    for t in ts:
        tt = torch.full((B,), t, dtype=torch.long)
        z = torch.randn(x0.shape, generator=gen)
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * z
        l_c = denoising_loss(model_c(x_t, tt), z)
        l_r = denoising_loss(model_ref(x_t, tt), z)
        est = log_ratio_from_denoising_losses(l_c, l_r, w[tt] * d, T)  # T w_t d (l_ref - l_c)
        out += est.double() / len(ts)
    return out


def lu_constraint_network(net: EpsModel, frozen: EpsModel, forget_nets: list[EpsModel], n: int, ab: torch.Tensor,
                          gen: torch.Generator,
                          x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LU ratio variant from networks only: ``E_{p_theta}[exp(log q_i/q)]`` with the log ratio from
    the diffusion classifier of the forget network against the pretrained one (at n fresh samples of
    the network, or at the given ``x0``)."""
    if x0 is None:
        x0 = ddpm_sample(net, n, ab, gen)
    n = x0.shape[0]
    g = torch.stack([diffusion_classifier_log_ratio(x0, f, frozen, ab, gen).exp() for f in forget_nets])
    return g.mean(1), g.std(1) / np.sqrt(n)




# ---------------------------------------------------------------- estimators behind the row contract

def elbo_estimate(ctx: Context, batch: Batch, losses: list) -> Estimate:
    """FU: the ELBO constraint estimate from the step's own forget rows (free; eq. 31)."""
    dim = ctx.models.dim
    terms = [elbo_constraint_terms(l.detach(), l_ref, tf, ctx.kl_weights, dim)
             for l, l_ref, tf in zip(losses[1:], batch.extras["l_ref"], batch.extras["t_forget"])]
    return torch.stack([term.mean() for term in terms]).double(), None


def path_kl_pool(ctx: Context, batch: Batch, losses: list) -> Estimate:
    """RU: the path KL accumulated along the pool's advances since the last dual step."""
    return ctx.pool.take_path_kl()


def path_kl_fresh(ctx: Context, batch: Batch, losses: list) -> Estimate:
    """RU: the path KL on ``dual_batch`` fresh trajectories of the network."""
    return ru_constraint_path_kl(ctx.net, ctx.models.forget, ctx.loop.dual_batch, ctx.ab, ctx.gen)


def g_exact(ctx: Context, batch: Batch, losses: list) -> Estimate:
    """LU: ``E_{p_theta}[g_i]`` with the exact g at the pool's end points (or fresh samples)."""
    own = ctx.pool.samples() if ctx.pool is not None else None
    return lu_constraint_exact(ctx.net, ctx.models.forget_exact, ctx.models.q_exact, ctx.loop.dual_batch, ctx.ab,
                               ctx.gen, ctx.variant, own)


def g_network(ctx: Context, batch: Batch, losses: list) -> Estimate:
    """LU (ratio variant): g from the diffusion classifier of the forget networks (eq. 32)."""
    own = ctx.pool.samples() if ctx.pool is not None else None
    return lu_constraint_network(ctx.net, ctx.models.frozen, ctx.models.forget_nets, ctx.loop.dual_batch, ctx.ab,
                                 ctx.gen, own)


# ---------------------------------------------------------------- the table

def algorithm(problem: str, name: str, loop: "LoopConfig", lu_estimator: str = "exact") -> Algorithm:
    """The row ``(problem, name)`` of the table for the loop's settings (its primal target, its
    estimate: pool or fresh, its dual cadence)."""
    if problem not in ALGORITHMS:
        raise ValueError(f"problem must be one of {tuple(ALGORITHMS)}, got {problem!r}")
    if name not in ALGORITHMS[problem]:
        raise ValueError(f"algorithm {name!r} is not defined for {problem}; choose from {ALGORITHMS[problem]}")
    if loop.target not in ("composed", "reweighted"):
        raise ValueError(f"target must be composed or reweighted, got {loop.target!r}")
    if loop.estimate not in ("pool", "fresh"):
        raise ValueError(f"estimate must be 'pool' or 'fresh', got {loop.estimate!r}")
    if lu_estimator not in ("exact", "network"):
        raise ValueError(f"lu_estimator must be exact or network, got {lu_estimator!r}")
    dual = name == "primal_dual"
    if problem == "forward_kl":
        return Algorithm(problem, name, signed_step, elbo_estimate if dual else None, 1 if dual else 0)
    if loop.target == "reweighted":
        primal = reweighted_step
    else:
        primal = composed_step if problem == "reverse_kl" else gibbs_step
    pooled = dual and loop.estimate == "pool"
    if problem == "reverse_kl":
        estimate = (path_kl_pool if pooled else path_kl_fresh) if dual else None
        on_policy = primal is composed_step and loop.pool_frac > 0
        return Algorithm(problem, name, primal, estimate, loop.dual_every if dual else 0,
                         pool=pooled or on_policy, pool_others=pooled)
    estimate = g_network if lu_estimator == "network" else g_exact
    return Algorithm(problem, name, primal, estimate, loop.dual_every, pool=pooled)


def averaged_lam(hist: dict, dual: DualState, frac: float) -> np.ndarray:
    """Polyak-Ruppert average of the last ``frac`` of the dual iterates (the final lam when the
    multipliers are fixed)."""
    lam = np.asarray(hist["lam"], dtype=np.float64)
    if lam.size == 0:
        return dual.lam.numpy().copy()
    k = max(1, int(round(frac * lam.shape[0])))
    return lam[-k:].mean(0)


def lam_window(lam_hist: np.ndarray | list, gain: float) -> dict:
    """The averaging window of a dual trajectory, derived from the dual loop's time constant, and
    whether lam has settled in it (docs/toy.md, "LU's multiplier window").

    A Newton-scaled dual ascent of gain k is an integral loop: an error decays by (1 - k) per dual
    step, time constant ``tau = 1/k`` dual steps, and the iterates' noise is correlated over about
    ``tau``. The window starts after the transient, ``3 tau`` (e^-3 = 5% of the initial distance
    left), and runs to the end; it keeps at least ``tau`` steps (or the whole run when shorter). lam is
    the window's mean. *Settled*: the drift, the mean of the window's second half minus its first,
    is within 3 of its own standard errors, ``sd sqrt(8 tau / W)`` for noise of correlation time
    tau (each half holds ~W / (4 tau) independent values; sd of the residuals about a straight line
    through the window, so a trend does not inflate it). ``lam_hist``: (n, m) dual iterates.
    Returns start, length, tau, mean (m,), drift (m,), drift_se (m,), settled (bool)."""
    lam = np.asarray(lam_hist, dtype=np.float64)
    if lam.ndim != 2 or lam.shape[0] < 2:
        raise ValueError(f"lam_hist needs at least 2 dual iterates (n, m), got shape {lam.shape}")
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain}")
    n = lam.shape[0]
    tau = 1.0 / min(gain, 1.0)
    length = max(int(np.ceil(tau)), n - int(np.ceil(3 * tau)))
    length = min(max(length, 2), n)
    w = lam[n - length:]
    half = length // 2
    first, second = w[:half], w[length - half:]
    drift = second.mean(0) - first.mean(0)
    # the noise level: residuals about a straight line through the window (a trend does not inflate it)
    s_ = np.arange(length, dtype=np.float64) - 0.5 * (length - 1)
    slope = (s_[:, None] * (w - w.mean(0))).sum(0) / max((s_ * s_).sum(), 1e-300)
    resid = w - w.mean(0) - s_[:, None] * slope
    sd = np.sqrt((resid ** 2).sum(0) / max(length - 2, 1))
    drift_se = sd * np.sqrt(8.0 * max(tau, 1.0) / length)
    settled = bool(np.all(np.abs(drift) <= 3.0 * drift_se + 1e-12))
    return {"start": n - length, "length": length, "tau": tau, "mean": w.mean(0), "drift": drift,
            "drift_se": drift_se, "settled": settled}


def lam_stderr(lam_hist: np.ndarray | list, gain: float, start: int) -> np.ndarray:
    """Standard error (m,) of the mean of the dual iterates ``lam_hist[start:]`` (the reported
    multiplier), for noise of correlation time ``tau = 1/gain`` dual steps (``lam_window``): the mean
    of W values of an AR(1) sequence has variance ``sd^2 2 tau / W`` (sd of the residuals about a
    straight line through the window, so a trend does not inflate it); at most ``sd`` when the window
    is shorter than 2 tau. 0 for fixed multipliers (gain 0 or fewer than 3 iterates)."""
    lam = np.asarray(lam_hist, dtype=np.float64)
    if lam.ndim != 2 or lam.shape[0] - start < 3 or not gain > 0:
        return np.zeros(lam.shape[1] if lam.ndim == 2 else 1)
    w = lam[start:]
    W = w.shape[0]
    tau = 1.0 / min(gain, 1.0)
    s_ = np.arange(W, dtype=np.float64) - 0.5 * (W - 1)
    slope = (s_[:, None] * (w - w.mean(0))).sum(0) / (s_ * s_).sum()
    resid = w - w.mean(0) - s_[:, None] * slope
    sd = np.sqrt((resid ** 2).sum(0) / (W - 2))
    return sd * min(1.0, np.sqrt(2.0 * max(tau, 1.0) / W))

