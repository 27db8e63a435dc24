"""The toy section of ``dualunlearn verify``: a small, fast configuration of the toy runs on the
default 2-D instance, with the checks of docs/toy.md and one figure.

- quick (<= 20 s): FU primal-dual only, a small network (the signed loss's target is exact, so the
  learned lam must reach theory's lam*).
- default (<= 90 s): FU primal-dual and LU primal-dual (reweighted target, exact at every t).

Checks per run: lam inside its derived tolerance interval around the reference; the constraint
violation within 3 standard errors of its estimate; the distance to the target within the
pretrained model's distance to q plus ``DISTANCE_FLOOR_MULTIPLE`` noise floors.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from theory.report import Check, Section
from toy.config import ToyConfig, override
from toy.run import run

log = logging.getLogger(__name__)

#: distance tolerance in noise floors (docs/toy.md: 3 standard deviations of a difference of two
#: energy-distance V-statistics, each with standard deviation <= its mean, the floor: 3 * sqrt(2)).
DISTANCE_FLOOR_MULTIPLE = 3.0 * np.sqrt(2.0)


def checks_for(summary: dict, label: str) -> list[Check]:
    """The three statistical checks of one run's summary (docs/toy.md)."""
    out = []
    lam = float(np.asarray(summary["lam"])[0])
    if "lam_tolerance_interval" in summary:
        lo, hi = summary["lam_tolerance_interval"]
        ref = float(np.asarray(summary["lam_reference"])[0])
        out.append(Check(f"{label}: lam in tolerance of {summary['lam_reference_source']}",
                         f"lam = {lam:.4g} (ref {ref:.4g})", f"[{lo:.4g}, {hi:.4g}]",
                         bool(summary["lam_within_tolerance"])))
    win = summary.get("lam_window")
    if win is not None:
        drift, dse = float(np.asarray(win["drift"])[0]), float(np.asarray(win["drift_se"])[0])
        out.append(Check(f"{label}: lam settled over its window",
                         f"drift {drift:.3g} over the last {win['length']} dual steps (tau {win['tau']:.1f})",
                         f"|drift| <= 3 se = {3 * dse:.3g}", bool(win["settled"])))
    viol = float(np.asarray(summary["constraint_violation"])[0])
    se = float(np.asarray(summary["constraint_stderr"])[0])
    se_lam = float(np.asarray(summary.get("constraint_stderr_from_lam", [0.0]))[0])
    total = float(np.hypot(se, se_lam))
    out.append(Check(f"{label}: constraint holds within estimation error",
                     f"violation {viol:.3g} (se {se:.2g} of the estimate, {se_lam:.2g} of the reported lam)",
                     f"<= 3 se = {3 * total:.3g}", bool(viol <= 3 * total)))
    d, d_pre, floor = summary["distance_to_target"], summary["pretrained_distance_to_q"], summary["distance_noise_floor"]
    bound = d_pre + DISTANCE_FLOOR_MULTIPLE * floor
    out.append(Check(f"{label}: energy distance to target", f"{d:.4g}",
                     f"<= pretrained {d_pre:.3g} + {DISTANCE_FLOOR_MULTIPLE:.2f} x floor {floor:.3g} = {bound:.3g}",
                     bool(d <= bound)))
    return out


def _distance_check(label: str, what: str, d: float, summary: dict) -> Check:
    d_pre, floor = summary["pretrained_distance_to_q"], summary["distance_noise_floor"]
    bound = d_pre + DISTANCE_FLOOR_MULTIPLE * floor
    return Check(f"{label}: energy distance to {what}", f"{d:.4g}",
                 f"<= pretrained {d_pre:.3g} + {DISTANCE_FLOOR_MULTIPLE:.2f} x floor {floor:.3g} = {bound:.3g}",
                 bool(d <= bound))


