"""Closed-form dual vs cvxpy on LU (likelihood variant), n = 1e2 .. 1e5 atoms, m in {1, 4}.

For each size: a random q and forget set (Dirichlet, seed fixed); budgets b = E_{p(lam0)}[q_i] at the
target of a drawn lam0 (so lam* = lam0 is known and every constraint is active). Timed:

* ``dual``: ``theory.discrete.solve`` on its default path (feasibility check, projected Newton on
  the closed-form D(lam), KKT certificate), median of repeats;
* ``cvxpy primal``: LU's primal ``min sum rel_entr(p, q) s.t. G p <= b`` (Clarabel, default
  tolerances, status asserted);
* ``cvxpy L(lam*)``: ``min_p L(p, lam*)`` by cvxpy, i.e. D(lam*).

Agreement: |P_cvx - D*|, |L_cvx - D*|, max |lam_cvx - lam*| / max(1, lam*), and |lam* - lam0| /
max(1, lam0). Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_discrete.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from theory import discrete
from theory.discrete import oracles


def instance(n: int, m: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(n))
    forget = rng.dirichlet(np.full(n, 0.5), size=m)
    lam0 = n * rng.uniform(0.5, 2.0, size=m)  # g = q_i is O(1/n): multipliers O(n) move p by O(1)
    p0 = discrete.likelihood_target(q, forget, lam0)
    return q, forget, forget @ p0, lam0


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n up to 1e4 only")
    args = ap.parse_args(argv)
    sizes = [100, 1_000, 10_000] + ([] if args.quick else [100_000])
    head = (f"{'n':>7} {'m':>2} | {'dual s':>9} {'cvx primal s':>12} {'cvx L(lam*) s':>13} {'speed-up':>9} | "
            f"{'|P_cvx-D*|':>10} {'|L_cvx-D*|':>10} {'lam rel err':>11} {'lam*-lam0':>9} cert")
    print(head)
    print("-" * len(head))
    for n in sizes:
        for m in (1, 4):
            q, forget, b, lam0 = instance(n, m)
            t_dual, s = timed(lambda: discrete.solve("likelihood", q, forget, b), 5 if n <= 10_000 else 3)
            t0 = time.perf_counter()
            orc = oracles.likelihood_primal(q, forget, b, fast=True)
            t_cvx = time.perf_counter() - t0
            t0 = time.perf_counter()
            lag = oracles.lagrangian_minimum("likelihood", q, forget, s.lam, b, fast=True)
            t_lag = time.perf_counter() - t0
            lam_err = float(np.max(np.abs(orc.duals - s.lam)) / max(1.0, s.lam.max()))
            lam0_err = float(np.max(np.abs(s.lam - lam0)) / max(1.0, lam0.max()))
            print(f"{n:>7} {m:>2} | {t_dual:>9.4f} {t_cvx:>12.3f} {t_lag:>13.3f} {t_cvx / t_dual:>8.0f}x | "
                  f"{abs(orc.value - s.dual_value):>10.1e} {abs(lag.value - s.dual_value):>10.1e} "
                  f"{lam_err:>11.1e} {lam0_err:>9.1e} {s.certificate}")


if __name__ == "__main__":
    main()
