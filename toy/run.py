"""One toy unlearning run, end to end: ``run(ToyConfig) -> summary dict`` (the CLI and the tests call
this). Steps: resolve the instance and budgets (refusing unachievable ones), lam* from theory,
pretrain (or reload) the eps network on samples of q, build the forget models, find the exact-score
surrogate multiplier, unlearn with checkpoints, evaluate against the target, write
``summary.json`` and a figure.

Seeds: everything random derives from ``cfg.seed`` through ``_seed(cfg.seed, purpose)``, so a rerun
(or a resumed run) with the same seed reproduces the result exactly.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from theory.config import config_to_dict
from theory.diffusion import alphas_cumprod_for_schedule
from toy.algorithms import ALGORITHMS, LoopConfig, Models, averaged_lam, elbo_constraint_terms, lam_window, unlearn
from toy.distances import energy_distance
from toy.core.dual import DualState, dual_domain
from toy.models import ComposedEps, EpsMLP, GibbsTiltEps, MixtureEps, constraint_function
from toy.core.objectives import denoising_loss, eta_from_lam, lam_from_eta
from toy.core.diffusion import reverse_step_kl_weights
from toy.pretrain import MixtureData, load_model, save_model, train_denoiser
from toy.core.diffusion import noised
from toy.problems import check_budgets, default_instance, lam_star
from toy.reference import Quadrature, surrogate_lam
from toy.core.runs import CheckpointStore, RunDir, atomic_write_json, clear_run_dir
from toy.sampling import ddpm_sample, path_kl_to_models

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


def _seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "little")


def _gen(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, purpose))


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


# ---------------------------------------------------------------- pretraining

def pretrain_on_mixture(mixture, cfg: ToyConfig, purpose: str, path: Path | None = None, progress=None,
                        checkpoint: Path | None = None) -> tuple[EpsMLP, dict]:
    """Pretrain an ``EpsMLP`` on fresh samples of ``mixture``; reload from ``path`` if it exists.
    With ``checkpoint`` (a folder), pretraining is checkpointed every ``cfg.checkpoint_every`` steps
    and resumed from there; the checkpoint is removed once the model is saved to ``path``."""
    if path is not None and Path(path).exists():
        return load_model(path)
    torch.manual_seed(_seed(cfg.seed, purpose + ":init"))
    net = EpsMLP(mixture.dim, cfg.hidden, cfg.layers, cfg.time_dim, cfg.num_timesteps)
    ab = schedule(cfg)
    t0 = time.perf_counter()
    losses = train_denoiser(net, MixtureData(mixture, _seed(cfg.seed, purpose + ":data")), ab, cfg.pretrain_steps,
                            cfg.pretrain_batch, cfg.pretrain_lr, _gen(cfg.seed, purpose + ":noise"), progress,
                            checkpoint=checkpoint if path is not None else None,
                            checkpoint_every=cfg.checkpoint_every)
    seconds = time.perf_counter() - t0
    # how close the pretrained model's samples are to its data law (the yardstick of the toy tests)
    x = ddpm_sample(net, cfg.n_eval, ab, _gen(cfg.seed, purpose + ":eval"))
    rng = np.random.default_rng(_seed(cfg.seed, purpose + ":eval-ref"))
    meta = {"purpose": purpose, "weights": mixture.weights.tolist(), "means": mixture.means.tolist(),
            "covs": mixture.covs.tolist(), "steps": cfg.pretrain_steps, "final_loss": float(np.mean(losses[-100:])),
            "seconds": seconds, "n_eval": cfg.n_eval,
            "distance_to_data": energy_distance(x, mixture.sample(cfg.n_eval, rng)),
            "noise_floor": energy_distance(mixture.sample(cfg.n_eval, rng), mixture.sample(cfg.n_eval, rng)),
            "schedule": [cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule]}
    if path is not None:
        save_model(path, net, meta)
        if checkpoint is not None:
            CheckpointStore(checkpoint).remove()
    return net, meta


def _check_pretrained_meta(meta: dict, mixture, cfg: ToyConfig) -> None:
    if meta.get("schedule") != [cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule]:
        raise ValueError(f"pretrained model was trained on schedule {meta.get('schedule')}, the run uses "
                         f"{[cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule]}")
    if "means" in meta and not np.allclose(np.asarray(meta["means"]), mixture.means):
        raise ValueError("pretrained model was trained on another mixture")


# ---------------------------------------------------------------- exact-score references

def surrogate_constraint_fn(problem: str, q, forget, cfg: ToyConfig, variant: str):
    """``lam -> constraint value`` of the surrogate law generated by the exact-score version of the
    primal target (common random numbers: the same generator seed at every lam)."""
    ab = schedule(cfg)
    q_ex = MixtureEps.from_mixture(q, ab)
    f_ex = [MixtureEps.from_mixture(f, ab) for f in forget]

    if problem == "reverse_kl":
        def at(lam):
            model = ComposedEps(q_ex, f_ex, eta_from_lam(torch.tensor([lam], dtype=torch.float64)))
            kl, _, _ = path_kl_to_models(model, f_ex, cfg.n_reference, ab, _gen(cfg.seed, "surrogate"))
            return float(kl[0])
    elif problem == "likelihood":
        def at(lam):
            model = GibbsTiltEps(q_ex, f_ex, [lam], variant, q_ex)
            x0 = ddpm_sample(model, cfg.n_reference, ab, _gen(cfg.seed, "surrogate"))
            log_q = q_ex.log_prob(x0) if variant == "likelihood_ratio" else None
            return float(constraint_function(variant, f_ex[0].log_prob(x0), log_q).mean())
    else:
        raise ValueError("FU's target is exact at every t: no surrogate")
    return at


def surrogate_model(problem: str, q, forget, lam, cfg: ToyConfig, variant: str):
    ab = schedule(cfg)
    q_ex = MixtureEps.from_mixture(q, ab)
    f_ex = [MixtureEps.from_mixture(f, ab) for f in forget]
    lam = torch.as_tensor(np.atleast_1d(lam), dtype=torch.float64)
    if problem == "reverse_kl":
        return ComposedEps(q_ex, f_ex, eta_from_lam(lam))
    if problem == "likelihood":
        return GibbsTiltEps(q_ex, f_ex, lam, variant, q_ex)
    from toy.models import SignedMixtureEps
    return SignedMixtureEps(q_ex, f_ex, lam)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def final_constraints(problem: str, net, models: Models, cfg: ToyConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Large-sample constraint estimates at the end (m,) and their standard errors, by the same
    estimator the dual ascent used (RU path KL, FU ELBO, LU exact or network g)."""
    ab = torch.as_tensor(models.alphas_cumprod, dtype=torch.float32)
    gen = _gen(cfg.seed, "final-constraints")
    if hasattr(net, "eval"):
        net.eval()
    if problem == "reverse_kl":
        kl, per, _ = path_kl_to_models(net, models.forget, n, ab, gen)
        return kl.numpy(), (per.std(1) / np.sqrt(n)).numpy()
    if problem == "forward_kl":
        w = reverse_step_kl_weights(ab)
        vals, ses = [], []
        for i, data in enumerate(models.forget_data):
            x0 = _fresh_forget_samples(data, n, cfg)  # an independent stream, not the training one
            x_t, t, z = noised(x0, ab, gen)
            l_theta = denoising_loss(net(x_t, t), z)
            l_ref = denoising_loss(models.forget_exact[i](x_t, t), z) if models.forget_exact else torch.zeros_like(l_theta)
            terms = elbo_constraint_terms(l_theta, l_ref, t, w, x0.shape[1])
            vals.append(float(terms.mean()))
            ses.append(float(terms.std() / np.sqrt(n)))
        return np.array(vals), np.array(ses)
    from toy.algorithms import lu_constraint_exact, lu_constraint_network
    if cfg.lu_estimator == "network":
        m, se = lu_constraint_network(net, models.frozen, models.forget_nets, n, ab, gen)
    else:
        m, se = lu_constraint_exact(net, models.forget_exact, models.q_exact, n, ab, gen, cfg.variant)
    return m.numpy(), se.numpy()


