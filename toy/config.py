"""The toy run's configuration: ``ToyConfig`` (what is run, and one section per concern, as scale's
configs), its validation, and ``resolve``, the one place where every derived default is computed.

A field written ``None`` means "derived from the rest of the config" (``DERIVED`` lists them);
``resolve(cfg)`` returns the config with each of them filled in with the value the run uses, and
that resolved config is what ``run.json`` records and the run's fingerprint covers. After
``resolve`` no code looks for a default: it reads the fields.

    problem, variant, budgets, algorithm, eta, siss_lam, seed, out, pretrained, threads, figure
    [diffusion]   num_timesteps, beta_start, beta_end, schedule
    [model]       hidden, layers, time_dim
    [pretrain]    steps, batch, lr
    [train]       toy.algorithms.LoopConfig: steps, batch, forget_batch, lr, dual_every, dual_batch,
                  checkpoint_every, average_frac, lr_final_frac, pool_frac, target, estimate,
                  pool_chains, pool_every, settle_frac
    [dual]        lr, gain, violation_scale, lam_init, lam_max, lu_estimator
    [evaluation]  n_eval, n_constraint, n_reference, surrogate_reference

TOML files and ``--set`` address section fields with dots (``--set train.steps=2000``); in code,
``override(cfg, {"train.steps": 2000})``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

import numpy as np
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from toy.algorithms import ALGORITHMS, LoopConfig
from toy.problems import Problem, build_problem, default_instance

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

C = TypeVar("C", bound="DataclassInstance")  # a config dataclass


#: dual step size = DUAL_GAIN / |d constraint / d lam| at lam* (a Newton-scaled ascent; see docs/toy.md)
DUAL_GAIN = {"reverse_kl": 0.3, "forward_kl": 0.02, "likelihood": 0.3}

#: the fields whose ``None`` means "derived"; ``resolve`` fills every one
DERIVED = ("budgets", "siss_lam", "train.target", "train.estimate", "train.pool_chains", "dual.lr", "dual.gain",
           "dual.violation_scale", "dual.lam_init")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule (shared by pretraining, unlearning and every sampler)."""

    num_timesteps: int = 100
    beta_start: float = 1e-3
    beta_end: float = 0.2
    schedule: str = "linear"


@dataclass(frozen=True)
class ModelConfig:
    """The eps-MLP's architecture."""

    hidden: int = 128
    layers: int = 3
    time_dim: int = 32


@dataclass(frozen=True)
class PretrainConfig:
    """Denoising score matching of the pretrained network on fresh samples of q."""

    steps: int = 4000
    batch: int = 512
    lr: float = 2e-3


@dataclass(frozen=True)
class DualConfig:
    """The multipliers' dual ascent: step size, gain and violation scale (derived when ``None``), the
    initial multipliers, the divergence guard, and the LU constraint estimator feeding the step."""

    lr: float | None = None  # None: gain / |slope| at lam* (of the log constraint for violation_scale=log)
    gain: float | None = None  # None: DUAL_GAIN[problem], lowered for a delayed estimate (delay_limited_gain)
    violation_scale: str | None = None  # linear | log (LU with g > 0); None: LU with g > 0 log, else linear
    lam_init: tuple[float, ...] | None = None  # primal-dual's initial multipliers; None: 0
    lam_max: float = 1e4  # multipliers above this stop the run as divergent
    lu_estimator: str = "exact"  # LU constraint estimate: exact mixture g, or network (likelihood_ratio only)


@dataclass(frozen=True)
class EvaluationConfig:
    """Sample sizes of the end-of-run evaluation and whether to compute the surrogate reference."""

    n_eval: int = 2000
    n_constraint: int = 10000  # samples (FU: forget draws, LU: model samples) / 5 (RU: trajectories) at the end
    n_reference: int = 2000  # trajectories per exact-score surrogate evaluation
    surrogate_reference: bool = True


@dataclass(frozen=True)
class ToyConfig:
    problem: str = "reverse_kl"
    variant: str = "likelihood"  # LU constraint g: likelihood | likelihood_ratio | log_likelihood
    budgets: tuple[float, ...] | None = None  # None: the instance's default budgets
    algorithm: str = "primal_dual"
    eta: float = 1.0  # ESD's fixed guidance scale
    siss_lam: float | None = None  # SISS's fixed weight; None: half the FU dual domain
    seed: int = 0
    out: str = "runs/toy"
    pretrained: str | None = None  # a saved pretrained model to reuse (must match the instance and schedule)
    threads: int = 1  # torch intra-op threads for toy work (set by the CLI, verify and the notebooks; recorded)
    figure: bool = True
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def override(cfg: C, values: Mapping[str, Any]) -> C:
    """``cfg`` with the dotted keys of ``values`` replaced: ``override(cfg, {"train.steps": 40,
    "problem": "likelihood"})`` (lists become tuples). An unknown key is a ``ValueError`` naming it."""
    for key, value in values.items():
        cfg = _replace_path(cfg, key.split("."), tuple(value) if isinstance(value, list) else value, key)
    return cfg


