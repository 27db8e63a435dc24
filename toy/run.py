"""One toy unlearning run, end to end: ``run(ToyConfig) -> summary dict`` (the CLI and the tests call
this). Steps: resolve the config (``toy.config.resolve_problem``: every derived default, the
instance, budgets refused when unachievable, lam* from theory), pretrain (or reload) the eps network
on samples of q, build the forget models, find the exact-score surrogate multiplier, unlearn with
checkpoints, evaluate against the target, write ``summary.json`` and a figure.

Seeds: everything random derives from ``cfg.seed`` through
``toy.core.seeding.derive_seed(cfg.seed, purpose)``, so a rerun (or a resumed run) with the same seed reproduces the result exactly.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from theory.config import config_to_dict
from toy.algorithms import Models
from toy.loop import unlearn
from toy.distances import energy_distance
from toy.core.dual import DualState
from toy.core.hints import Floats
from toy.models import EpsMLP, MixtureEps
from toy.core.objectives import lam_from_eta
from toy.pretrain import MixtureData, load_model, save_model, train_denoiser
from toy.problems import Problem
from toy.reference import Quadrature
from toy.core.runs import CheckpointStore, RunDir, clear_run_dir
from toy.sampling import ddpm_sample
from toy.config import ToyConfig, resolve_problem, schedule
from toy.core.seeding import derive_seed, seeded_generator
from toy.evaluation import Trained, evaluate, reported_lam, surrogate_reference
from toy.figures import draw_figure

if TYPE_CHECKING:
    from tqdm import tqdm

    from theory.gmm import GaussianMixture

log = logging.getLogger(__name__)


def pretrain_on_mixture(mixture: GaussianMixture, cfg: ToyConfig, purpose: str, path: Path | None = None,
                        progress: tqdm | None = None,
                        checkpoint: Path | None = None) -> tuple[EpsMLP, dict]:
    """Pretrain an ``EpsMLP`` on fresh samples of ``mixture``; reload from ``path`` if it exists.
    With ``checkpoint`` (a folder), pretraining is checkpointed every ``cfg.train.checkpoint_every``
    steps and resumed from there; the checkpoint is removed once the model is saved to ``path``."""
    if path is not None and Path(path).exists():
        return load_model(path)
    m, pre, n_eval = cfg.model, cfg.pretrain, cfg.evaluation.n_eval
    torch.manual_seed(derive_seed(cfg.seed, purpose + ":init"))
    net = EpsMLP(mixture.dim, m.hidden, m.layers, m.time_dim, cfg.diffusion.num_timesteps)
    ab = schedule(cfg)
    t0 = time.perf_counter()
    losses = train_denoiser(net, MixtureData(mixture, derive_seed(cfg.seed, purpose + ":data")), ab, pre.steps,
                            pre.batch, pre.lr, seeded_generator(cfg.seed, purpose + ":noise"), progress,
                            checkpoint=checkpoint if path is not None else None,
                            checkpoint_every=cfg.train.checkpoint_every)
    seconds = time.perf_counter() - t0
    # how close the pretrained model's samples are to its data law (the yardstick of the toy tests)
    x = ddpm_sample(net, n_eval, ab, seeded_generator(cfg.seed, purpose + ":eval"))
    rng = np.random.default_rng(derive_seed(cfg.seed, purpose + ":eval-ref"))
    meta = {"purpose": purpose, "weights": mixture.weights.tolist(), "means": mixture.means.tolist(),
            "covs": mixture.covs.tolist(), "steps": pre.steps, "final_loss": float(np.mean(losses[-100:])),
            "seconds": seconds, "n_eval": n_eval,
            "distance_to_data": energy_distance(x, mixture.sample(n_eval, rng)),
            "noise_floor": energy_distance(mixture.sample(n_eval, rng), mixture.sample(n_eval, rng)),
            "schedule": schedule_key(cfg)}
    if path is not None:
        save_model(path, net, meta)
        if checkpoint is not None:
            CheckpointStore(checkpoint).remove()
    return net, meta


def schedule_key(cfg: ToyConfig) -> list:
    """The noise schedule as a pretrained model's metadata records it."""
    d = cfg.diffusion
    return [d.num_timesteps, d.beta_start, d.beta_end, d.schedule]


