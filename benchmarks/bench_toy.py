"""Toy-tier timings on the default 2-D instance (run with OMP_NUM_THREADS=2 for "2 cores"):

- time to pretrain the eps-MLP (default ToyConfig) and to unlearn each problem with primal-dual;
- per-step cost of the dual machinery against the primal step it rides on, in the same run:
  the multiplier update (violation, projected ascent, bookkeeping) and, separately, the constraint
  estimate (RU: path KL on own trajectories, LU: model samples every ``dual_every`` steps; FU: free,
  it reuses the forget minibatch's losses), both amortised per step;
- the fixed-multiplier baselines (ESD, SISS) median step time, for the side-by-side comparison.

Targets (issue 4): pretrain + unlearn < 60 s per problem; dual overhead < 5% of step time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_toy.py [--quick]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test of the script)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(tempfile.mkdtemp(prefix="bench-toy-"))
    base = ToyConfig(figure=False)
    if args.quick:
        base = replace(base, pretrain_steps=300, steps=200, n_eval=300, n_constraint=1000, n_reference=300)
    q, _, _ = default_instance()
    t0 = time.perf_counter()
    pretrain_on_mixture(q, base, "pretrain", work / "pretrained.pt")
    t_pre = time.perf_counter() - t0
    base = replace(base, pretrained=str(work / "pretrained.pt"))
    rows = []
    for problem, baseline in (("reverse_kl", "esd"), ("forward_kl", "siss"), ("likelihood", None)):
        t0 = time.perf_counter()
        s = run(replace(base, problem=problem, out=str(work / problem), surrogate_reference=False))
        t_un = time.perf_counter() - t0
        hist = torch.load(work / problem / "checkpoint.pt", weights_only=False)["hist"]
        step = np.median(hist["step_seconds"])
        dual = np.sum(hist["dual_seconds"]) / len(hist["dual_seconds"])
        est = np.sum(hist["estimate_seconds"]) / len(hist["estimate_seconds"])
        b_step = float("nan")
        if baseline is not None:
            sb = run(replace(base, problem=problem, algorithm=baseline, out=str(work / f"{problem}-{baseline}")))
            b_step = sb["step_seconds_median"]
        rows.append((problem, t_pre, t_un, step, b_step, dual, est, s["lam"][0], s["lam_star"][0]))
    print(f"\ntoy benchmark, torch threads = {torch.get_num_threads()}, steps = {base.steps}, "
          f"pretrain_steps = {base.pretrain_steps}\n")
    print("| problem | pretrain s | unlearn s | total s | primal step ms | baseline step ms | dual update ms/step (%) "
          "| constraint estimate ms/step (%) | lam | lam* |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p, tp, tu, st, bst, du, es, lam, ls in rows:
        print(f"| {p} | {tp:.1f} | {tu:.1f} | {tp + tu:.1f} | {1e3 * st:.2f} | {1e3 * bst:.2f} | "
              f"{1e3 * du:.3f} ({100 * du / st:.1f}%) | {1e3 * es:.2f} ({100 * es / st:.0f}%) | {lam:.4g} | {ls:.4g} |")
    print("\n'unlearn s' includes the end-of-run evaluation (samples, constraint and objective estimates, distances).")


if __name__ == "__main__":
    main()
