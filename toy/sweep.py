"""Budget sweeps and seed ensembles of the toy tier in one vectorised run (``toy.ensemble``), with a
verdict per member: ``dualunlearn toy sweep [--problems ...] [--budgets ...] [--seeds N] --out DIR``.

The default sweep: for every problem the instance's default budget and the budgets certified by two
more multipliers on the dual path, trained with primal-dual (RU with both primal targets, the
composed surrogate and the exact reweighted one), plus the fixed-multiplier baselines ESD (eta = 1),
SISS (lam = 0.30) and RU dual-only at the default budget. Writes ``sweep.json`` (one record per
member: problem, algorithm, target, budgets, seed, lam, lam*, the reference and its derived
tolerance interval, constraint values with standard errors, the distance to the reference law
against its bound, and a verdict naming the failed checks) and ``sweep.png`` (the learned points on
theory's P*(b) and lam*(b) curves, the baselines' fixed multipliers marked, and every member's
distance to the x_0 target at lam* against the noise bound).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toy.core.runs import atomic_write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from toy.config import ToyConfig

log = logging.getLogger(__name__)

#: multipliers whose certified budgets the default sweep adds to the instance's default budget
SWEEP_LAMS = {"reverse_kl": (0.06, 0.25), "forward_kl": (0.12, 0.28), "likelihood": (5.0, 60.0)}
PROBLEMS = ("reverse_kl", "forward_kl", "likelihood")


def default_budgets(problem: str) -> list[float]:
    """The instance's default budget and the budgets ``b(lam)`` certified by ``SWEEP_LAMS``."""
    from theory.gmm import sweep as theory_sweep
    from toy.problems import default_instance

    inst = default_instance()
    extra = theory_sweep(problem, inst.q, list(inst.forget), list(SWEEP_LAMS[problem]))[0]
    return [float(inst.budgets[problem][0])] + [float(b) for b in extra]


def sweep_configs(base: ToyConfig, problems: Sequence[str] = PROBLEMS, budgets: dict | None = None,
                  seeds: Sequence[int] = (0,), baselines: bool = True) -> list[ToyConfig]:
    """The members of a sweep as ``ToyConfig``s (``base`` gives the shared schedule)."""
    from toy.config import override

    cfgs = []
    for seed in seeds:
        for p in problems:
            bs = (budgets or {}).get(p) or default_budgets(p)
            for b in bs:
                targets = ("composed", "reweighted") if p == "reverse_kl" else (None,)
                for tgt in targets:
                    cfgs.append(override(base, {"problem": p, "algorithm": "primal_dual", "budgets": (float(b),),
                                                "train.target": tgt, "seed": seed,
                                                "evaluation.surrogate_reference": tgt == "composed"}))
            if baselines:
                if p == "reverse_kl":
                    cfgs.append(override(base, {"problem": p, "algorithm": "esd", "eta": 1.0, "train.target": None,
                                                "seed": seed, "evaluation.surrogate_reference": False}))
                    cfgs.append(override(base, {"problem": p, "algorithm": "dual_only", "budgets": (float(bs[0]),),
                                                "train.target": None, "seed": seed,
                                                "evaluation.surrogate_reference": False}))
                elif p == "forward_kl":
                    cfgs.append(override(base, {"problem": p, "algorithm": "siss", "siss_lam": 0.30, "train.target": None,
                                                "seed": seed}))
    return cfgs


def member_record(cfg: ToyConfig, summary: dict) -> dict:
    """One ``sweep.json`` record: what the member is, what it reached, and its verdict."""
    from toy.verify import member_checks

    checks = member_checks(summary, f"{cfg.problem} {cfg.algorithm}")
    failed = [c.name for c in checks if not c.passed]
    dist_key, ref_law = _reference_distance(summary)
    floor = summary.get("distance_noise_floor")
    return {
        "problem": cfg.problem, "algorithm": cfg.algorithm, "target": summary.get("target"), "seed": cfg.seed,
        "budgets": summary["budgets"], "lam": summary["lam"], "lam_star": summary["lam_star"],
        "lam_reference": summary.get("lam_reference"), "lam_reference_source": summary.get("lam_reference_source"),
        "lam_tolerance_interval": summary.get("lam_tolerance_interval"),
        "constraint_values": summary["constraint_values"], "constraint_stderr": summary["constraint_stderr"],
        "lam_stderr": summary.get("lam_stderr"), "constraint_stderr_total": summary.get("constraint_stderr_total"),
        "constraint_violation": summary["constraint_violation"],
        "objective_estimate": summary.get("objective_estimate"), "objective_stderr": summary.get("objective_stderr"),
        "target_objective_star": summary.get("target_objective_star"),
        "distance_to_target": summary.get("distance_to_target"), "distance_to_reference": summary.get(dist_key),
        "reference_law": ref_law, "distance_noise_floor": floor,
        "pretrained_distance_to_q": summary.get("pretrained_distance_to_q"),
        "checks": [{"name": c.name, "measured": c.measured, "expected": c.expected, "passed": c.passed} for c in checks],
        "verdict": {"passed": not failed, "failed": failed},
        "out": cfg.out, "worker": summary.get("worker"),
    }


