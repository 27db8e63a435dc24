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
# # Learned models on the theory Pareto front
#
# On `default_instance()` (2-D, three modes, the third forgotten), the theory front of
# `03_tradeoffs.py` — the optimal retention objective P*(b) against the budget b along each
# problem's dual path — with small eps-networks trained by the primal-dual algorithms of `toy`
# at several budgets, and the fixed-multiplier baselines (ESD at eta = 1, 2; SISS at the weight
# of the forget mode, 0.30) trained the same way.
#
# Each learned point is placed at (constraint estimate, objective estimate) with the estimators
# the algorithms use: RU/LU objective = path KL(P_theta || Q) along the model's own trajectories
# (an upper bound of KL(p||q) at x_0), FU objective = ELBO estimate of KL(q || p_theta); RU
# constraint = path KL to the forget law, FU = ELBO, LU = E_p[q_forget] at model samples.
# Error bars are 1 standard error. RU primal-dual is run with the reweighted target (exact at every
# t, so it lands on the x_0 front) and, in full mode, with ESD's composed-score target (a surrogate
# at t > 0; it reaches its own fixed point, off the front).
#
# `DUALUNLEARN_QUICK=1`: smaller networks, fewer steps, one budget per problem.

# %%
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from theory.gmm import default_instance, esd_lam, sweep
from toy.run import ToyConfig, pretrain_on_mixture, run

torch.set_num_threads(1)
QUICK = os.environ.get("DUALUNLEARN_QUICK") == "1"
FIGDIR = os.environ.get("DUALUNLEARN_FIGDIR", ".")
WORK = Path(tempfile.mkdtemp(prefix="toy05-"))
q, forget, budgets = default_instance()

if QUICK:
    base = ToyConfig(hidden=64, pretrain_steps=800, steps=500, dual_every=10, pool_every=2, dual_batch=64, n_eval=500,
                     n_constraint=1000, n_reference=500, figure=False, checkpoint_every=1000)
else:
    base = ToyConfig(figure=False)
pre = WORK / "pretrained.pt"
pretrain_on_mixture(q, base, "pretrain", pre)
base = replace(base, pretrained=str(pre))

# %% [markdown]
# The theory front (as in `03_tradeoffs.py`) and the budgets at which we train: the instance's
# default budget, and in full mode the budgets certified by two more multipliers on the path.

# %%
paths = {
    "reverse_kl": np.linspace(0.0, 0.75, 40),
    "forward_kl": np.linspace(0.0, q.weights[2], 40),
    "likelihood": np.concatenate([[0.0], np.geomspace(0.5, 300.0, 39)]),
}
front = {k: sweep(k, q, forget, lams) for k, lams in paths.items()}
train_lams = {"reverse_kl": [0.06, 0.25], "forward_kl": [0.12, 0.28], "likelihood": [5.0, 60.0]}
train_budgets = {k: [float(budgets[k][0])] + ([] if QUICK else [float(sweep(k, q, forget, [lam])[0][0]) for lam in train_lams[k]])
                 for k in paths}
print(train_budgets)

# %%
results = {k: [] for k in paths}
for k, bs in train_budgets.items():
    for j, b in enumerate(bs):
        targets = ["reweighted"] if (QUICK or k != "reverse_kl") else ["reweighted", "composed"]
        for tgt in targets if k != "forward_kl" else [""]:
            cfg = replace(base, problem=k, budgets=(b,), target=tgt, out=str(WORK / f"{k}-{j}-{tgt or 'signed'}"),
                          surrogate_reference=(tgt == "composed"))
            s = run(cfg)
            results[k].append(("primal-dual" + (f" ({tgt})" if tgt else ""), s))
            print(f"{k:11s} b={b:.4g} {tgt:10s} lam={s['lam'][0]:.4g} lam*={s['lam_star'][0]:.4g} "
                  f"ref={s['lam_reference'][0]:.4g} in tol {s.get('lam_within_tolerance')} "
                  f"constraint={s['constraint_values'][0]:.4g}+-{s['constraint_stderr'][0]:.2g} "
                  f"objective={s['objective_estimate']:.4g} (P*={s['target_objective_star']:.4g})")