def _fresh_forget_samples(data, n, cfg):
    if isinstance(data, MixtureData):
        return torch.as_tensor(data.mixture.sample(n, np.random.default_rng(_seed(cfg.seed, "final-forget"))),
                               dtype=torch.float32)
    g = torch.Generator().manual_seed(_seed(cfg.seed, "final-forget"))
    return data.points[torch.randint(0, data.points.shape[0], (n,), generator=g)]


# ---------------------------------------------------------------- the run

def run(cfg: ToyConfig, progress: bool = False, stop_after: int | None = None, resume: bool | None = None,
        overwrite: bool = False) -> dict:
    """Run one toy unlearning experiment into ``cfg.out``; returns the summary (also written).

    A directory holding a run of the same config (docs/runs.md) is continued from its last
    checkpoint; one of another config is refused (``toy.core.runs.RunDirError``) unless ``overwrite``
    (start afresh there). ``resume=False`` refuses any existing run."""
    validate(cfg)
    if overwrite:
        clear_run_dir(cfg.out, keep=(cfg.pretrained,))
    with ExitStack() as stack:  # the run directory's lock is released however the run ends
        return _run(cfg, progress, stop_after, resume, stack)


def _run(cfg: ToyConfig, progress: bool, stop_after: int | None, resume: bool | None, stack: ExitStack) -> dict:
    t_start = time.perf_counter()
    inst = default_instance()
    q, forget = inst.q, list(inst.forget)
    budgets = np.asarray(cfg.budgets, dtype=np.float64) if cfg.budgets else inst.budgets[cfg.problem]
    if budgets.shape[0] != len(forget):
        raise ValueError(f"{len(forget)} forget distribution(s) but {budgets.shape[0]} budget(s) {budgets.tolist()}")
    check_budgets(cfg.problem, q, forget, budgets, cfg.variant)
    out = Path(cfg.out)
    rd = stack.enter_context(RunDir(out, config_to_dict(cfg), cfg.seed, resume=resume))
    lam_th, lam_source = lam_star(cfg.problem, q, forget, budgets, cfg.variant)
    quads = [Quadrature(cfg.problem, q, [f], cfg.variant) for f in forget]
    ab = schedule(cfg)
    bar = _progress(progress)

    # pretrained model of q (reloaded when present: a resumed run does not pretrain again)
    ppath = Path(cfg.pretrained) if cfg.pretrained else out / "pretrained.pt"
    bar_pre = bar(total=cfg.pretrain_steps, desc="pretrain", leave=False) if not ppath.exists() else None
    frozen, pmeta = pretrain_on_mixture(q, cfg, "pretrain", ppath, bar_pre,
                                        checkpoint=out / "pretrain-checkpoint" if not cfg.pretrained else None)
    if bar_pre is not None:
        bar_pre.close()
    _check_pretrained_meta(pmeta, q, cfg)
    frozen.eval().requires_grad_(False)
    net = copy.deepcopy(frozen).train().requires_grad_(True)

    forget_exact = [MixtureEps.from_mixture(f, ab) for f in forget]
    forget_nets = []
    if cfg.lu_estimator == "network":
        for i, f in enumerate(forget):
            fn, _ = pretrain_on_mixture(f, cfg, f"forget{i}", out / f"forget{i}.pt",
                                        checkpoint=out / f"forget{i}-checkpoint")
            forget_nets.append(fn.eval().requires_grad_(False))
    models = Models(net=net, frozen=frozen, forget=forget_exact,
                    retain_data=MixtureData(q, _seed(cfg.seed, "retain")),
                    forget_data=[MixtureData(f, _seed(cfg.seed, f"forget{i}")) for i, f in enumerate(forget)],
                    alphas_cumprod=ab, forget_exact=forget_exact, q_exact=MixtureEps.from_mixture(q, ab),
                    forget_nets=forget_nets, dim=q.dim)

    # the multiplier the learned run should reach: lam* for FU and dual-only; the exact-score
    # surrogate's fixed point for RU/LU primal-dual (their training targets are surrogates at t > 0)
    lam_sur = None
    sur_path = out / "surrogate_reference.json"
    surrogate_used = cfg.problem != "forward_kl" and primal_target(cfg) == "composed"
    if surrogate_used and cfg.surrogate_reference and len(forget) == 1:
        if sur_path.exists():
            import json
            lam_sur = np.asarray(json.loads(sur_path.read_text())["lam"])
        else:
            at = surrogate_constraint_fn(cfg.problem, q, forget, cfg, cfg.variant)
            hi = min(4.0 * max(float(lam_th[0]), 1e-3), 0.95) if cfg.problem == "reverse_kl" else 4.0 * max(float(lam_th[0]), 1e-3)
            lam_sur = np.array([surrogate_lam(at, float(budgets[0]), cfg.problem == "likelihood", hi)])
            atomic_write_json(sur_path, {"lam": lam_sur})

    # dual domain and step size
    domain = dual_domain(cfg.problem, len(budgets),
                         upper=[qd.lam_max() for qd in quads] if cfg.problem == "forward_kl" else None)
    upper, sum_max = domain.upper, domain.sum_max
    slopes = np.array([_slope(qd, lam_i) for qd, lam_i in zip(quads, lam_th)])
    vscale = violation_scale(cfg)
    # d log C / d lam = slope / C, and C = budget at lam*
    step_slopes = slopes / budgets if vscale == "log" else slopes
    gain = cfg.dual_gain if cfg.dual_gain >= 0 else delay_limited_gain(cfg)
    lr_dual = cfg.lr_dual if cfg.lr_dual >= 0 else float(gain / max(np.abs(step_slopes).max(), 1e-12))
    fixed = cfg.algorithm != "primal_dual"
    lam_init = np.asarray(cfg.lam_init, dtype=np.float64) if cfg.lam_init else None
    if cfg.algorithm == "esd":
        lam_init = lam_from_eta(torch.tensor([cfg.eta], dtype=torch.float64)).numpy()
    elif cfg.algorithm == "siss":
        lam_init = np.array([cfg.siss_lam if cfg.siss_lam >= 0 else 0.5 * u for u in upper])
    elif cfg.algorithm == "dual_only":
        lam_init = dual_only_lam(quads, budgets, lr_dual, sum_max)
    dual = DualState(cfg.problem, budgets, 0.0 if fixed else lr_dual, lam_init, upper, sum_max, cfg.lam_max,
                     violation_scale=vscale)

    loop = LoopConfig(cfg.steps, cfg.batch, cfg.forget_batch, cfg.lr, cfg.dual_every, cfg.dual_batch,
                      cfg.checkpoint_every, cfg.average_frac, lr_final_frac=cfg.lr_final_frac, target=primal_target(cfg),
                      pool_frac=cfg.pool_frac if (cfg.problem == "reverse_kl" and primal_target(cfg) == "composed") else 0.0,
                      estimate="fresh" if estimate_kind(cfg) == "fresh" else "pool", pool_chains=pool_chains(cfg), pool_every=cfg.pool_every)
    bar_un = bar(total=cfg.steps, desc=f"{cfg.problem} {cfg.algorithm}")
    ckpt = rd.load_checkpoint()
    if ckpt is not None:
        bar_un.update(ckpt["step"])
    try:
        hist = unlearn(cfg.problem, cfg.algorithm, models, dual, loop, rd, _gen(cfg.seed, "unlearn"),
                       cfg.variant, cfg.lu_estimator, cfg.eta, bar_un, stop_after)
    except FloatingPointError as exc:
        raise FloatingPointError(f"{exc}; the run stopped and the last good checkpoint "
                                 f"({rd.checkpoint_path}) was kept") from exc
    finally:
        bar_un.close()
    done = rd.load_checkpoint()["step"]
    if done < cfg.steps:  # interrupted on purpose (stop_after): no summary yet
        return {"interrupted_at": done}

    summary = evaluate(cfg, q, forget, budgets, lam_th, lam_source, lam_sur, quads, models, dual, hist, pmeta, lr_dual, slopes)
    summary["seconds"] = time.perf_counter() - t_start
    rd.write_summary(summary)
    if cfg.figure:
        summary["figure"] = str(draw_figure(out / "toy.png", cfg, q, quads, summary, hist))
        rd.write_summary(summary)
    return summary


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    def make(**kw):
        return tqdm(disable=not enabled, **kw)
    return make


