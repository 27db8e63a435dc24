"""The finite-space section of ``dualunlearn verify`` (``docs/math.md`` §2-3, ``docs/theory-discrete.md``).

Built-in instances; every primal value is certified independently of the dual (KKT where it
certifies, the global enumeration solver, or cvxpy), so each gap below is measured:

* strong duality certificates for RU (tilt branch), FU and LU;
* a strictly positive RU gap on an atomic instance, predicted by the condition b_M < b < b_max;
* the gap closing when atoms are refined into K cells (exactly zero once K >= exp(b - b_M));
* cvxpy agreement for the targets at fixed multipliers and for LU's primal and multipliers.

Figures: ``discrete_ru_gap.png`` (P*(b), D*(b)) and ``discrete_ru_refinement.png`` (gap vs K).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from theory import discrete
from theory.discrete import global_primal as discrete_global
from theory.report import Check, Section

log = logging.getLogger(__name__)

#: The atomic RU instance with a gap used throughout (n = 3, m = 1): M = argmax q/q_1 = {1} while
#: argmin q_1 = {0}, so budgets in (-log q_1(1), -log q_1(0)) = (2.53, 3.91) have lam* > 1.
RU_GAP_Q = np.array([0.05, 0.5, 0.45])
RU_GAP_FORGET = np.array([[0.02, 0.08, 0.9]])


def ru_value_curves(q: ArrayLike, forget: ArrayLike,
                    budgets: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P*(b) (global solver, no dual), D*(b) and lam*(b) for m = 1 RU over a grid of budgets."""
    P, D, lam = [], [], []
    for b in budgets:
        lam_b, D_b = discrete.optimal_multipliers("reverse_kl", q, forget, [b])
        P.append(discrete_global.reverse_kl_global(q, forget, [b]).value)
        D.append(D_b)
        lam.append(float(lam_b[0]))
    return np.array(P), np.array(D), np.array(lam)


