"""Throughput of exact mixture scores / noise predictions and time of the dual solves.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_gmm.py`` (one CPU core). Targets: >= 1e6 score
evaluations per second at K = 8, d = 2; each 2-D dual solve under 1 s. Prints a Markdown table.
"""

from __future__ import annotations

import time

import numpy as np

from theory.gmm import GaussianMixture, default_instance, solve


def _random_mixture(K, d, rng):
    A = rng.normal(size=(K, d, d)) * 0.3
    return GaussianMixture(np.full(K, 1.0 / K), rng.normal(size=(K, d)) * 3, A @ np.swapaxes(A, 1, 2) + 0.2 * np.eye(d))


def _best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def throughput_rows(batch=100_000, repeats=5, rng=None):
    rng = rng or np.random.default_rng(0)
    rows = []
    for d in (2, 64):
        g = _random_mixture(8, d, rng)
        x = rng.normal(size=(batch, d))
        ab_vec = rng.uniform(0.01, 1.0, size=batch)
        for name, fn in (("score (ab = 0.5)", lambda: g.score(x, 0.5)),
                         ("eps (ab = 0.5)", lambda: g.eps(x, 0.5)),
                         ("eps (per-sample ab)", lambda: g.eps(x, ab_vec)),
                         ("log_prob (ab = 1)", lambda: g.log_prob(x))):
            t = _best_of(fn, repeats if d == 2 else 2)
            rows.append((f"K=8, d={d}, batch={batch:.0e}", name, f"{t * 1e3:.1f} ms", f"{batch / t:.3g} /s"))
    return rows


def solve_rows(repeats=3):
    q, forget, budgets = default_instance()
    # m = 4: q with five modes, four of them forgotten
    q4 = GaussianMixture([0.2] * 5, [[0, 0], [3, 0], [-3, 0], [0, 3], [0, -3]], [0.5 * np.eye(2)] * 5)
    f4 = [GaussianMixture([1.0], q4.means[k:k + 1], q4.covs[k:k + 1]) for k in range(1, 5)]
    b4 = {"reverse_kl": [20.0, 22.0, 24.0, 26.0], "forward_kl": [2.2, 2.4, 2.6, 2.8],
          "likelihood": [0.004, 0.006, 0.008, 0.01]}
    rows = []
    for problem in ("reverse_kl", "forward_kl", "likelihood"):
        for m, (qq, ff, bb) in ((1, (q, forget, budgets[problem])), (4, (q4, f4, b4[problem]))):
            sol = None

            def run():
                nonlocal sol
                sol = solve(problem, qq, ff, bb)
            t = _best_of(run, repeats)
            rows.append((f"solve {problem}, m={m}", f"lam*={np.round(sol.lam, 4).tolist()}",
                         f"{t:.3f} s", f"gap {sol.gap:.1e}, {sol.certificate}"))
    return rows


def main():
    rows = [("case", "what", "time", "rate / result")] + throughput_rows() + solve_rows()
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for k, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(wi) for c, wi in zip(r, w)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (wi + 2) for wi in w) + "|")


if __name__ == "__main__":
    main()