def _reference_distance(summary: dict) -> tuple[str, str]:
    """Which law a member's samples must match: the x_0 target at lam* (exact targets), the
    exact-score surrogate (composed target, dual-only), the frozen network's composed chain (ESD)."""
    if summary["algorithm"] == "esd":
        return "distance_to_frozen_composed", "composed chain of the frozen network at the fixed eta"
    if "distance_to_surrogate" in summary:
        return "distance_to_surrogate", "exact-score surrogate"
    return "distance_to_target", "x_0 target"


def run_sweep(out: str | Path, base: ToyConfig | None = None, problems: Sequence[str] = PROBLEMS,
              budgets: dict | None = None, seeds: Sequence[int] = (0,),
              baselines: bool = True, progress: bool = False, figure: bool = True, threads: int | str = "auto",
              workers: int | str = "auto") -> dict:
    """Train a sweep as one ensemble into ``out``; write ``sweep.json`` (and ``sweep.png``). Returns
    ``{"records": [...], "seconds": ..., "passed": bool, "workers": k, "threads_chosen": [...]}``
    (``threads``, ``workers``: see ``toy.ensemble.run_ensemble``)."""
    from toy.ensemble import run_ensemble
    from toy.config import ToyConfig

    t0 = time.perf_counter()
    base = replace(base or ToyConfig(), figure=False)
    out = Path(out)
    cfgs = sweep_configs(base, problems, budgets, seeds, baselines)
    summaries = run_ensemble(cfgs, out, progress=progress, threads=threads, workers=workers)
    records = [member_record(replace(c, out=s_out), s) for c, s, s_out in
               zip(cfgs, summaries, [str(out / f"member-{i:03d}") for i in range(len(cfgs))])]
    result = {"members": len(records), "seconds": time.perf_counter() - t0,
              "passed": all(r["verdict"]["passed"] for r in records), "records": records,
              "workers": summaries[0]["workers"] if summaries else 0, "threads": threads, "threads_chosen": summaries[0].get("threads_chosen", []) if summaries else [],
              "config": {"steps": base.train.steps, "pretrain_steps": base.pretrain.steps, "hidden": base.model.hidden,
                         "seeds": list(seeds), "problems": list(problems)}}
    atomic_write_json(out / "sweep.json", result)
    if figure:
        result["figure"] = str(draw_sweep(out / "sweep.png", records))
        atomic_write_json(out / "sweep.json", result)
    return result


def draw_sweep(path: Path, records: list[dict]) -> Path:
    """``sweep_figure(records)`` saved to ``path``."""
    sweep_figure(records).savefig(path, dpi=100)
    return path


