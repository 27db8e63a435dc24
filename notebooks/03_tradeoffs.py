# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Retention–unlearning trade-offs: P*(b) and lam*(b) along each problem's dual path
#
# On `default_instance()` (2-D, three modes, the third forgotten). Every multiplier lam on the
# dual path certifies the budget `b(lam)` = constraint value of its target, with `lam*(b) = lam`
# and `P*(b)` = the objective at the target (zero duality gap, docs/math.md §3; checked below by
# `solve` at a few budgets). Fixed-multiplier methods sit at one point each:
#
# - **ESD** with guidance eta is RU at `lam = eta / (1 + eta)` (eq. 8): eta = 1 -> lam = 1/2,
#   eta = 2 -> lam = 2/3.
# - **SISS** (data unlearning) uses the fixed weight `lam = n_forget / n`: with the forget mode
#   being a fraction `w_3 = 0.30` of the data, `lam = 0.30`, exactly retraining without the mode
#   (the FU domain's edge here).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from theory.gmm import default_instance, esd_lam, solve, sweep

QUICK = os.environ.get("DUALUNLEARN_QUICK") == "1"
# figures are shown inline in Jupyter and saved to runs/figures at the repository root (gitignored)
FIGDIR = os.environ.get("DUALUNLEARN_FIGDIR") or os.path.join(".." if os.path.basename(os.getcwd()) == "notebooks" else ".", "runs", "figures")
os.makedirs(FIGDIR, exist_ok=True)
q, forget, budgets = default_instance()
n = 6 if QUICK else 40
paths = {
    "reverse_kl": np.linspace(0.0, 0.75, n),
    "forward_kl": np.linspace(0.0, q.weights[2], n),
    "likelihood": np.concatenate([[0.0], np.geomspace(0.5, 300.0, n - 1)]),
}
curves = {k: (lams,) + sweep(k, q, forget, lams) for k, lams in paths.items()}
marks = {
    "reverse_kl": [("ESD eta=1", esd_lam(1.0)), ("ESD eta=2", esd_lam(2.0))],
    "forward_kl": [("SISS lam = w_forget", float(q.weights[2]))],
    "likelihood": [],
}
mark_vals = {k: [(lab, lam) + tuple(v[0] for v in sweep(k, q, forget, [lam])) for lab, lam in m] for k, m in marks.items()}
for k, m in mark_vals.items():
    for lab, lam, b, P in m:
        print(f"{k:11s} {lab:22s} lam={lam:.4f}  certifies b={b:.4g}  at cost P*={P:.4g}")

# %% [markdown]
# A check that the curves are the optimal values: `solve` at budgets read off the curves returns
# the same lam and value, with a KKT certificate.

# %%
for k, (lams, b, P) in curves.items():
    for j in ([2, 4] if QUICK else [5, 15, 30]):
        sol = solve(k, q, forget, [b[j]])
        print(f"{k:11s} b={b[j]:9.4g}: lam*={sol.lam[0]:.6g} (path {lams[j]:.6g}), P*={sol.primal_value:.6g} "
              f"(path {P[j]:.6g}), gap={sol.gap:.1e}, {sol.certificate}")
        assert abs(sol.lam[0] - lams[j]) <= 1e-6 * max(1, lams[j]) and sol.certificate == "kkt"

# %%
fig, axes = plt.subplots(2, 3, figsize=(14, 7))
labels = {"reverse_kl": "b: KL(p||q_forget) >=", "forward_kl": "b: KL(q_forget||p) >=",
          "likelihood": "eps: E_p[q_forget] <="}
for col, (k, (lams, b, P)) in enumerate(curves.items()):
    axes[0, col].plot(b, P, "-o", ms=3)
    axes[1, col].plot(b, lams, "-o", ms=3)
    for lab, lam, bm, Pm in mark_vals[k]:
        axes[0, col].plot(bm, Pm, "r*", ms=12)
        axes[0, col].annotate(lab, (bm, Pm), fontsize=8)
        axes[1, col].plot(bm, lam, "r*", ms=12)
    axes[0, col].set_title(k)
    axes[0, col].set_ylabel("P*(b) (" + ("KL(q||p)" if k == "forward_kl" else "KL(p||q)") + ")")
    axes[1, col].set_ylabel("lam*(b)")
    axes[0, col].set_xlabel(labels[k])
    axes[1, col].set_xlabel(labels[k])
    if k == "likelihood":
        for a in axes[:, col]:
            a.set_xscale("log")
fig.tight_layout()
fig.savefig(os.path.join(FIGDIR, "03_tradeoffs.png"), dpi=80)

# %% [markdown]
# Reading the figure: P*(b) is increasing and convex-looking in the budget for RU and FU and
# decreasing in eps for LU (a tighter unlearning constraint costs more retention), and lam*(b) is
# its slope (sensitivity). ESD at eta = 1 and 2 sits far out on the RU front: it pays KL(p||q) of
# several nats for unlearning budgets much larger than the default b = 12. SISS's weight is the
# end of the FU front (lam = w_3): it removes the mode completely, the largest FU budget a signed
# mixture reaches.