def _slope(quad: Quadrature, lam: float) -> float:
    """d constraint / d lam of the x_0 target at lam (central difference, one-sided at 0)."""
    h = 1e-4 * max(1.0, lam) if quad.problem != "reverse_kl" else 1e-4
    lo = max(lam - h, 0.0)
    hi = lam + h
    if quad.problem == "forward_kl":
        hi = min(hi, quad.lam_max())
    return float((quad.constraint_values([hi])[0] - quad.constraint_values([lo])[0]) / (hi - lo))


def dual_only_lam(quads: list[Quadrature], budgets, lr_dual: float, sum_max, steps: int = 400) -> np.ndarray:
    """RU dual-only: projected dual ascent on lam alone, the slack ``b - KL(p_lam||q_i)`` evaluated
    on the explicit x_0 tilt (no network), from lam = 0. One constraint per quadrature."""
    state = DualState("reverse_kl", budgets, lr_dual, None, None, sum_max)
    for _ in range(steps):
        state.step([qd.constraint_values([float(state.lam[i])])[0] for i, qd in enumerate(quads)])
    return state.lam.numpy().copy()


def evaluate(cfg, q, forget, budgets, lam_th, lam_source, lam_sur, quads, models, dual, hist, pmeta, lr_dual, slopes,
             cache: dict | None = None) -> dict:
    ab = schedule(cfg)
    net = models.net.eval()
    lam = averaged_lam(hist, dual, cfg.average_frac)
    # LU: lam is poorly identified (its constraint is flat near lam*); report the mean over a window
    # derived from the dual loop's time constant and check that lam settled there (docs/toy.md)
    step_slopes = slopes / np.asarray(budgets) if violation_scale(cfg) == "log" else slopes
    gain = float(lr_dual * np.abs(step_slopes).max())
    window = None
    if cfg.problem == "likelihood" and cfg.algorithm == "primal_dual" and len(hist["lam"]) >= 2 and gain > 0:
        window = lam_window(hist["lam"], gain)
        lam = window["mean"]
    n_c = cfg.n_constraint // 5 if cfg.problem == "reverse_kl" else cfg.n_constraint
    cons, cons_se = final_constraints(cfg.problem, net, models, cfg, n_c)
    # the same estimator on the pretrained model, against the exact value at p = q: how accurately a
    # network of this size represents the constraint functional (the yardstick of the tolerances)
    # (at p = q the constraint functional varies more than at the target: 4x the samples)
    # (both reference estimates depend on the problem, seed and sizes only: an ensemble shares them
    # through ``cache``; their random streams are the same for every member of one seed)
    key = (cfg.problem, cfg.seed, n_c, cfg.variant, cfg.lu_estimator, pmeta.get("final_loss"))
    if cache is not None and key in cache:
        pre_cons, pre_se, ex_cons, ex_se = cache[key]
    else:
        pre_cons, pre_se = final_constraints(cfg.problem, models.frozen, models, cfg, 4 * n_c)
        ex_cons, ex_se = final_constraints(cfg.problem, models.q_exact, models, cfg, 4 * n_c)
        if cache is not None:
            cache[key] = (pre_cons, pre_se, ex_cons, ex_se)
    q_cons = np.array([qd.constraint_values([0.0])[0] for qd in quads])
    # ... split into its two sources, which can cancel at p = q but need not elsewhere: the
    # network's error (pretrained vs exact scores, same sampler) and the estimator's own
    # discretisation bias (exact scores vs the exact x_0 value)
    delta_c = (np.abs(pre_cons - ex_cons) + np.abs(ex_cons - q_cons)
               + 3.0 * np.sqrt(cons_se ** 2 + pre_se ** 2 + ex_se ** 2))
    x_net = ddpm_sample(net, cfg.n_eval, ab, _gen(cfg.seed, "eval-net"))
    rng = np.random.default_rng(_seed(cfg.seed, "eval-target"))
    quad = quads[0]
    lam_target = lam_th if len(quads) == 1 else None
    summary = {
        "problem": cfg.problem, "algorithm": cfg.algorithm, "target": primal_target(cfg) if cfg.problem != "forward_kl" else "signed",
        "lam_reference": (lam_sur if lam_sur is not None and cfg.algorithm == "primal_dual" else lam_th),
        "lam_reference_source": ("exact-score surrogate fixed point" if lam_sur is not None and cfg.algorithm == "primal_dual" else "lam_star"), "variant": cfg.variant if cfg.problem == "likelihood" else None,
        "budgets": budgets, "lam": lam, "lam_last": dual.lam.numpy(), "lam_star": lam_th, "lam_star_source": lam_source,
        "lam_surrogate": lam_sur, "constraint_values": cons, "constraint_stderr": cons_se,
        "constraint_slope": slopes, "lr_dual": lr_dual, "n_eval": cfg.n_eval,
        "pretrained_distance_to_q": pmeta.get("distance_to_data"), "pretrained_noise_floor": pmeta.get("noise_floor"),
        "pretrained_constraint_values": pre_cons, "pretrained_constraint_stderr": pre_se,
        "q_constraint_values": q_cons, "exact_score_constraint_values": ex_cons, "constraint_tolerance": delta_c,
        "constraint_violation": _violation(cfg.problem, cons, budgets),
        "lam_window": window, "dual_gain": gain, "threads": cfg.threads,
        "steps": cfg.steps, "dual_steps": len(hist["lam"]), "constraint_estimator": estimate_kind(cfg),
        "pool_every": cfg.pool_every, "pool_chains": pool_chains(cfg), "violation_scale": violation_scale(cfg),
        "estimate_delay_dual_steps": estimate_delay(cfg),
        "step_seconds_median": float(np.median(hist["step_seconds"])),
        "dual_seconds_median": float(np.median([s for s in hist["dual_seconds"] if s > 0])) if any(hist["dual_seconds"]) else 0.0,
        "estimate_seconds_total": float(np.sum(hist["estimate_seconds"])),
        "pool_seconds_total": float(np.sum(hist.get("pool_seconds", [0.0]))),
    }
    if lam_target is not None:
        lam_eval = lam_target if cfg.algorithm == "primal_dual" or cfg.algorithm == "dual_only" else dual.lam.numpy()
        x_t1 = quad.sample(lam_eval, cfg.n_eval, rng)
        x_t2 = quad.sample(lam_eval, cfg.n_eval, rng)
        summary["target_lam"] = lam_eval
        summary["distance_to_target"] = energy_distance(x_net, x_t1)
        summary["distance_noise_floor"] = energy_distance(x_t1, x_t2)
        summary["target_constraint_values"] = quad.constraint_values(lam_eval)
        summary["target_objective"] = quad.objective(lam_eval)
        # the law a perfect network would generate with this target (exact scores, same sampler)
        if cfg.problem != "forward_kl" and primal_target(cfg) == "composed":
            lam_s = lam_sur if (lam_sur is not None and cfg.algorithm == "primal_dual") else lam_eval
            sm = surrogate_model(cfg.problem, q, forget, lam_s, cfg, cfg.variant)
            xs1 = ddpm_sample(sm, cfg.n_eval, ab, _gen(cfg.seed, "eval-sur1"))
            summary["distance_to_surrogate"] = energy_distance(x_net, xs1)
            summary["surrogate_distance_to_target"] = energy_distance(xs1, x_t2)
            if cfg.problem == "reverse_kl":
                # the law the target actually defines: the composed chain of the *frozen network*'s eps
                # (the tilt puts mass in q's tails, where the pretrained network extrapolates)
                lam_f = dual.lam.numpy() if cfg.algorithm != "primal_dual" else lam
                fm = ComposedEps(models.frozen, models.forget, eta_from_lam(torch.as_tensor(lam_f, dtype=torch.float64)))
                xf = ddpm_sample(fm, cfg.n_eval, ab, _gen(cfg.seed, "eval-frozen-composed"))
                summary["distance_to_frozen_composed"] = energy_distance(x_net, xf)
                summary["frozen_composed_distance_to_surrogate"] = energy_distance(xf, xs1)
        elif cfg.problem == "forward_kl":
            sm = surrogate_model(cfg.problem, q, forget, lam_eval, cfg, cfg.variant)
            xs1 = ddpm_sample(sm, cfg.n_eval, ab, _gen(cfg.seed, "eval-sur1"))
            summary["exact_score_distance_to_target"] = energy_distance(xs1, x_t2)
        summary["objective_learned_mc"] = _objective_mc(cfg.problem, quad, x_net)
    summary["objective_estimate"], summary["objective_stderr"] = objective_estimate(cfg, net, models, q, n_c)
    summary["target_objective_star"] = quad.objective(lam_th) if len(quads) == 1 else None
    if len(quads) == 1 and cfg.algorithm in ("primal_dual", "dual_only"):
        ref = summary["lam_reference"]
        if summary["lam_reference_source"] == "lam_star":
            lo, hi = lam_interval_quadrature(quad, float(budgets[0]), float(delta_c[0]))
        else:
            lo, hi = lam_interval_surrogate(cfg, q, forget, float(ref[0]), float(delta_c[0]))
        summary["lam_tolerance_interval"] = [lo, hi]
        summary["lam_within_tolerance"] = bool(lo <= lam[0] <= hi)
    np.save(Path(cfg.out) / "samples.npy", x_net.numpy())
    return summary