def ru_refinement_gaps(q: ArrayLike, forget: ArrayLike, b: float,
                       cells: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """(P*(K), D*(K)) with every atom split into K equal cells, for K in ``cells``."""
    P, D = [], []
    for K in cells:
        qr, fr = discrete.refine(q, forget, K)
        D.append(discrete.optimal_multipliers("reverse_kl", qr, fr, [b])[1])
        P.append(discrete_global.reverse_kl_global(q, forget, [b], cells=K).value)
    return np.array(P), np.array(D)


def plot_ru_gap(ax: Any, budgets: ArrayLike, P: ArrayLike, D: ArrayLike, b_M: float, b_max: float) -> None:
    """P*(b) and D*(b) against the budget on a matplotlib axis, the gap region (b_M, b_max) shaded."""
    ax.plot(budgets, P, "-", color="C0", label="P*(b) (global primal)")
    ax.plot(budgets, D, "--", color="C3", label="D*(b) (dual)")
    ax.axvspan(b_M, b_max, color="0.9", label="lam* > 1: gap region")
    ax.set_xlabel("budget b = required KL(p||q_1)")
    ax.set_ylabel("KL(p||q)")
    ax.legend(loc="upper left", fontsize=8)


def plot_refinement(ax: Any, cells: ArrayLike, P: ArrayLike, D: ArrayLike, K_star: float) -> None:
    """The gap P* - D* against the number of cells K on a matplotlib axis, K* = exp(b - b_M) marked."""
    ax.plot(cells, P - D, "o-", label="gap P* - D*")
    ax.axvline(K_star, color="0.5", ls=":", label="K* = ceil(exp(b - b_M))")
    ax.set_xlabel("cells per atom K")
    ax.set_ylabel("duality gap")
    ax.legend(fontsize=8)


def _check(name, measured, expected, ok) -> Check:
    return Check(name, measured, expected, bool(ok))


def verify_section(out_dir: Path, quick: bool, seed: int) -> Section:
    """Run the finite-space checks on built-in instances; draw two figures into ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    checks = []
    tol = 1e-8

    # 1. strong duality certificates, one per problem (random instances, n = 6, m = 2)
    n = 6
    q = rng.dirichlet(np.ones(n))
    forget = rng.dirichlet(np.ones(n), size=2)
    p0 = 0.5 * rng.dirichlet(np.ones(n)) + 0.5 * np.eye(n)[int(np.argmin(forget[0]))]
    kq = np.array([discrete.kl(q, f) for f in forget])
    k0 = np.array([discrete.kl(p0, f) for f in forget])
    ru_b = np.where(k0 > kq, kq + 0.3 * (k0 - kq), kq - 0.1)
    s = discrete.solve("reverse_kl", q, forget[:1], kq[:1] + 0.3 * (k0[:1] - kq[:1]))
    checks.append(_check("RU (m=1, tilt branch): KKT certificate", f"{s.certificate}, gap {s.gap:.1e}",
                         f"kkt, |gap| <= {tol:g}", s.certificate == "kkt" and abs(s.gap) <= tol))
    s2 = discrete.solve("reverse_kl", q, forget, ru_b)
    g2 = discrete_global.reverse_kl_global(q, forget, ru_b)
    checks.append(_check("RU (m=2): weak duality vs global primal", f"P* - D* = {g2.value - s2.dual_value:.3e}",
                         ">= 0 (and = 0 if KKT certifies)",
                         g2.value - s2.dual_value >= -tol and (s2.certificate != "kkt" or abs(s2.gap) <= tol)))
    fu_b = np.array([discrete.kl(forget[0], q) + 0.5])
    s = discrete.solve("forward_kl", q, forget[:1], fu_b)
    gf = discrete_global.forward_kl_global(q, forget[:1], fu_b)
    checks.append(_check("FU (m=1): KKT = global primal", f"{s.certificate}, |P*_glob - D*| = "
                         f"{abs(gf.value - s.dual_value):.1e}", f"kkt, <= {tol:g}",
                         s.certificate == "kkt" and abs(gf.value - s.dual_value) <= tol))
    lam_fu = 0.5 * min(float(np.min(q / (np.ones(2) @ forget))), 0.5) * np.ones(2)
    p_fu = discrete.forward_kl_target(q, forget, lam_fu)  # both constraints active at p_fu
    fu_b2 = discrete.constraint_values("forward_kl", q, forget, p_fu)
    s = discrete.solve("forward_kl", q, forget, fu_b2)
    gf = discrete_global.forward_kl_global(q, forget, fu_b2)
    checks.append(_check("FU (m=2, both active): KKT = global primal", f"{s.certificate}, |P*_glob - D*| = "
                         f"{abs(gf.value - s.dual_value):.1e}", f"kkt, <= {tol:g}",
                         s.certificate == "kkt" and abs(gf.value - s.dual_value) <= tol))
    Eq, E0 = forget @ q, forget @ p0
    lu_b = np.where(Eq > E0, E0 + 0.5 * (Eq - E0), E0 + 0.1)
    s = discrete.solve("likelihood", q, forget, lu_b)
    from theory.discrete import oracles as discrete_oracles

    orc = discrete_oracles.likelihood_primal(q, forget, lu_b)
    checks.append(_check("LU (m=2): KKT, cvxpy primal", f"{s.certificate}, |P_cvx - D*| = "
                         f"{abs(orc.value - s.dual_value):.1e}", "kkt, <= 1e-6",
                         s.certificate == "kkt" and abs(orc.value - s.dual_value) <= 1e-6))
    checks.append(_check("LU (m=2): cvxpy multipliers", f"max |lam_cvx - lam*| = {np.abs(orc.duals - s.lam).max():.1e}",
                         "<= 1e-4 max(1, lam*)", np.abs(orc.duals - s.lam).max() <= 1e-4 * max(1.0, s.lam.max())))

    # 2. cvxpy agreement of the closed-form targets at fixed multipliers
    lam = np.array([0.3, 0.2])
    worst = 0.0
    for problem in ("reverse_kl", "forward_kl", "likelihood"):
        b = np.array([0.5, 0.7])
        lam_p = lam * {"likelihood": 5.0, "reverse_kl": 1.0,
                       "forward_kl": 0.5 * float(np.min(q / (lam @ forget)))}[problem]  # inside w >= 0
        D = discrete.dual_function(problem, q, forget, lam_p, b)[0]
        worst = max(worst, abs(D - discrete_oracles.lagrangian_minimum(problem, q, forget, lam_p, b).value))
    checks.append(_check("targets: D(lam) vs cvxpy min_p L(p, lam)", f"max diff {worst:.1e}", "<= 1e-6",
                         worst <= 1e-6))

    # 3. a measured positive RU gap on the atomic instance, and where it is
    qg, fg = RU_GAP_Q, RU_GAP_FORGET
    b_M, b_max = discrete.ru_gap_interval(qg, fg)
    b_star = 3.0
    s = discrete.solve("reverse_kl", qg, fg, [b_star])
    checks.append(_check(f"RU atomic (n=3), b={b_star}: measured gap", f"{s.gap:.4f} ({s.certificate}), "
                         f"lam*={s.lam[0]:.3f}", f"> 0 since b in (b_M, b_max] = ({b_M:.3f}, {b_max:.3f}]",
                         s.certificate == "global" and s.gap > 1e-6 and s.lam[0] > 1))
    s_lo = discrete.solve("reverse_kl", qg, fg, [2.0])
    checks.append(_check("RU atomic, b=2.0 < b_M: zero gap", f"{s_lo.gap:.1e} ({s_lo.certificate})",
                         f"kkt, |gap| <= {tol:g}", s_lo.certificate == "kkt" and abs(s_lo.gap) <= tol))
    budgets = np.linspace(discrete.kl(qg, fg[0]) + 0.05, b_max, 12 if quick else 40)
    P, D, lam_b = ru_value_curves(qg, fg, budgets)
    inside = (budgets > b_M + 1e-6) & (budgets < b_max - 1e-6)
    ok = np.all(P - D >= -tol) and np.all(np.abs(P - D)[~inside] <= 1e-6) and np.all((P - D)[inside] > 0)
    checks.append(_check("RU atomic: gap > 0 exactly inside (b_M, b_max)",
                         f"max gap {np.max(P - D):.3f}, gaps outside <= {np.max(np.abs(P - D)[~inside]):.1e}",
                         "gap > 0 inside, 0 outside", ok))

    # 4. refinement closes the gap
    b_ref = 3.7
    K_star = int(np.ceil(np.exp(b_ref - b_M)))
    cells = list(range(1, K_star + (1 if quick else 3)))
    Pk, Dk = ru_refinement_gaps(qg, fg, b_ref, cells)
    gaps = Pk - Dk
    pred = np.array([b_ref > b_M + np.log(K) for K in cells])
    r_max = float(np.max(np.log(qg / fg[0])))
    ok = (np.all(gaps[pred] > 1e-6) and np.all(np.abs(gaps[~pred]) <= tol)
          and abs(Pk[-1] - (b_ref - r_max)) <= tol)
    checks.append(_check(f"RU refinement, b={b_ref}: gap(K)", ", ".join(f"{g:.3f}" for g in gaps),
                         f"> 0 for K < {K_star}, 0 from K* = {K_star}; P* -> b - log max q/q_1 = {b_ref - r_max:.4f}",
                         ok))

    # figures
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    plot_ru_gap(ax, budgets, P, D, b_M, b_max)
    ax.set_title("RU on 3 atoms: primal vs dual optimum")
    fig.tight_layout()
    fig.savefig(out_dir / "discrete_ru_gap.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    plot_refinement(ax, cells, Pk, Dk, K_star)
    ax.set_title(f"RU gap under refinement (b = {b_ref})")
    fig.tight_layout()
    fig.savefig(out_dir / "discrete_ru_refinement.png", dpi=110)
    plt.close(fig)

    text = ("Finite distributions (docs/math.md §3, eqs. 20-22): RU can have a strictly positive duality gap on atomic "
            "spaces (lam* > 1, Lagrangian minimisers are point masses); refinement into K cells closes it "
            "exactly once K >= exp(b - b_M). FU and LU have zero gap here (KKT certificates, checked "
            "against a global solver and cvxpy). See docs/theory-discrete.md.")
    return Section("theory: finite distributions (duality gaps)", tuple(checks),
                   ("discrete_ru_gap.png", "discrete_ru_refinement.png"), text, time.perf_counter() - t0)