def sweep_figure(records: list[dict]) -> Figure:
    """A ``matplotlib.figure.Figure`` (no backend forced; shown inline in Jupyter). Three rows per problem column: the learned (constraint, objective) points on theory's P*(b),
    the learned lam on theory's lam*(b) (bars: derived tolerance; ESD's and SISS's fixed multipliers
    as horizontal lines), and each member's energy distance to the x_0 target at lam* against the
    noise bound (RU's composed surrogate sits visibly above it, the reweighted target at it)."""
    from matplotlib.figure import Figure

    from theory.gmm import sweep as theory_sweep
    from toy.problems import default_instance
    from toy.verify import DISTANCE_FLOOR_MULTIPLE

    inst = default_instance()
    q, forget = inst.q, list(inst.forget)
    paths = {"reverse_kl": np.linspace(0.0, 0.75, 40), "forward_kl": np.linspace(0.0, q.weights[2], 40),
             "likelihood": np.concatenate([[0.0], np.geomspace(0.5, 300.0, 39)])}
    xl = {"reverse_kl": "KL(p||q_forget) (budget b)", "forward_kl": "KL(q_forget||p) (budget b)",
          "likelihood": "E_p[q_forget(x)] (budget b)"}
    yl = {"reverse_kl": "KL(p||q)", "forward_kl": "KL(q||p)", "likelihood": "KL(p||q)"}
    problems = [p for p in PROBLEMS if any(r["problem"] == p for r in records)]
    fig = Figure(figsize=(5.2 * len(problems), 12))
    axes = fig.subplots(3, len(problems), squeeze=False)
    style = {("primal_dual", "composed"): ("s", "tab:orange", "primal-dual, composed target"),
             ("primal_dual", "reweighted"): ("o", "tab:blue", "primal-dual, reweighted target"),
             ("primal_dual", "signed"): ("o", "tab:blue", "primal-dual, signed loss"),
             ("dual_only", "composed"): ("D", "tab:green", "dual-only (composed)")}
    for col, p in enumerate(problems):
        b_path, P_path = theory_sweep(p, q, forget, paths[p])
        rs = [r for r in records if r["problem"] == p]
        ax0, ax1, ax2 = axes[0, col], axes[1, col], axes[2, col]
        ax0.plot(b_path, P_path, "-", color="0.3", label="theory P*(b)")
        ax1.plot(b_path, paths[p], "-", color="0.3", label="theory lam*(b)")
        seen = set()
        for r in rs:
            key = (r["algorithm"], r["target"])
            c, s = r["constraint_values"][0], r["constraint_stderr"][0]
            if r["algorithm"] in ("esd", "siss"):
                lab = f"{r['algorithm'].upper()} lam = {r['lam'][0]:.3g} (fixed)"
                lab, _ = (lab if lab not in seen else None), seen.add(lab)
                ax0.errorbar(c, r["objective_estimate"], xerr=s, yerr=r["objective_stderr"], fmt="*", color="tab:red",
                             ms=12, label=lab)
                ax1.axhline(r["lam"][0], color="tab:red", ls="--", lw=1, label=lab)
                continue
            mk, colr, lab = style.get(key, ("o", "tab:purple", f"{r['algorithm']} ({r['target']})"))
            lab = lab if key not in seen else None
            seen.add(key)
            failed = not r["verdict"]["passed"]
            ax0.errorbar(c, r["objective_estimate"], xerr=s, yerr=r["objective_stderr"], fmt=mk, color=colr,
                         mfc="none" if failed else colr, ms=6, label=lab)
            lo, hi = r["lam_tolerance_interval"] or [r["lam"][0]] * 2
            lam = r["lam"][0]
            hi = min(hi, 10 * lam + 1)
            # the tolerance interval as a bar (the learned lam may lie outside it: then it failed)
            ax1.plot([r["budgets"][0]] * 2, [lo, hi], "-", color=colr, lw=1.5, alpha=0.6)
            ax1.plot(r["budgets"][0], lam, mk, color=colr, mfc="none" if failed else colr, ms=6, label=lab)
            if key == ("primal_dual", "composed") and r.get("lam_reference") is not None:
                ax1.plot(r["budgets"][0], r["lam_reference"][0], "x", color="tab:orange", ms=8,
                         label="exact-score surrogate fixed point" if "sur" not in seen else None)
                seen.add("sur")
        # distances to the x_0 target at lam*, per budget, against the noise bound
        pd = [r for r in rs if r["algorithm"] == "primal_dual"]
        for r in pd:
            mk, colr, _ = style.get((r["algorithm"], r["target"]), ("o", "tab:purple", ""))
            ax2.plot(r["budgets"][0], r["distance_to_target"], mk, color=colr, ms=6)
            bound = r["pretrained_distance_to_q"] + DISTANCE_FLOOR_MULTIPLE * r["distance_noise_floor"]
            ax2.plot(r["budgets"][0], bound, "_", color="k", ms=14)
        ax2.plot([], [], "_", color="k", ms=14, label="bound: pretrained + 3 sqrt(2) floors")
        for key in {(r["algorithm"], r["target"]) for r in pd}:
            mk, colr, lab = style.get(key, ("o", "tab:purple", str(key)))
            ax2.plot([], [], mk, color=colr, label=lab)
        for ax in (ax0, ax1, ax2):
            if p == "likelihood":
                ax.set_xscale("log")
            ax.legend(fontsize=7)
        if p == "likelihood":
            ax1.set_yscale("symlog")
        ax0.set_xlabel(xl[p])
        ax0.set_ylabel(f"retention objective {yl[p]}")
        ax0.set_title(p, fontsize=10)
        ax1.set_xlabel("budget b")
        ax1.set_ylabel("lam (bars: derived tolerance; open: failed)")
        ax2.set_xlabel("budget b")
        ax2.set_ylabel("energy distance to the x_0 target at lam*")
        ax2.set_yscale("log")
    fig.suptitle("toy sweep: learned models on theory's P*(b) and lam*(b)")
    fig.tight_layout()
    return fig