def member_checks(summary: dict, label: str) -> list[Check]:
    """The checks that decide a run's verdict, by what its algorithm promises (docs/toy.md):

    - primal-dual with a target exact at every t (FU signed, RU/LU reweighted): ``checks_for``;
    - primal-dual with RU's composed target: the same, its distance measured to the exact-score
      surrogate (what a perfect network generates with that target);
    - dual-only: lam equals theory's lam* (1e-6 relative) and the samples match the exact-score
      surrogate at lam*; the budget is not checked (dual-only cannot correct the network, docs/toy.md);
    - ESD / SISS (fixed multipliers, no budget): the samples match the law their target defines
      (ESD: the frozen network's composed chain; SISS: the signed mixture at its lam).
    """
    alg = summary["algorithm"]
    if alg == "primal_dual" and "distance_to_surrogate" in summary:
        return checks_for({**summary, "distance_to_target": summary["distance_to_surrogate"]}, label)[:-1] + [
            _distance_check(label, "the exact-score surrogate", summary["distance_to_surrogate"], summary)]
    if alg == "primal_dual":
        return checks_for(summary, label)
    if alg == "dual_only":
        lam, ls = float(np.asarray(summary["lam"])[0]), float(np.asarray(summary["lam_star"])[0])
        return [Check(f"{label}: lam equals theory's lam*", f"lam = {lam:.6g}", f"{ls:.6g} +- 1e-6 rel.",
                      bool(abs(lam - ls) <= 1e-6 * ls)),
                _distance_check(label, "the exact-score surrogate at lam*", summary["distance_to_surrogate"], summary)]
    if alg == "esd":
        return [_distance_check(label, "the frozen network's composed chain", summary["distance_to_frozen_composed"],
                                summary)]
    return [_distance_check(label, "the signed mixture at its lam", summary["distance_to_target"], summary)]


def configs(out_dir: Path, quick: bool, seed: int) -> list[ToyConfig]:
    base = ToyConfig(seed=seed, out=str(out_dir / "toy-fu"), problem="forward_kl")
    if quick:
        small = override(base, {"model.hidden": 64, "pretrain.steps": 1000, "train.steps": 700, "evaluation.n_eval": 1000,
                                "evaluation.n_constraint": 4000, "train.checkpoint_every": 1000})
        return [small]
    base = override(base, {"pretrain.steps": 3000, "train.steps": 2500})
    lu = replace(base, problem="likelihood", out=str(out_dir / "toy-lu"), pretrained=str(out_dir / "toy-fu" / "pretrained.pt"))
    return [base, lu]


def verify_section(out_dir: Path, quick: bool, seed: int) -> Section:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    checks: list[Check] = []
    figures = []
    lines = []
    from toy.models import torch_threads
    for cfg in configs(out_dir, quick, seed):
        shutil.rmtree(cfg.out, ignore_errors=True) if not cfg.pretrained else None
        # one intra-op thread (cfg.threads): small networks run fastest so, and do not fight other
        # busy processes for the cores; progress bars show the steps inside the section
        with torch_threads(cfg.threads):
            summary = run(cfg, progress=True, overwrite=True)  # a check, not a run to continue
        label = f"{cfg.problem} {cfg.algorithm}"
        checks += checks_for(summary, label)
        fig = out_dir / f"toy_{cfg.problem}.png"
        shutil.copyfile(summary["figure"], fig)
        figures.append(fig.name)
        lines.append(f"{label}: lam = {np.asarray(summary['lam'])[0]:.4g}, lam* = {np.asarray(summary['lam_star'])[0]:.4g} "
                     f"({summary['lam_star_source']}), constraint {np.asarray(summary['constraint_values'])[0]:.4g} "
                     f"vs budget {np.asarray(summary['budgets'])[0]:.4g}, {summary['seconds']:.1f} s")
    text = ("Small eps-MLPs pretrained on the default 2-D mixture and unlearned with the primal-dual "
            "algorithms; tolerances derived in docs/toy.md. " + "; ".join(lines))
    return Section("toy: learned models vs theory", tuple(checks), tuple(figures), text, time.perf_counter() - t0)