def _replace_path(obj, parts: list[str], value, key: str):
    names = [f.name for f in dataclasses.fields(obj)]
    section = key.split(".")[:len(key.split(".")) - len(parts)]
    if parts[0] not in names:
        raise ValueError(f"unknown config key {key!r} in {'.'.join(section) or type(obj).__name__}; "
                         f"known keys: {sorted(names)}")
    if len(parts) == 1:
        return replace(obj, **{parts[0]: value})
    sub = getattr(obj, parts[0])
    if not dataclasses.is_dataclass(sub):
        raise ValueError(f"{'.'.join(section + [parts[0]])} is not a section of keys; cannot set {key}")
    return replace(obj, **{parts[0]: _replace_path(sub, parts[1:], value, key)})


def schedule(cfg: ToyConfig) -> torch.Tensor:
    d = cfg.diffusion
    return torch.as_tensor(alphas_cumprod_for_schedule(d.num_timesteps, d.beta_start, d.beta_end, d.schedule),
                           dtype=torch.float32)


def validate(cfg: ToyConfig) -> None:
    """Refuse a config (resolved or not) whose values are out of range, naming the key."""
    tr, du = cfg.train, cfg.dual
    if cfg.problem not in ALGORITHMS:
        raise ValueError(f"problem must be one of {tuple(ALGORITHMS)}, got {cfg.problem!r}")
    if cfg.algorithm not in ALGORITHMS[cfg.problem]:
        raise ValueError(f"algorithm {cfg.algorithm!r} is not defined for {cfg.problem}; choose from {ALGORITHMS[cfg.problem]}")
    if cfg.variant not in ("likelihood", "likelihood_ratio", "log_likelihood"):
        raise ValueError(f"variant must be likelihood, likelihood_ratio or log_likelihood, got {cfg.variant!r}")
    if du.lu_estimator not in ("exact", "network"):
        raise ValueError(f"dual.lu_estimator must be exact or network, got {du.lu_estimator!r}")
    if tr.target not in (None, "composed", "reweighted"):
        raise ValueError(f"train.target must be composed or reweighted, got {tr.target!r}")
    if du.lu_estimator == "network" and cfg.variant != "likelihood_ratio":
        raise ValueError("the network (diffusion-classifier) LU estimator gives log q_i/q: use variant=\"likelihood_ratio\"")
    for name, value in (("train.steps", tr.steps), ("train.batch", tr.batch), ("train.forget_batch", tr.forget_batch),
                        ("train.dual_every", tr.dual_every), ("train.dual_batch", tr.dual_batch),
                        ("train.checkpoint_every", tr.checkpoint_every), ("evaluation.n_eval", cfg.evaluation.n_eval)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if du.violation_scale not in (None, "linear", "log"):
        raise ValueError(f"dual.violation_scale must be linear or log, got {du.violation_scale!r}")
    if du.violation_scale == "log" and (cfg.problem != "likelihood" or cfg.variant == "log_likelihood"):
        raise ValueError("dual.violation_scale='log' needs a positive constraint function: problem=likelihood with "
                         f"variant likelihood or likelihood_ratio, got {cfg.problem!r}, {cfg.variant!r}")
    if tr.estimate not in (None, "pool", "fresh"):
        raise ValueError(f"train.estimate must be 'pool' or 'fresh', got {tr.estimate!r}")
    uses_pool = cfg.problem == "reverse_kl" or (cfg.problem == "likelihood" and tr.estimate != "fresh")
    if tr.pool_every < 1 or (uses_pool and tr.dual_every % tr.pool_every):
        raise ValueError(f"train.pool_every must divide train.dual_every = {tr.dual_every}, got {tr.pool_every}")
    T = cfg.diffusion.num_timesteps
    if tr.pool_chains is not None and (tr.pool_chains < 1 or tr.pool_chains % T):
        raise ValueError(f"train.pool_chains must be a positive multiple of diffusion.num_timesteps = {T} "
                         f"(or unset: derived), got {tr.pool_chains}")
    for name, value in (("dual.lr", du.lr), ("dual.gain", du.gain), ("siss_lam", cfg.siss_lam)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0 (or unset: derived), got {value}")


def resolve(cfg: ToyConfig) -> ToyConfig:
    """``cfg`` with every derived field (``DERIVED``) filled in; idempotent. See ``resolve_problem``."""
    return resolve_problem(cfg)[0]


def resolve_problem(cfg: ToyConfig) -> tuple[ToyConfig, Problem]:
    """Validate ``cfg``, fill in every field written ``None`` with its derived value, and return the
    resolved config with the run's ``Problem`` (``toy.problems.build_problem``, which refuses
    budgets theory cannot meet). The one place where each default is computed:

    - ``budgets``: the instance's default budgets for the problem;
    - ``siss_lam``: half the FU dual domain (``0.5 * inf q / q_1``);
    - ``train.target``: LU reweighted (exact), RU/FU composed (FU's signed loss does not use it);
    - ``train.estimate``: pool (the amortised ``TrajectoryPool``);
    - ``train.pool_chains``: LU ``2 T`` (the pool is all dual machinery there), else ``pool_every x T``
      (one end point per step for RU's on-policy x_0);
    - ``train.pool_frac``: set to 0 unless RU with the composed target (the only loop that uses it);
    - ``dual.violation_scale``: log for LU with g > 0, linear otherwise;
    - ``dual.gain``: ``delay_limited_gain`` (``DUAL_GAIN[problem]``, lowered for a delayed estimate);
    - ``dual.lr``: ``gain / |slope|`` at lam* (of ``log C`` for the log scale: ``slope / budget``);
    - ``dual.lam_init``: zeros (primal-dual; the baselines' fixed multipliers come from ``eta``,
      ``siss_lam`` and the dual-only ascent).
    """
    validate(cfg)
    budgets = cfg.budgets
    if budgets is None:
        budgets = tuple(float(b) for b in default_instance().budgets[cfg.problem])
    problem = build_problem(cfg.problem, budgets, cfg.variant)
    lu, tr, du = cfg.problem == "likelihood", cfg.train, cfg.dual
    target = tr.target if tr.target is not None else ("reweighted" if lu else "composed")
    train = replace(tr, target=target, estimate=tr.estimate if tr.estimate is not None else "pool",
                    pool_chains=(tr.pool_chains if tr.pool_chains is not None
                                 else (2 if lu else tr.pool_every) * cfg.diffusion.num_timesteps),
                    pool_frac=tr.pool_frac if cfg.problem == "reverse_kl" and target == "composed" else 0.0)
    vscale = du.violation_scale
    if vscale is None:
        vscale = "log" if lu and cfg.variant != "log_likelihood" else "linear"
    out = replace(cfg, budgets=tuple(float(b) for b in budgets), train=train)
    gain = du.gain if du.gain is not None else float(delay_limited_gain(out))
    lr = du.lr
    if lr is None:
        # d log C / d lam = slope / C, and C = budget at lam*
        step_slopes = problem.slopes / problem.budgets if vscale == "log" else problem.slopes
        lr = float(gain / max(np.abs(step_slopes).max(), 1e-12))
    siss_lam = cfg.siss_lam
    if siss_lam is None:
        halves = {0.5 * u for u in problem.fu_upper}
        if len(halves) != 1:
            raise ValueError(f"the forget distributions' FU domains differ ({problem.fu_upper}): set siss_lam")
        siss_lam = halves.pop()
    lam_init = du.lam_init if du.lam_init is not None else (0.0,) * len(budgets)
    out = replace(out, siss_lam=float(siss_lam),
                  dual=replace(du, lr=float(lr), gain=float(gain), violation_scale=vscale,
                               lam_init=tuple(float(v) for v in lam_init)))
    return out, problem


def estimate_delay(cfg: ToyConfig) -> float:
    """Mean age, in dual steps, of what an LU pool estimate measures (a resolved ``train``): a pool end
    point is the model's chain of ``T`` advances ``pool_every`` steps apart (its kernel at the middle
    of that life is ``T pool_every / 2`` steps old), and the estimate averages the last ``dual_batch``
    end points, ``k = chains / T`` per advance (another half window). 0 for estimators without delay."""
    tr, T = cfg.train, cfg.diffusion.num_timesteps
    if cfg.problem != "likelihood" or tr.estimate != "pool":
        return 0.0
    k = tr.pool_chains // T
    age = T * tr.pool_every / 2 + (tr.dual_batch / k) * tr.pool_every / 2
    return age / tr.dual_every


def delay_limited_gain(cfg: ToyConfig) -> float:
    """Dual gain (the fraction of the linearised distance to the root taken per dual step), the
    default of ``dual.gain``: ``DUAL_GAIN[problem]``, lowered for a delayed estimate to ``(pi/6) / D``
    (D the delay in dual steps, ``estimate_delay``): a Newton-scaled dual ascent is an integral
    controller of gain k on a unit plant, and with a pure delay D its loop ``k e^{-sD} / s`` crosses
    over at ``omega = k`` with phase margin ``pi/2 - k D``; ``k D = pi/6`` keeps a 60-degree margin
    (docs/toy.md, "LU's estimate and dual step")."""
    d = estimate_delay(cfg)
    return min(DUAL_GAIN[cfg.problem], (np.pi / 6) / d) if d > 0 else DUAL_GAIN[cfg.problem]


def constraint_estimator(cfg: ToyConfig) -> str:
    """The constraint estimator a resolved config uses: RU/LU ``train.estimate``; FU's is always the
    ELBO on its forget minibatch (free)."""
    return "forget-minibatch ELBO" if cfg.problem == "forward_kl" else cfg.train.estimate