def check_pretrained_meta(meta: dict, mixture: GaussianMixture, cfg: ToyConfig) -> None:
    """Refuse a pretrained model trained on another schedule or mixture than the run's."""
    if meta.get("schedule") != schedule_key(cfg):
        raise ValueError(f"pretrained model was trained on schedule {meta.get('schedule')}, the run uses "
                         f"{schedule_key(cfg)}")
    if "means" in meta and not np.allclose(np.asarray(meta["means"]), mixture.means):
        raise ValueError("pretrained model was trained on another mixture")


def run(cfg: ToyConfig, progress: bool = False, stop_after: int | None = None, resume: bool | None = None,
        overwrite: bool = False) -> dict:
    """Run one toy unlearning experiment into ``cfg.out``; returns the summary (also written).

    The config is resolved first (``toy.config.resolve_problem``); ``run.json`` records the resolved
    config. A directory holding a run of the same config (docs/runs.md) is continued from its last
    checkpoint; one of another config is refused (``toy.core.runs.RunDirError``) unless ``overwrite``
    (start afresh there). ``resume=False`` refuses any existing run."""
    cfg, problem = resolve_problem(cfg)
    if overwrite:
        clear_run_dir(cfg.out, keep=(cfg.pretrained or "",))
    with ExitStack() as stack:  # the run directory's lock is released however the run ends
        return _run(cfg, problem, progress, stop_after, resume, stack)


def _run(cfg: ToyConfig, problem: Problem, progress: bool, stop_after: int | None, resume: bool | None,
         stack: ExitStack) -> dict:
    t_start = time.perf_counter()
    q, forget = problem.q, list(problem.forget)
    out = Path(cfg.out)
    rd = stack.enter_context(RunDir(out, config_to_dict(cfg), cfg.seed, resume=resume))
    ab = schedule(cfg)
    bar = progress_bar(progress)

    # pretrained model of q (reloaded when present: a resumed run does not pretrain again)
    ppath = Path(cfg.pretrained) if cfg.pretrained else out / "pretrained.pt"
    bar_pre = bar(total=cfg.pretrain.steps, desc="pretrain", leave=False) if not ppath.exists() else None
    frozen, pmeta = pretrain_on_mixture(q, cfg, "pretrain", ppath, bar_pre,
                                        checkpoint=out / "pretrain-checkpoint" if not cfg.pretrained else None)
    if bar_pre is not None:
        bar_pre.close()
    check_pretrained_meta(pmeta, q, cfg)
    frozen.eval().requires_grad_(False)
    net = copy.deepcopy(frozen).train().requires_grad_(True)

    forget_exact = [MixtureEps.from_mixture(f, ab) for f in forget]
    forget_nets = []
    if cfg.dual.lu_estimator == "network":
        for i, f in enumerate(forget):
            fn, _ = pretrain_on_mixture(f, cfg, f"forget{i}", out / f"forget{i}.pt",
                                        checkpoint=out / f"forget{i}-checkpoint")
            forget_nets.append(fn.eval().requires_grad_(False))
    models = Models(net=net, frozen=frozen, forget=forget_exact,
                    retain_data=MixtureData(q, derive_seed(cfg.seed, "retain")),
                    forget_data=[MixtureData(f, derive_seed(cfg.seed, f"forget{i}")) for i, f in enumerate(forget)],
                    alphas_cumprod=ab, forget_exact=forget_exact, q_exact=MixtureEps.from_mixture(q, ab),
                    forget_nets=forget_nets, dim=q.dim)

    # the multiplier the learned run should reach: lam* for FU and dual-only; the exact-score
    # surrogate's fixed point for RU/LU primal-dual (their training targets are surrogates at t > 0),
    # computed once per run directory
    problem = replace(problem, lam_surrogate=surrogate_reference(cfg, problem, out / "surrogate_reference.json"))

    dual = initial_dual(cfg, problem)
    bar_un = bar(total=cfg.train.total_steps, desc=f"{cfg.problem} {cfg.algorithm}")
    ckpt = rd.load_checkpoint()
    if ckpt is not None:
        bar_un.update(ckpt["step"])
    try:
        hist = unlearn(cfg.problem, cfg.algorithm, models, dual, cfg.train, rd, seeded_generator(cfg.seed, "unlearn"),
                       cfg.variant, cfg.dual.lu_estimator, bar_un, stop_after,
                       reported_lam=lambda m: reported_lam(cfg, problem, m.hist, m.dual)[0])
    except FloatingPointError as exc:
        raise FloatingPointError(f"{exc}; the run stopped and the last good checkpoint "
                                 f"({rd.checkpoint_path}) was kept") from exc
    finally:
        bar_un.close()
    done = rd.load_checkpoint()["step"]
    if done < cfg.train.total_steps:  # interrupted on purpose (stop_after): no summary yet
        return {"interrupted_at": done}

    summary = evaluate(cfg, problem, Trained(models, dual, hist, pmeta))
    summary["seconds"] = time.perf_counter() - t_start
    rd.write_summary(summary)
    if cfg.figure:
        summary["figure"] = str(draw_figure(out / "toy.png", cfg, q, problem.quads, summary, hist))
        rd.write_summary(summary)
    return summary


