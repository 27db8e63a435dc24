"""The toy run's configuration, resolved once: ``ToyConfig`` (every field has its default here and is
recorded in ``run.json``), its validation, and the settings derived from it (noise schedule, primal
target, the dual step's violation scale, pool size, estimate delay and delay-limited gain, eq. 36).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from toy.algorithms import ALGORITHMS

log = logging.getLogger(__name__)


#: dual step size = DUAL_GAIN / |d constraint / d lam| at lam* (a Newton-scaled ascent; see docs/toy.md)
DUAL_GAIN = {"reverse_kl": 0.3, "forward_kl": 0.02, "likelihood": 0.3}


@dataclass(frozen=True)
class ToyConfig:
    problem: str = "reverse_kl"
    algorithm: str = "primal_dual"
    budgets: tuple[float, ...] = ()  # empty: the instance's default budgets
    out: str = "runs/toy"
    seed: int = 0
    variant: str = "likelihood"  # LU constraint g: likelihood | likelihood_ratio | log_likelihood
    lu_estimator: str = "exact"  # LU constraint estimate: exact mixture g, or network (ratio only)
    target: str = ""  # RU/LU primal target: composed (surrogate at t > 0) | reweighted (exact); "": RU composed, LU reweighted
    eta: float = 1.0  # ESD's fixed guidance scale
    siss_lam: float = -1.0  # SISS's fixed weight; < 0: half the dual domain
    num_timesteps: int = 100
    beta_start: float = 1e-3
    beta_end: float = 0.2
    schedule: str = "linear"
    hidden: int = 128
    layers: int = 3
    time_dim: int = 32
    pretrain_steps: int = 4000
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3
    pretrained: str = ""  # a saved pretrained model to reuse (must match the instance and schedule)
    steps: int = 3000
    batch: int = 512
    forget_batch: int = 256
    lr: float = 1e-3
    lr_final_frac: float = 0.1  # cosine decay of the primal learning rate to lr * this
    pool_frac: float = 0.5  # RU composed target: half of each x_0 batch from the model's own samples
    lr_dual: float = -1.0  # < 0: dual_gain / slope at lam* (of the log constraint for violation_scale=log)
    dual_gain: float = -1.0  # < 0: DUAL_GAIN[problem]
    violation_scale: str = "auto"  # linear | log (LU only) | auto: LU log, RU/FU linear
    dual_every: int = 20
    dual_batch: int = 128  # model samples behind each LU estimate / own x_0 kept for the composed target
    # RU/LU constraint estimates: "pool" (amortised along toy.sampling.TrajectoryPool; "auto") or
    # "fresh" (dual_batch new trajectories every dual_every steps: no delay, ~50% of a primal step).
    # LU's pool estimate (its end points) is delayed, so LU's dual gain is lowered to match (docs/toy.md)
    estimate: str = "auto"
    pool_chains: int = 0  # TrajectoryPool chains (a multiple of num_timesteps; 0: pool_every x num_timesteps)
    pool_every: int = 4  # advance the pool every this many steps (a divisor of dual_every)
    checkpoint_every: int = 250
    average_frac: float = 0.25
    lam_init: tuple[float, ...] = ()  # initial multipliers (default 0; fixed ones for the baselines)
    lam_max: float = 1e4  # multipliers above this stop the run as divergent
    n_eval: int = 2000
    n_constraint: int = 10000  # samples (FU: forget draws, LU: model samples) / 5 (RU: trajectories) at the end
    n_reference: int = 2000  # trajectories per exact-score surrogate evaluation
    surrogate_reference: bool = True
    figure: bool = True
    threads: int = 1  # torch intra-op threads for toy work (set by the CLI, verify and the notebooks; recorded)


def schedule(cfg: ToyConfig) -> torch.Tensor:
    return torch.as_tensor(alphas_cumprod_for_schedule(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule),
                           dtype=torch.float32)


def primal_target(cfg: ToyConfig) -> str:
    """The RU/LU training target actually used (FU's signed loss is exact by itself)."""
    if cfg.target:
        return cfg.target
    return "reweighted" if cfg.problem == "likelihood" else "composed"


def validate(cfg: ToyConfig) -> None:
    if cfg.problem not in ALGORITHMS:
        raise ValueError(f"problem must be one of {tuple(ALGORITHMS)}, got {cfg.problem!r}")
    if cfg.algorithm not in ALGORITHMS[cfg.problem]:
        raise ValueError(f"algorithm {cfg.algorithm!r} is not defined for {cfg.problem}; choose from {ALGORITHMS[cfg.problem]}")
    if cfg.variant not in ("likelihood", "likelihood_ratio", "log_likelihood"):
        raise ValueError(f"variant must be likelihood, likelihood_ratio or log_likelihood, got {cfg.variant!r}")
    if cfg.lu_estimator not in ("exact", "network"):
        raise ValueError(f"lu_estimator must be exact or network, got {cfg.lu_estimator!r}")
    if cfg.target not in ("", "composed", "reweighted"):
        raise ValueError(f"target must be composed or reweighted, got {cfg.target!r}")
    if cfg.lu_estimator == "network" and cfg.variant != "likelihood_ratio":
        raise ValueError("the network (diffusion-classifier) LU estimator gives log q_i/q: use variant=\"ratio\"")
    for name in ("steps", "batch", "forget_batch", "dual_every", "dual_batch", "checkpoint_every", "n_eval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.violation_scale not in ("auto", "linear", "log"):
        raise ValueError(f"violation_scale must be auto, linear or log, got {cfg.violation_scale!r}")
    if cfg.violation_scale == "log" and (cfg.problem != "likelihood" or cfg.variant == "log_likelihood"):
        raise ValueError("violation_scale='log' needs a positive constraint function: problem=likelihood with "
                         f"variant likelihood or likelihood_ratio, got {cfg.problem!r}, {cfg.variant!r}")
    if cfg.estimate not in ("auto", "pool", "fresh"):
        raise ValueError(f"estimate must be 'auto', 'pool' or 'fresh', got {cfg.estimate!r}")
    uses_pool = cfg.problem == "reverse_kl" or (cfg.problem == "likelihood" and estimate_kind(cfg) != "fresh")
    if cfg.pool_every < 1 or (uses_pool and cfg.dual_every % cfg.pool_every):
        raise ValueError(f"pool_every must divide dual_every = {cfg.dual_every}, got {cfg.pool_every}")
    if cfg.pool_chains < 0 or cfg.pool_chains % cfg.num_timesteps:
        raise ValueError(f"pool_chains must be 0 or a positive multiple of num_timesteps = {cfg.num_timesteps}, "
                         f"got {cfg.pool_chains}")


def violation_scale(cfg: ToyConfig) -> str:
    """The dual step's violation scale: ``cfg.violation_scale`` unless "auto" (LU with g > 0: log)."""
    if cfg.violation_scale != "auto":
        return cfg.violation_scale
    return "log" if cfg.problem == "likelihood" and cfg.variant != "log_likelihood" else "linear"


def pool_chains(cfg: ToyConfig) -> int:
    """Chains of the ``TrajectoryPool``: ``cfg.pool_chains`` unless 0 (RU: ``pool_every x T``, one end
    point per step for the on-policy x_0; LU: ``2 T``, the pool is all dual machinery there)."""
    if cfg.pool_chains:
        return cfg.pool_chains
    return (2 if cfg.problem == "likelihood" else cfg.pool_every) * cfg.num_timesteps


def estimate_delay(cfg: ToyConfig) -> float:
    """Mean age, in dual steps, of what an LU pool estimate measures: a pool end point is the model's
    chain of ``T`` advances ``pool_every`` steps apart (its kernel at the middle of that life is
    ``T pool_every / 2`` steps old), and the estimate averages the last ``dual_batch`` end points,
    ``k = chains / T`` per advance (another half window). 0 for estimators without delay."""
    if cfg.problem != "likelihood" or estimate_kind(cfg) != "pool":
        return 0.0
    k = pool_chains(cfg) // cfg.num_timesteps
    age = cfg.num_timesteps * cfg.pool_every / 2 + (cfg.dual_batch / k) * cfg.pool_every / 2
    return age / cfg.dual_every


def delay_limited_gain(cfg: ToyConfig) -> float:
    """Dual gain (the fraction of the linearised distance to the root taken per dual step):
    ``DUAL_GAIN[problem]``, lowered for a delayed estimate to ``(pi/6) / D`` (D the delay in dual
    steps): a Newton-scaled dual ascent is an integral controller of gain k on a unit plant, and
    with a pure delay D its loop ``k e^{-sD} / s`` crosses over at ``omega = k`` with phase margin
    ``pi/2 - k D``; ``k D = pi/6`` keeps a 60-degree margin (docs/toy.md, "LU's dual step")."""
    d = estimate_delay(cfg)
    return min(DUAL_GAIN[cfg.problem], (np.pi / 6) / d) if d > 0 else DUAL_GAIN[cfg.problem]


def estimate_kind(cfg: ToyConfig) -> str:
    """The constraint estimator a config uses: RU/LU ``estimate`` unless "auto" (the trajectory pool);
    FU's is always the ELBO on its forget minibatch (free)."""
    if cfg.problem == "forward_kl":
        return "forget-minibatch ELBO"
    if cfg.estimate != "auto":
        return cfg.estimate
    return "pool"