baselines = {"reverse_kl": [("ESD eta=1", dict(algorithm="esd", eta=1.0))] + ([] if QUICK else [("ESD eta=2", dict(algorithm="esd", eta=2.0))]),
             "forward_kl": [("SISS lam=0.30", dict(algorithm="siss", siss_lam=0.30))], "likelihood": []}
base_results = {k: [] for k in paths}
for k, items in baselines.items():
    for lab, kw in items:
        s = run(replace(base, problem=k, out=str(WORK / f"{k}-{lab.replace(' ', '_')}"), surrogate_reference=False, **kw))
        base_results[k].append((lab, s))
        print(f"{k:11s} {lab:14s} lam={s['lam'][0]:.4g} constraint={s['constraint_values'][0]:.4g} "
              f"objective={s['objective_estimate']:.4g}")
print("ESD eta=1, 2 -> lam =", esd_lam(1.0), esd_lam(2.0))

# %%
fig, axes = plt.subplots(2, 3, figsize=(15, 8))
xlabels = {"reverse_kl": "KL(p||q_forget)", "forward_kl": "KL(q_forget||p)", "likelihood": "E_p[q_forget(x)]"}
ylabels = {"reverse_kl": "KL(p||q)", "forward_kl": "KL(q||p)", "likelihood": "KL(p||q)"}
for col, k in enumerate(paths):
    b_path, P_path = front[k]
    ax = axes[0, col]
    ax.plot(b_path, P_path, "-", color="0.3", label="theory front P*(b)")
    for lab, s in results[k]:
        mk = "o" if "composed" not in lab else "s"
        ax.errorbar(s["constraint_values"][0], s["objective_estimate"], xerr=s["constraint_stderr"][0],
                    yerr=s["objective_stderr"], fmt=mk, ms=6, label=lab if s is results[k][0][1] or "composed" in lab else None)
        ax.axvline(s["budgets"][0], color="tab:blue", lw=0.5, ls=":")
    for lab, s in base_results[k]:
        ax.errorbar(s["constraint_values"][0], s["objective_estimate"], xerr=s["constraint_stderr"][0],
                    yerr=s["objective_stderr"], fmt="r*", ms=12)
        ax.annotate(lab, (s["constraint_values"][0], s["objective_estimate"]), fontsize=8)
    if k == "likelihood":
        ax.set_xscale("log")
    ax.set_xlabel(xlabels[k] + " (budget b)")
    ax.set_ylabel(ylabels[k])
    ax.set_title(k, fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1, col]
    lams = paths[k]
    ax.plot(b_path, lams, "-", color="0.3", label="theory lam*(b)")
    for lab, s in results[k]:
        lo, hi = s.get("lam_tolerance_interval", [s["lam"][0]] * 2)
        ax.errorbar(s["budgets"][0], s["lam"][0], yerr=[[s["lam"][0] - lo], [min(hi, 10 * s["lam"][0] + 1) - s["lam"][0]]],
                    fmt="o" if "composed" not in lab else "s", ms=6)
    if k == "likelihood":
        ax.set_xscale("log")
        ax.set_yscale("symlog")
    ax.set_xlabel("budget b")
    ax.set_ylabel("learned lam (bars: derived tolerance)")
    ax.legend(fontsize=7)
fig.suptitle("toy: learned models vs the theory Pareto front (stars: fixed-multiplier baselines)")
fig.tight_layout()
out = Path(FIGDIR) / "05_toy_vs_theory.png"
fig.savefig(out, dpi=110)
print("figure:", out)

# %% [markdown]
# Reading the figure: primal-dual points with the reweighted (exact) target sit on the theory front
# at their budget, within the derived tolerance of lam*; ESD's composed-score target (squares, and
# the ESD stars) reaches a different multiplier for the same budget because its generated law is
# the surrogate, not the x_0 tilt; SISS's fixed weight sits at one end of the FU front.