def progress_bar(enabled: bool) -> Callable[..., tqdm]:
    """A factory of ``tqdm`` bars (``make(total=..., desc=...)``), disabled unless ``enabled``."""
    from tqdm.auto import tqdm

    def make(**kw: Any) -> tqdm:
        return tqdm(disable=not enabled, **kw)
    return make


def dual_only_lam(quads: list[Quadrature], budgets: Floats, lr_dual: float, sum_max: float | None, steps: int = 400) -> np.ndarray:
    """RU dual-only: projected dual ascent on lam alone, the slack ``b - KL(p_lam||q_i)`` evaluated
    on the explicit x_0 tilt (no network), from lam = 0. One constraint per quadrature."""
    state = DualState("reverse_kl", budgets, lr_dual, None, None, sum_max)
    for _ in range(steps):
        state.step([qd.constraint_values([float(state.lam[i])])[0] for i, qd in enumerate(quads)])
    return state.lam.numpy().copy()


def initial_dual(cfg: ToyConfig, problem: Problem) -> DualState:
    """The dual side of one run (a resolved config): the problem's domain, the step size
    ``cfg.dual.lr`` (0 for the fixed-multiplier algorithms) and the initial multipliers of each
    algorithm (primal-dual: ``dual.lam_init``; ESD: eq. 8 at ``eta``; SISS: ``siss_lam``; dual-only:
    lam* of the explicit tilt, by its own dual ascent)."""
    du = cfg.dual
    lam_init = np.asarray(du.lam_init, dtype=np.float64)
    if cfg.algorithm == "esd":
        lam_init = lam_from_eta(torch.tensor([cfg.eta], dtype=torch.float64)).numpy()
    elif cfg.algorithm == "siss":
        lam_init = np.full(len(problem.budgets), cfg.siss_lam)
    elif cfg.algorithm == "dual_only":
        lam_init = dual_only_lam(list(problem.quads), problem.budgets, du.lr, problem.sum_max)
    return DualState(cfg.problem, problem.budgets, du.lr if cfg.algorithm == "primal_dual" else 0.0, lam_init,
                     problem.upper, problem.sum_max, du.lam_max, violation_scale=du.violation_scale)
