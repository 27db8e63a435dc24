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
# # Duality gaps on finite distributions (docs/math.md §3, eqs. 20-22)
#
# RU, `min KL(p||q) s.t. KL(p||q_1) >= b`, on three atoms: `q = (0.05, 0.5, 0.45)`,
# `q_1 = (0.02, 0.08, 0.9)`. The tilt path `p_lam ∝ q (q/q_1)^(lam/(1-lam))` concentrates on
# `M = argmax q/q_1 = {atom 1}` as `lam -> 1-`, reaching only `b_M = -log q_1(1) = 2.53`, while
# budgets up to `b_max = -log q_1(0) = 3.91` are feasible. There the dual optimum has `lam* > 1`,
# where the Lagrangian is concave in p and its minimisers are point masses, none of which meets
# complementary slackness: the gap `P* - D*` is strictly positive. `P*` comes from the global
# solver (`theory.discrete.global_primal`, KKT enumeration over the faces of the simplex, no dual).
#
# Then each atom is split into K equal cells (towards a non-atomic base measure): the Lam = 1 face
# of Lagrangian minimisers now reaches `b_M + log K`, and the gap is exactly zero once
# `K >= exp(b - b_M)`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from theory import discrete
from theory.discrete.verify import (RU_GAP_FORGET, RU_GAP_Q, plot_refinement, plot_ru_gap,
                                    ru_refinement_gaps, ru_value_curves)

QUICK = os.environ.get("DUALUNLEARN_QUICK") == "1"
# figures are shown inline in Jupyter and saved to runs/figures at the repository root (gitignored)
FIGDIR = os.environ.get("DUALUNLEARN_FIGDIR") or os.path.join(".." if os.path.basename(os.getcwd()) == "notebooks" else ".", "runs", "figures")
os.makedirs(FIGDIR, exist_ok=True)
q, forget = RU_GAP_Q, RU_GAP_FORGET

# %% [markdown]
# ## P*(b) and D*(b)

# %%
b_M, b_max = discrete.ru_gap_interval(q, forget)
budgets = np.linspace(discrete.kl(q, forget[0]) + 0.02, b_max, 15 if QUICK else 80)
P, D, lam = ru_value_curves(q, forget, budgets)
print(f"b_M = {b_M:.4f}, b_max = {b_max:.4f}; largest gap {np.max(P - D):.4f} at b = {budgets[np.argmax(P - D)]:.3f}")
for b, p_, d_, l_ in list(zip(budgets, P, D, lam))[:: max(1, len(budgets) // 8)]:
    print(f"b = {b:.3f}  P* = {p_:.4f}  D* = {d_:.4f}  gap = {p_ - d_:.2e}  lam* = {l_:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
plot_ru_gap(axes[0], budgets, P, D, b_M, b_max)
axes[0].set_title("RU on 3 atoms")
axes[1].plot(budgets, lam, color="C2")
axes[1].axhline(1.0, color="0.5", ls=":")
axes[1].set_xlabel("budget b")
axes[1].set_ylabel("lam*(b)")
axes[1].set_title("the dual optimum leaves the tilt branch at b_M")
fig.tight_layout()
fig.savefig(os.path.join(FIGDIR, "01_ru_gap.png"), dpi=110)

# %% [markdown]
# D*(b) is convex and piecewise linear in the gap region (a maximum of affine functions of b, one
# per breakpoint of the lower envelope of `-log q + lam log q_1`), and touches P*(b) only at the
# budgets `-log q_1(x)` of point masses on that envelope (here `b_max`).

# %% [markdown]
# ## Refinement closes the gap

# %%
b_ref = 3.7
K_star = int(np.ceil(np.exp(b_ref - b_M)))
cells = list(range(1, K_star + (1 if QUICK else 4)))
Pk, Dk = ru_refinement_gaps(q, forget, b_ref, cells)
for K, p_, d_ in zip(cells, Pk, Dk):
    print(f"K = {K}: P* = {p_:.4f}  D* = {d_:.4f}  gap = {p_ - d_:.2e}  (predicted > 0: {b_ref > b_M + np.log(K)})")
print(f"non-atomic limit b - log max q/q_1 = {b_ref - np.max(np.log(q / forget[0])):.4f}")

fig, ax = plt.subplots(figsize=(5.5, 3.8))
plot_refinement(ax, cells, Pk, Dk, K_star)
ax.set_title(f"RU gap under refinement (b = {b_ref})")
fig.tight_layout()
fig.savefig(os.path.join(FIGDIR, "01_ru_refinement.png"), dpi=110)
