"""Toy-tier timings on the default 2-D instance (run with OMP_NUM_THREADS=1: one thread per process
is fastest for these 128-wide MLPs on a 2-core machine):

- time to pretrain the eps-MLP (default ToyConfig) and to unlearn each problem with primal-dual;
- per-step cost of the dual machinery against the fixed-multiplier baseline step, in the same run.
  Every timing is a *mean* over all steps (the amortised cost; a median would hide periodic work):
  ``primal`` (loss, backward, Adam), ``pool`` (advancing the ``TrajectoryPool`` of the model's own
  chains), ``estimate`` (the constraint estimate: RU evaluates the forget model along the pool,
  LU evaluates g at the pool's end points, FU reuses the forget minibatch's losses) and ``update``
  (projected dual ascent and bookkeeping);
- "dual machinery" is what the primal-dual run computes and its baseline does not: estimate +
  update, plus the pool when the baseline has none (LU: no fixed-multiplier baseline, so it is
  compared with its own primal step; RU: ESD's composed target also draws half its x_0 from the
  pool, so the pool is primal work in both);
- for comparison, the same primal-dual run with ``estimate=fresh`` (T sequential network
  evaluations on ``dual_batch`` fresh trajectories every ``dual_every`` steps, the previous design;
  for LU also the previous default), and RU with the pool advanced every step.

Targets (issue 4): pretrain + unlearn < 60 s per problem; dual overhead < 5% of step time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_toy.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from theory.gmm import default_instance
from toy.run import ToyConfig, pretrain_on_mixture, run


def _per_step_ms(out: Path) -> dict:
    from toy.core.runs import CheckpointStore

    hist = CheckpointStore(out / "checkpoint").load()[0]["hist"]
    return {k: 1e3 * float(np.mean(hist[f"{k}_seconds"])) for k in ("step", "pool", "estimate", "dual")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test of the script)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="bench-toy-"))
    base = ToyConfig(figure=False)
    if args.quick:
        base = replace(base, pretrain_steps=300, steps=200, n_eval=300, n_constraint=1000, n_reference=300)
    q, _, _ = default_instance()
    t0 = time.perf_counter()
    pretrain_on_mixture(q, base, "pretrain", work / "pretrained.pt")
    t_pre = time.perf_counter() - t0
    base = replace(base, pretrained=str(work / "pretrained.pt"))
    rows, lams = [], []
    for problem, baseline in (("reverse_kl", "esd"), ("forward_kl", "siss"), ("likelihood", None)):
        cfg = replace(base, problem=problem, surrogate_reference=False)
        t0 = time.perf_counter()
        s = run(replace(cfg, out=str(work / problem)))
        t_un = time.perf_counter() - t0
        pd = _per_step_ms(work / problem)
        if baseline is not None:
            run(replace(cfg, algorithm=baseline, out=str(work / f"{problem}-{baseline}")))
            bl = _per_step_ms(work / f"{problem}-{baseline}")
            ref = sum(bl.values())
            machinery = pd["estimate"] + pd["dual"]  # the baseline runs the same pool, if any
        else:
            bl, ref = None, pd["step"]
            machinery = pd["estimate"] + pd["dual"] + pd["pool"]
        rows.append((problem, baseline or "own primal step", t_pre, t_un, pd, bl, ref, machinery, "default: " + s["constraint_estimator"]))
        lams.append((problem, "default: " + s["constraint_estimator"], s["lam"][0], s["lam_star"][0]))
        extra = {"reverse_kl": (("pool, every 1", dict(pool_every=1)), ("fresh", dict(estimate="fresh"))),
                 "likelihood": (("fresh", dict(estimate="fresh")),)}.get(problem, ())
        for name, kw in extra:
            tag = name.replace(", ", "-").replace(" ", "")
            sf = run(replace(cfg, out=str(work / f"{problem}-{tag}"), **kw))
            fr = _per_step_ms(work / f"{problem}-{tag}")
            ref_fr, m_fr = ref, fr["estimate"] + fr["dual"] + (fr["pool"] if bl is None else 0.0)
            if bl is not None and "pool_every" in kw:  # the baseline with the same pool schedule
                run(replace(cfg, algorithm=baseline, out=str(work / f"{problem}-{baseline}-{tag}"), **kw))
                ref_fr = sum(_per_step_ms(work / f"{problem}-{baseline}-{tag}").values())
            rows.append((problem, baseline or "own primal step", t_pre, float("nan"), fr, bl, ref_fr, m_fr, name))
            lams.append((problem, name, sf["lam"][0], sf["lam_star"][0]))
    print(f"\ntoy benchmark, torch threads = {torch.get_num_threads()}, steps = {base.steps}, "
          f"pretrain_steps = {base.pretrain_steps}, dual_every = {base.dual_every}; ms are means per step\n")
    print("| problem | estimate | pretrain s | unlearn s | primal ms | pool ms | estimate ms | update ms "
          "| baseline total ms (which) | dual machinery ms | overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, which, tp, tu, pd, bl, ref, mach, est in rows:
        bl_s = f"{ref:.2f} ({which})"
        print(f"| {p} | {est} | {tp:.1f} | {tu:.1f} | {pd['step']:.2f} | {pd['pool']:.3f} | {pd['estimate']:.3f} | "
              f"{pd['dual']:.3f} | {bl_s} | {mach:.3f} | {100 * mach / ref:.1f}% |")
    print("\n| problem | estimate | lam | lam* |\n|---|---|---|---|")
    for p, est, lam, ls in lams:
        print(f"| {p} | {est} | {lam:.4g} | {ls:.4g} |")
    print("\n'unlearn s' includes the end-of-run evaluation (samples, constraint and objective estimates, distances).")
    print("RU here trains the composed target (default): its lam converges to the exact-score surrogate fixed point "
          "(0.2007 on this instance, docs/toy.md), not lam*.")


if __name__ == "__main__":
    main()