@torch.no_grad()
def objective_estimate(cfg, net, models: Models, q, n: int) -> tuple[float, float]:
    """The retention objective of the learned model by the constraint estimators' twins: RU/LU
    path KL(P_theta || Q) along own trajectories against the exact q (an upper bound of the x_0
    KL(p_theta||q)); FU the ELBO estimate of KL(q || p_theta) on fresh samples of q."""
    ab = torch.as_tensor(models.alphas_cumprod, dtype=torch.float32)
    gen = _gen(cfg.seed, "objective")
    if cfg.problem == "forward_kl":
        x0 = torch.as_tensor(q.sample(n, np.random.default_rng(_seed(cfg.seed, "objective-q"))), dtype=torch.float32)
        x_t, t, z = noised(x0, ab, gen)
        terms = elbo_constraint_terms(denoising_loss(net(x_t, t), z), denoising_loss(models.q_exact(x_t, t), z), t,
                                      reverse_step_kl_weights(ab), x0.shape[1])
        return float(terms.mean()), float(terms.std() / np.sqrt(n))
    n_traj = max(n // 5, 100)
    kl, per, _ = path_kl_to_models(net, [models.q_exact], n_traj, ab, gen)
    return float(kl[0]), float(per.std() / np.sqrt(n_traj))


def _violation(problem, measured, budgets) -> np.ndarray:
    from toy.core.dual import constraint_violation
    return constraint_violation(problem, torch.as_tensor(measured, dtype=torch.float64),
                                torch.as_tensor(budgets, dtype=torch.float64)).numpy()


def lam_interval_quadrature(quad: Quadrature, budget: float, delta: float) -> tuple[float, float]:
    """The multipliers whose exact x_0 target has constraint value within ``delta`` of the budget:
    ``{lam : |C(lam) - b| <= delta}`` (C monotone), the tolerance of a learned lam whose constraint
    estimate is accurate to ``delta`` (docs/toy.md)."""
    def inv(b):
        try:
            return quad.solve(b)
        except ValueError:  # beyond the achievable range: the interval is open on that side
            return float("inf") if quad.problem == "likelihood" or b > budget else quad.lam_max()
    if quad.problem == "likelihood":
        lo = inv(budget + delta)
        hi = inv(budget - delta) if budget - delta > 0 else float("inf")
    else:
        lo = inv(budget - delta)
        hi = inv(budget + delta)
    return float(lo), float(hi)


def lam_interval_surrogate(cfg, q, forget, lam_ref: float, delta: float) -> tuple[float, float]:
    """As ``lam_interval_quadrature`` for the exact-score surrogate's constraint, linearised at its
    fixed point (central difference with common random numbers)."""
    at = surrogate_constraint_fn(cfg.problem, q, forget, cfg, cfg.variant)
    h = 0.1 * max(lam_ref, 1e-3)
    slope = (at(lam_ref + h) - at(max(lam_ref - h, 0.0))) / (lam_ref + h - max(lam_ref - h, 0.0))
    half = delta / max(abs(slope), 1e-12)
    return max(lam_ref - half, 0.0), lam_ref + half


def _objective_mc(problem, quad: Quadrature, x) -> float | None:
    """Cross-entropy proxy of the retention objective of the learned samples: E_p[-log q(x)] for
    RU/LU (KL(p||q) + H(p)); FU's KL(q||p) needs p's density and is left to the target columns."""
    if problem == "forward_kl":
        return None
    return float(-quad.q.log_prob(np.asarray(x, dtype=np.float64)).mean())


def draw_figure(path: Path, cfg: ToyConfig, q, quads, summary: dict, hist: dict) -> Path:
    """Learned samples over the target density (view clipped to the target's support, the samples
    outside it counted), and the lam trajectory over the whole run against lam*, with the derived
    tolerance band and, for LU, the averaging window. Drawn on a ``matplotlib.figure.Figure``: no
    backend is forced on the caller."""
    from matplotlib.figure import Figure

    quad = quads[0]
    x = np.load(Path(cfg.out) / "samples.npy")
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    g = quad.grid
    lam_t = summary.get("target_lam", summary["lam_star"])
    dens = np.exp(quad.log_target(lam_t)).reshape(len(g.ys), len(g.xs))
    qd = np.exp(quad.log_q).reshape(len(g.ys), len(g.xs))
    ax.contour(g.xs, g.ys, qd, levels=6, colors="0.6", linewidths=0.8)
    cs = ax.contour(g.xs, g.ys, dens, levels=8, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"x_0 target density at lam = {float(np.asarray(lam_t).reshape(-1)[0]):.4g}")
    # the view: where the target has mass (density above 1e-4 of its peak), plus a margin
    ys_m, xs_m = np.nonzero(dens > 1e-4 * dens.max())
    x_lo, x_hi = g.xs[xs_m.min()] - 0.5, g.xs[xs_m.max()] + 0.5
    y_lo, y_hi = g.ys[ys_m.min()] - 0.5, g.ys[ys_m.max()] + 0.5
    inside = (x[:, 0] >= x_lo) & (x[:, 0] <= x_hi) & (x[:, 1] >= y_lo) & (x[:, 1] <= y_hi)
    ax.scatter(x[inside, 0], x[inside, 1], s=2, c="tab:red", alpha=0.4,
               label=f"learned samples ({int((~inside).sum())} of {len(x)} outside this view)")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
    ax.set_title(f"{cfg.problem} {cfg.algorithm}: learned (red) vs target (contours), q (grey)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    if hist["lam"]:
        lam_hist = np.asarray(hist["lam"])
        every = cfg.steps / len(lam_hist)  # dual steps are evenly spaced over the run
        steps = np.arange(len(lam_hist)) * every
    else:  # fixed multipliers: the whole run at one value
        lam_hist = np.tile(np.asarray(summary["lam"]), (2, 1))
        every, steps = cfg.steps / 2, np.array([0, cfg.steps])
    for i in range(lam_hist.shape[1]):
        ax.plot(steps, lam_hist[:, i], label=f"lam_{i} learned" if hist["lam"] else f"lam_{i} (fixed)")
        ax.axhline(np.asarray(summary["lam_star"])[i], color="k", ls="--", label="lam* (theory, x_0)")
        if summary.get("lam_surrogate") is not None:
            ax.axhline(np.asarray(summary["lam_surrogate"])[i], color="tab:orange", ls=":", label="exact-score surrogate")
        if summary.get("lam_tolerance_interval") is not None and i == 0:
            lo_t, hi_t = summary["lam_tolerance_interval"]
            top = min(hi_t, 2 * max(np.max(lam_hist), lo_t))
            ax.axhspan(lo_t, top, color="tab:green", alpha=0.12, label="derived tolerance band")
        win = summary.get("lam_window")
        if win is not None and i == 0:
            a0 = win["start"] * every
            ax.axvspan(a0, cfg.steps, color="0.5", alpha=0.15,
                       label=f"window: last {win['length']} dual steps (after 3 tau = {3 * win['tau']:.0f})")
            ax.hlines(np.asarray(win["mean"])[i], a0, cfg.steps, color="k", lw=2,
                      label=f"window mean {np.asarray(win['mean'])[i]:.4g}")
    ax.set_xlim(0, cfg.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("lam")
    ax.legend(fontsize=8)
    ax.set_title("multiplier trajectory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
