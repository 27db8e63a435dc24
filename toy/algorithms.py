"""The unlearning algorithms, written once against the model contract ``model(x_t, t) -> eps``
(docs/math.md §4). Each algorithm is a *primal step* (a loss for the trainable network at the current
multipliers, and optionally the constraint estimates that come for free with it) plus, for the
primal-dual variants, a *constraint estimator* feeding ``toy.core.dual.DualState``; ``unlearn`` runs
either with checkpoints, metrics and resumption. Nothing here knows about mixtures except where an
estimator is explicitly "exact" (it takes ``MixtureEps`` densities).

| problem | algorithm | primal target at lam | constraint estimate |
|---|---|---|---|
| RU | primal_dual | composed eps, eta = lam/(1-Lam) | path KL(P_theta || Q_i) on own trajectories |
| RU | dual_only | composed eps at lam* (fixed) | lam* from the explicit x_0 tilt, no network |
| RU | esd | composed eps at a fixed eta | - |
| FU | primal_dual | signed loss E_q[l] - sum lam_i E_{q_i}[l] | ELBO: T E[w_t d (l_theta - l_i*)] on the forget batch |
| FU | siss | signed loss at a fixed lam (no importance sampling) | - |
| LU | primal_dual | Gibbs-tilt eps (``gibbs_tilt_eps_target``) | E_{p_theta}[g_i(x_0)], exact g or diffusion classifier |
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from toy.core.dual import DualState
from toy.models import constraint_function, gibbs_tilt_eps_target
from toy.core.objectives import composed_eps_target, denoising_loss, eta_from_lam, lam_from_eta, log_ratio_from_denoising_losses, signed_denoising_objective
from toy.core.diffusion import reverse_step_kl_weights
from toy.core.diffusion import noised
from toy.core.runs import RunDir
from toy.sampling import TrajectoryPool, ddpm_sample, path_kl_to_models

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


# ---------------------------------------------------------------- primal steps (one per column)

def ru_primal_loss(net, frozen, forget, x0, ab, gen, eta) -> torch.Tensor:
    """Regression of ``net`` on the composed target ``eps_q - sum eta_i (eps_i - eps_q)`` at x_t
    drawn from the noised retain data (ESD when eta is fixed)."""
    x_t, t, _ = noised(x0, ab, gen)
    with torch.no_grad():
        target = composed_eps_target(frozen(x_t, t), torch.stack([f(x_t, t) for f in forget]), eta)
    return denoising_loss(net(x_t, t), target).mean()


def elbo_constraint_terms(l_theta: torch.Tensor, l_ref: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
                          dim: int) -> torch.Tensor:
    """Per-sample unbiased terms of ``KL(Q_i -> || P_theta) = sum_t w_t E[||z - eps_theta||^2 -
    ||z - eps_i*||^2]`` (path KL of the forget law's forward process to the model's reverse
    process, up to the exact reverse's discretisation error) for t uniform on 0..T-1:
    ``T w_t d (l_theta - l_ref)`` with l per-dimension mean losses. ``l_ref`` is the loss of the
    exact forget eps (identically 0 for a single training point, whose eps*(x_t) is z)."""
    T = w.shape[0]
    return T * w[t].to(l_theta) * dim * (l_theta - l_ref)


def fu_primal(net, x0_retain, x0_forget: list, ab, gen, lam, forget_exact: list, w: torch.Tensor):
    """Signed denoising objective ``E_q[l] - sum lam_i E_{q_i}[l]`` and, from the same forget
    batches, the ELBO constraint estimates (m,) and their per-sample terms."""
    dim = x0_retain.shape[1]
    x_t, t, z = noised(x0_retain, ab, gen)
    l_r = denoising_loss(net(x_t, t), z)
    l_f, measured, terms = [], [], []
    for i, x0f in enumerate(x0_forget):
        xf_t, tf, zf = noised(x0f, ab, gen)
        lf = denoising_loss(net(xf_t, tf), zf)
        l_f.append(lf.mean())
        with torch.no_grad():
            l_ref = denoising_loss(forget_exact[i](xf_t, tf), zf) if forget_exact else torch.zeros_like(lf)
            term = elbo_constraint_terms(lf.detach(), l_ref, tf, w, dim)
        measured.append(term.mean())
        terms.append(term)
    obj = signed_denoising_objective(l_r.mean(), torch.stack(l_f), lam.to(torch.float32))
    return obj, torch.stack(measured).double(), terms


def lu_primal_loss(net, frozen, forget_exact: list, q_exact, x0, ab, gen, lam, variant: str) -> torch.Tensor:
    """Regression of ``net`` on the Gibbs-tilt target at x_t from the noised retain data; the forget
    densities (and q's, for the ratio variant) are the exact mixtures'."""
    x_t, t, _ = noised(x0, ab, gen)
    with torch.no_grad():
        eps_q = frozen(x_t, t)
        eps_f = torch.stack([f(x_t, t) for f in forget_exact])
        log_q = q_exact.log_prob(x_t, t) if variant == "likelihood_ratio" else None
        g = torch.stack([constraint_function(variant, f.log_prob(x_t, t), log_q) for f in forget_exact])
        target = gibbs_tilt_eps_target(eps_q, eps_f, g, lam, variant)
    return denoising_loss(net(x_t, t), target).mean()


def tilt_log_weights(problem: str, lam: torch.Tensor, x0: torch.Tensor, q_exact, forget_exact: list,
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


def reweighted_dsm_loss(net, x0, log_w, ab, gen) -> torch.Tensor:
    """Self-normalised importance-weighted denoising loss ``sum_b w_b l_b / sum_b w_b`` with
    ``w = target/q`` at x_0: its minimiser is the exact noised target at *every* t (noising is
    linear in the law, as for FU's signed loss), unlike the composed-score surrogates."""
    x_t, t, z = noised(x0, ab, gen)
    w = torch.softmax(log_w, 0).to(torch.float32)
    return (w * denoising_loss(net(x_t, t), z)).sum()


def effective_sample_size(log_w: torch.Tensor) -> float:
    w = torch.softmax(log_w.double(), 0)
    return float(1.0 / (w * w).sum())


# ---------------------------------------------------------------- constraint estimators

def ru_constraint_path_kl(net, forget, n, ab, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """RU: path-wise KL(P_theta || Q_i) (m,) and its standard error from n fresh own trajectories
    (``estimate="fresh"``; the default amortises the same sum along a ``TrajectoryPool``)."""
    kl, per, _ = path_kl_to_models(net, forget, n, ab, gen)
    return kl, per.std(1) / np.sqrt(n)


def lu_constraint_exact(net, forget_exact, q_exact, n, ab, gen, variant,
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
def diffusion_classifier_log_ratio(x0, model_c, model_ref, ab, gen, n_t: int | None = None) -> torch.Tensor:
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


def lu_constraint_network(net, frozen, forget_nets, n, ab, gen,
                          x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LU ratio variant from networks only: ``E_{p_theta}[exp(log q_i/q)]`` with the log ratio from
    the diffusion classifier of the forget network against the pretrained one (at n fresh samples of
    the network, or at the given ``x0``)."""
    if x0 is None:
        x0 = ddpm_sample(net, n, ab, gen)
    n = x0.shape[0]
    g = torch.stack([diffusion_classifier_log_ratio(x0, f, frozen, ab, gen).exp() for f in forget_nets])
    return g.mean(1), g.std(1) / np.sqrt(n)


# ---------------------------------------------------------------- the loop

_MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)


def has_mode_dependent_layers(net) -> bool:
    """Whether ``net``'s output depends on train/eval mode (dropout, batch or instance norm). The
    loop switches to eval mode for its no-grad evaluations (pool advances, estimates) only then:
    the switch walks every submodule twice, ~0.1 ms per advance, a sixth of the LU pool's cost."""
    return isinstance(net, torch.nn.Module) and any(isinstance(m, _MODE_DEPENDENT) for m in net.modules())


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


def _measure_every(problem: str, algorithm: str, cfg: LoopConfig) -> int:
    if algorithm != "primal_dual":
        return 0
    return 1 if problem == "forward_kl" else cfg.dual_every


def unlearn(problem: str, algorithm: str, models: Models, dual: DualState, cfg: LoopConfig,
            run: RunDir, gen: torch.Generator, variant: str = "likelihood", lu_estimator: str = "exact",
            fixed_eta: float | None = None, progress=None, stop_after: int | None = None) -> dict:
    """Train ``models.net`` with ``algorithm``; multipliers live in ``dual`` (fixed for baselines
    and dual-only, where ``dual.lr_dual`` is 0). Resumes from ``run``'s checkpoint when present
    (same result as an uninterrupted run: all RNG states are checkpointed). Returns the history:
    ``lam`` (dual steps, m), ``measured``, ``step_seconds`` and ``dual_seconds`` per step.
    ``stop_after`` ends early after that many steps of this call (to test resumption)."""
    if algorithm not in ALGORITHMS[problem]:
        raise ValueError(f"algorithm {algorithm!r} is not defined for {problem}; choose from {ALGORITHMS[problem]}")
    if cfg.target not in ("composed", "reweighted"):
        raise ValueError(f"target must be composed or reweighted, got {cfg.target!r}")
    if cfg.estimate not in ("pool", "fresh"):
        raise ValueError(f"estimate must be 'pool' or 'fresh', got {cfg.estimate!r}")
    net, ab = models.net, torch.as_tensor(models.alphas_cumprod, dtype=torch.float32)
    w = reverse_step_kl_weights(ab)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    hist = {"lam": [], "measured": [], "measured_se": [], "step_seconds": [], "dual_seconds": [],
            "estimate_seconds": [], "pool_seconds": []}
    start = 0
    every = _measure_every(problem, algorithm, cfg)
    # the pool serves the composed target's on-policy x_0 (any RU algorithm) and the RU / LU
    # constraint estimates (primal-dual); it evaluates the forget models only when RU estimates
    pool_estimates = every > 0 and problem != "forward_kl" and cfg.estimate == "pool"
    pool = None
    pool_others: tuple = ()
    if (problem == "reverse_kl" and cfg.pool_frac > 0) or pool_estimates:
        if cfg.pool_every < 1 or (pool_estimates and cfg.dual_every % cfg.pool_every):
            raise ValueError(f"pool_every must divide dual_every = {cfg.dual_every} (every dual step needs fresh "
                             f"pool advances), got {cfg.pool_every}")
        pool = TrajectoryPool(ab, cfg.pool_chains or cfg.pool_every * int(ab.shape[0]), cfg.dual_batch, models.dim)
        if pool_estimates and problem == "reverse_kl":
            pool_others = tuple(models.forget)
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["opt"])
        dual.load_state_dict(ckpt["dual"])
        gen.set_state(ckpt["gen"])
        models.retain_data.set_state(ckpt["retain_data"])
        for d, s in zip(models.forget_data, ckpt["forget_data"]):
            d.set_state(s)
        hist = ckpt["hist"]
        if pool is not None:
            pool.load_state_dict(ckpt["pool"])
        start = ckpt["step"]
    run.begin(start, cfg.steps)  # also drops a killed attempt's rows when there was no checkpoint yet
    toggle = has_mode_dependent_layers(net)
    if pool is not None and not pool.filled:
        net.eval()
        pool.fill(net, gen)
        net.train()
    done_here = 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        frac = cfg.lr_final_frac + (1 - cfg.lr_final_frac) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * frac
        lam = dual.lam
        measured, measured_se = None, None
        if problem != "forward_kl" and cfg.target == "reweighted":
            x0 = models.retain_data(cfg.batch)
            log_w = tilt_log_weights(problem, lam if algorithm != "esd" else lam_from_eta(torch.tensor([fixed_eta])),
                                     x0, models.q_exact, models.forget_exact, variant)
            loss = reweighted_dsm_loss(net, x0, log_w, ab, gen)
        elif problem == "reverse_kl":
            eta = torch.tensor([fixed_eta]) if algorithm == "esd" else eta_from_lam(lam)
            x0 = models.retain_data(cfg.batch)
            if cfg.pool_frac > 0:
                # the regression target is a fixed function of (x_t, t); it must be fitted where the
                # model's own sampler goes, which a strong tilt moves outside q's support
                own = pool.samples()
                k = int(round(cfg.pool_frac * cfg.batch))
                x0 = torch.cat([x0[: cfg.batch - k], own[torch.randint(0, own.shape[0], (k,), generator=gen)]])
            loss = ru_primal_loss(net, models.frozen, models.forget, x0, ab, gen, eta.float())
        elif problem == "forward_kl":
            loss, measured, _ = fu_primal(net, models.retain_data(cfg.batch),
                                          [d(cfg.forget_batch) for d in models.forget_data], ab, gen,
                                          lam, models.forget_exact, w)
        else:
            x0 = models.retain_data(cfg.batch)
            loss = lu_primal_loss(net, models.frozen, models.forget_exact, models.q_exact, x0, ab, gen, lam, variant)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (lam={lam.tolist()}); "
                                     f"the last good checkpoint is kept in {run.checkpoint_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        est_s = 0.0
        dual_s = 0.0
        pool_s = 0.0
        if pool is not None and step % cfg.pool_every == 0:
            if toggle:
                net.eval()
            pool.advance(net, gen, pool_others)
            if toggle:
                net.train()
            est_s = pool.others_seconds  # the constraint's share of the advance (0 without others)
            pool_s = time.perf_counter() - t1 - est_s
        if every and step % every == 0:
            if measured is None:
                te = time.perf_counter()
                if toggle:
                    net.eval()
                own = pool.samples() if pool_estimates else None
                if problem == "reverse_kl" and pool_estimates:
                    measured, measured_se = pool.take_path_kl()
                elif problem == "reverse_kl":
                    measured, measured_se = ru_constraint_path_kl(net, models.forget, cfg.dual_batch, ab, gen)
                elif lu_estimator == "network":
                    measured, measured_se = lu_constraint_network(net, models.frozen, models.forget_nets,
                                                                  cfg.dual_batch, ab, gen, own)
                else:
                    measured, measured_se = lu_constraint_exact(net, models.forget_exact, models.q_exact,
                                                                cfg.dual_batch, ab, gen, variant, own)
                if toggle:
                    net.train()
                est_s += time.perf_counter() - te
            td = time.perf_counter()
            dual.step(measured, measured_se)
            dual_s = time.perf_counter() - td
            hist["lam"].append(dual.lam.tolist())
            hist["measured"].append(measured.tolist())
            hist["measured_se"].append(None if measured_se is None else measured_se.tolist())
        hist["step_seconds"].append(t1 - t0)
        hist["dual_seconds"].append(dual_s)
        hist["estimate_seconds"].append(est_s)
        hist["pool_seconds"].append(pool_s)
        row = {"loss": loss.item(), "lam": dual.lam.tolist()}
        if measured is not None:
            row["constraint"] = measured.tolist()
        run.log_metrics(step, **row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(lam=", ".join(f"{v:.4g}" for v in dual.lam.tolist()), refresh=False)
        done_here += 1
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.checkpoint_every == 0 or last:
            run.save_checkpoint({"net": net.state_dict(), "opt": opt.state_dict(), "dual": dual.state_dict(),
                                 "gen": gen.get_state(), "retain_data": models.retain_data.state(),
                                 "forget_data": [d.state() for d in models.forget_data], "hist": hist,
                                 "pool": None if pool is None else pool.state_dict(),
                                 "step": step + 1})
        if stop_after is not None and done_here >= stop_after:
            break
    return hist


def averaged_lam(hist: dict, dual: DualState, frac: float) -> np.ndarray:
    """Polyak-Ruppert average of the last ``frac`` of the dual iterates (the final lam when the
    multipliers are fixed)."""
    lam = np.asarray(hist["lam"], dtype=np.float64)
    if lam.size == 0:
        return dual.lam.numpy().copy()
    k = max(1, int(round(frac * lam.shape[0])))
    return lam[-k:].mean(0)


def lam_window(lam_hist, gain: float) -> dict:
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
