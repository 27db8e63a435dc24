"""One toy unlearning run, end to end: ``run(ToyConfig) -> summary dict`` (the CLI and the tests call
this). Steps: resolve the instance and budgets (refusing unachievable ones), lam* from theory,
pretrain (or reload) the eps network on samples of q, build the forget models, find the exact-score
surrogate multiplier, unlearn with checkpoints, evaluate against the target, write
``summary.json`` and a figure.

Seeds: everything random derives from ``cfg.seed`` through
``toy.core.seeding.derive_seed(cfg.seed, purpose)``, so a rerun (or a resumed run) with the same seed reproduces the result exactly.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from theory.config import config_to_dict
from toy.algorithms import LoopConfig, Models
from toy.loop import unlearn
from toy.distances import energy_distance
from toy.core.dual import DualState, dual_domain
from toy.models import EpsMLP, MixtureEps
from toy.core.objectives import lam_from_eta
from toy.pretrain import MixtureData, load_model, save_model, train_denoiser
from toy.problems import check_budgets, default_instance, lam_star
from toy.reference import Quadrature, surrogate_lam
from toy.core.runs import CheckpointStore, RunDir, atomic_write_json, clear_run_dir
from toy.sampling import ddpm_sample
from toy.config import (ToyConfig, delay_limited_gain, estimate_kind, pool_chains, primal_target, schedule, validate,
                        violation_scale)
from toy.core.seeding import derive_seed, seeded_generator
from toy.evaluation import evaluate, surrogate_constraint_fn
from toy.figures import draw_figure

log = logging.getLogger(__name__)


def pretrain_on_mixture(mixture, cfg: ToyConfig, purpose: str, path: Path | None = None, progress=None,
                        checkpoint: Path | None = None) -> tuple[EpsMLP, dict]:
    """Pretrain an ``EpsMLP`` on fresh samples of ``mixture``; reload from ``path`` if it exists.
    With ``checkpoint`` (a folder), pretraining is checkpointed every ``cfg.checkpoint_every`` steps
    and resumed from there; the checkpoint is removed once the model is saved to ``path``."""
    if path is not None and Path(path).exists():
        return load_model(path)
    torch.manual_seed(derive_seed(cfg.seed, purpose + ":init"))
    net = EpsMLP(mixture.dim, cfg.hidden, cfg.layers, cfg.time_dim, cfg.num_timesteps)
    ab = schedule(cfg)
    t0 = time.perf_counter()
    losses = train_denoiser(net, MixtureData(mixture, derive_seed(cfg.seed, purpose + ":data")), ab, cfg.pretrain_steps,
                            cfg.pretrain_batch, cfg.pretrain_lr, seeded_generator(cfg.seed, purpose + ":noise"), progress,
                            checkpoint=checkpoint if path is not None else None,
                            checkpoint_every=cfg.checkpoint_every)
    seconds = time.perf_counter() - t0
    # how close the pretrained model's samples are to its data law (the yardstick of the toy tests)
    x = ddpm_sample(net, cfg.n_eval, ab, seeded_generator(cfg.seed, purpose + ":eval"))
    rng = np.random.default_rng(derive_seed(cfg.seed, purpose + ":eval-ref"))
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


def check_pretrained_meta(meta: dict, mixture, cfg: ToyConfig) -> None:
    if meta.get("schedule") != [cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule]:
        raise ValueError(f"pretrained model was trained on schedule {meta.get('schedule')}, the run uses "
                         f"{[cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.schedule]}")
    if "means" in meta and not np.allclose(np.asarray(meta["means"]), mixture.means):
        raise ValueError("pretrained model was trained on another mixture")


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
    q, forget, budgets = instance_and_budgets(cfg)
    out = Path(cfg.out)
    rd = stack.enter_context(RunDir(out, config_to_dict(cfg), cfg.seed, resume=resume))
    lam_th, lam_source = lam_star(cfg.problem, q, forget, budgets, cfg.variant)
    quads = [Quadrature(cfg.problem, q, [f], cfg.variant) for f in forget]
    ab = schedule(cfg)
    bar = progress_bar(progress)

    # pretrained model of q (reloaded when present: a resumed run does not pretrain again)
    ppath = Path(cfg.pretrained) if cfg.pretrained else out / "pretrained.pt"
    bar_pre = bar(total=cfg.pretrain_steps, desc="pretrain", leave=False) if not ppath.exists() else None
    frozen, pmeta = pretrain_on_mixture(q, cfg, "pretrain", ppath, bar_pre,
                                        checkpoint=out / "pretrain-checkpoint" if not cfg.pretrained else None)
    if bar_pre is not None:
        bar_pre.close()
    check_pretrained_meta(pmeta, q, cfg)
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
                    retain_data=MixtureData(q, derive_seed(cfg.seed, "retain")),
                    forget_data=[MixtureData(f, derive_seed(cfg.seed, f"forget{i}")) for i, f in enumerate(forget)],
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

    dual, lr_dual, slopes = initial_dual(cfg, quads, lam_th, budgets)
    loop = loop_config(cfg)
    bar_un = bar(total=cfg.steps, desc=f"{cfg.problem} {cfg.algorithm}")
    ckpt = rd.load_checkpoint()
    if ckpt is not None:
        bar_un.update(ckpt["step"])
    try:
        hist = unlearn(cfg.problem, cfg.algorithm, models, dual, loop, rd, seeded_generator(cfg.seed, "unlearn"),
                       cfg.variant, cfg.lu_estimator, bar_un, stop_after)
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


def progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    def make(**kw):
        return tqdm(disable=not enabled, **kw)
    return make


def dual_slope(quad: Quadrature, lam: float) -> float:
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


def initial_dual(cfg: ToyConfig, quads: list[Quadrature], lam_th, budgets) -> tuple[DualState, float, np.ndarray]:
    """The dual side of one run: the problem's domain (``dual_domain``), the Newton-scaled step size
    ``gain / |d constraint / d lam|`` at theory's lam* (the violation's scale and the delay-limited gain,
    eq. 36, from the config), and the initial multipliers of each algorithm (ESD: eq. 8; SISS: half the
    FU domain unless set; dual-only: lam* of the explicit tilt). Returns ``(dual, lr_dual, slopes)``."""
    domain = dual_domain(cfg.problem, len(budgets),
                         upper=[qd.lam_max() for qd in quads] if cfg.problem == "forward_kl" else None)
    upper, sum_max = domain.upper, domain.sum_max
    slopes = np.array([dual_slope(qd, lam_i) for qd, lam_i in zip(quads, lam_th)])
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
    return dual, lr_dual, slopes


def loop_config(cfg: ToyConfig) -> LoopConfig:
    """The unlearning loop's settings from the run's config (pool only for RU's composed target)."""
    composed_ru = cfg.problem == "reverse_kl" and primal_target(cfg) == "composed"
    return LoopConfig(cfg.steps, cfg.batch, cfg.forget_batch, cfg.lr, cfg.dual_every, cfg.dual_batch,
                      cfg.checkpoint_every, cfg.average_frac, lr_final_frac=cfg.lr_final_frac, target=primal_target(cfg),
                      pool_frac=cfg.pool_frac if composed_ru else 0.0,
                      estimate="fresh" if estimate_kind(cfg) == "fresh" else "pool", pool_chains=pool_chains(cfg),
                      pool_every=cfg.pool_every)


def instance_and_budgets(cfg: ToyConfig) -> tuple:
    """``(q, forget, budgets)``: the default instance and the run's budgets (the instance's own when
    the config gives none), refused here when theory says they cannot be met."""
    inst = default_instance()
    q, forget = inst.q, list(inst.forget)
    budgets = np.asarray(cfg.budgets, dtype=np.float64) if cfg.budgets else inst.budgets[cfg.problem]
    if budgets.shape[0] != len(forget):
        raise ValueError(f"{len(forget)} forget distribution(s) but {budgets.shape[0]} budget(s) {budgets.tolist()}")
    check_budgets(cfg.problem, q, forget, budgets, cfg.variant)
    return q, forget, budgets
