"""``dualunlearn verify`` section for the mixture theory: exact noised scores, targets,
certified dual solutions, the PF-ODE sampler, the surrogate gap and the retained-mode comparison,
each checked against an independent computation on the default instance. Default <= 60 s,
quick <= 10 s. Figures: ``gmm_targets.png`` (always), ``gmm_surrogate_gap.png`` (default mode).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from theory.report import Check, Section


def _check(name: str, measured: str, expected: str, ok: bool) -> Check:
    """A ``Check`` whose verdict is a plain ``bool`` (numpy comparisons give ``np.bool_``)."""
    return Check(name, measured, expected, bool(ok))


def _fmt(x, spec=".3g"):
    return format(float(x), spec)


def _targets_at_equal_mass(q, forget, mass, xtol):
    from theory.gmm.analysis import lam_for_forget_mass
    from theory.gmm.targets import target

    his = {"reverse_kl": 0.9, "forward_kl": 0.3, "likelihood": 500.0}
    out = {}
    for problem, hi in his.items():
        lam = lam_for_forget_mass(problem, q, forget, mass, 2, hi, xtol=xtol * hi)
        out[problem] = (lam, target(problem, q, forget, [lam]))
    return out


def _plot_targets(path: Path, q, targets, shifts, rng, res=160, n_samples=400):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.array([-5.0, -4.5]), np.array([5.0, 5.5])
    xs = np.linspace(lo[0], hi[0], res)
    ys = np.linspace(lo[1], hi[1], res)
    X = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharex=True, sharey=True)
    panels = [("q (pretrained)", q, None)] + [(f"{k}  lam={lam:.3g}", p, shifts[k]) for k, (lam, p) in targets.items()]
    for ax, (title, p, sh) in zip(axes, panels):
        dens = np.exp(p.log_prob(X)).reshape(res, res)
        ax.contourf(xs, ys, dens, levels=20, cmap="viridis")
        s = p.sample(n_samples, rng)
        ax.scatter(s[:, 0], s[:, 1], s=2, c="w", alpha=0.5)
        ax.scatter(q.means[:, 0], q.means[:, 1], marker="x", c="r")
        if sh is not None:
            title += f"\nretained shift {sh.shift.mean():.3f} (Mahal. {sh.shift_mahalanobis.mean():.3f})"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    fig.suptitle("Targets leaving the same mass (0.03) on the forget mode (x at q's means)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_gap(path: Path, gaps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [g.lam[0] for g in gaps]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].errorbar(lam, [g.kl for g in gaps], yerr=[2 * g.kl_se for g in gaps], marker="o")
    ax[0].set_xlabel("lam")
    ax[0].set_ylabel("KL(surrogate || exact tilt)")
    ax[1].semilogy(lam, [g.forget_mass_surrogate for g in gaps], "o-", label="surrogate (PF-ODE)")
    ax[1].semilogy(lam, [g.forget_mass_exact for g in gaps], "s-", label="exact tilt")
    ax[1].set_xlabel("lam")
    ax[1].set_ylabel("mass on forget mode")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def verify_section(out_dir: Path, quick: bool, seed: int) -> Section:
    from theory.gmm import (GaussianMixture, default_instance, forward_kl_target, gaussian_reverse_kl_solution,
                            likelihood_target, probability_flow_sample, retained_mode_shift, reverse_kl_target,
                            solve, surrogate_gap)

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    q, forget, budgets = default_instance()
    checks: list[Check] = []
    figures: list[str] = []

    # 1. exact noised score vs central differences of the noised log-density
    x = q.sample(20, rng)
    h, err = 1e-5, 0.0
    for ab in (1.0, 0.5, 0.01):
        fd = np.stack([(q.log_prob(x + h * e, ab) - q.log_prob(x - h * e, ab)) / (2 * h) for e in np.eye(2)], 1)
        err = max(err, float(np.abs(q.score(x, ab) - fd).max()))
    checks.append(_check("noised score = finite differences of noised log q", f"max err {_fmt(err)}", "< 1e-6",
                        err < 1e-6))

    # 2. FU target = signed linear combination of the noised laws, at every noise level
    lam = 0.2
    p = forward_kl_target(q, forget, [lam])
    err = 0.0
    for ab in (1.0, 0.3, 0.02):
        ref = (np.exp(q.log_prob(x, ab)) - lam * np.exp(forget[0].log_prob(x, ab))) / (1 - lam)
        err = max(err, float(np.abs(np.exp(p.log_prob(x, ab)) / ref - 1).max()))
    checks.append(_check("FU signed mixture = (q_t - lam q1_t)/(1 - lam) at every t", f"max rel err {_fmt(err)}",
                        "< 1e-10", err < 1e-10))

    # 3. certified dual solutions on the default instance
    for problem in ("reverse_kl", "forward_kl", "likelihood"):
        t1 = time.perf_counter()
        sol = solve(problem, q, forget, budgets[problem])
        dt = time.perf_counter() - t1
        checks.append(_check(f"solve {problem} (b={budgets[problem][0]:g}): strong duality by KKT",
                            f"lam*={sol.lam[0]:.5g} P*={sol.primal_value:.5g} gap={sol.gap:.1e} ({dt:.2f} s)",
                            "certificate kkt, |gap| < 1e-8", sol.certificate == "kkt" and abs(sol.gap) < 1e-8))

    # 3b. FU beyond the signed-mixture path: no attained optimum, an explicit feasible point
    sol = solve("forward_kl", q, forget, [budgets["forward_kl"][0] + 10.0])
    checks.append(_check("FU budget beyond the signed-mixture path: measured gap via explicit feasible p",
                        f"lam*={sol.lam[0]:.4g} (edge) P<={sol.primal_value:.6g} gap={sol.gap:.1e}",
                        "0 <= gap < 1e-8, constraint met",
                        -1e-9 <= sol.gap < 1e-8 and sol.constraint_values[0] >= sol.budgets[0] - 1e-8))

    # 4. closed form: RU with equal-covariance Gaussians
    mu, mu1, S = np.array([0.4, -0.3]), np.array([-0.6, 0.5]), np.array([[0.6, 0.2], [0.2, 0.9]])
    sol = solve("reverse_kl", GaussianMixture([1.0], [mu], [S]), [GaussianMixture([1.0], [mu1], [S])], [3.0])
    cf = gaussian_reverse_kl_solution(mu, S, mu1, 3.0)
    err = max(abs(sol.lam[0] - cf["lam"]), abs(sol.primal_value - cf["primal_value"]))
    checks.append(_check("RU equal-cov Gaussians: solve = closed form (sqrt(2b)-Delta)^2/2", f"err {_fmt(err)}",
                        "< 1e-8", err < 1e-8))

    # 5. quadrature normaliser vs Monte Carlo (LU Gibbs tilt at its default lam*)
    lam_lu = solve("likelihood", q, forget, budgets["likelihood"]).lam
    p = likelihood_target(q, forget, lam_lu)
    n = 50_000 if quick else 400_000
    w = np.exp(-lam_lu[0] * np.exp(forget[0].log_prob(q.sample(n, rng))))
    z_se = w.std() / np.sqrt(n)
    dz = abs(w.mean() - np.exp(p.log_normaliser))
    checks.append(_check("LU normaliser: quadrature vs Monte Carlo", f"|diff| {_fmt(dz)} ({_fmt(dz / z_se)} se)",
                        "< 5 se", dz < 5 * z_se))

    # 6. exact noised eps (Tweedie quadrature) reduces to the mixture's at lam = 0
    p0 = reverse_kl_target(q, forget, [0.0])
    xt = q.noised(0.3).sample(16 if quick else 64, rng)
    err = float(np.abs(p0.exact_eps(xt, 0.3) - q.eps(xt, 0.3)).max())
    checks.append(_check("exact tilt eps (quadrature) at lam=0 = mixture eps", f"max err {_fmt(err)}", "< 1e-7",
                        err < 1e-7))

    # 7. the PF-ODE sampler with exact eps reproduces log q
    ode_kw = dict(rtol=1e-6, atol=1e-6) if quick else {}
    n_ode = 150 if quick else 800
    o = probability_flow_sample(q, n_ode, rng, **ode_kw)
    d_lp = o.log_prob - q.log_prob(o.x)
    checks.append(_check("PF-ODE with exact eps: tracked log-density = log q", f"mean |diff| {_fmt(np.abs(d_lp).mean())}",
                        "< 1e-2" if quick else "< 1e-3", np.abs(d_lp).mean() < (1e-2 if quick else 1e-3)))

    # 8. surrogate vs exact tilt
    gap_lams = [0.3] if quick else [0.05, 0.15, 0.3, 0.5, 0.7]
    gaps = [surrogate_gap(reverse_kl_target(q, forget, [lam]), n_ode, rng, **ode_kw) for lam in gap_lams]
    txt = "; ".join(f"lam={g.lam[0]:.2f}: KL={g.kl:.3f}±{g.kl_se:.3f}, forget mass {g.forget_mass_surrogate:.3g} "
                    f"(exact {g.forget_mass_exact:.3g})" for g in gaps)
    ok = all(g.kl > -5 * g.kl_se for g in gaps)
    checks.append(_check("RU composed-score surrogate vs exact tilt (PF-ODE, exact log-densities)", txt,
                        "KL >= 0 within 5 se (measured, not a target)", ok))

    # 9. LU vs RU: retained modes at equal forget-mode mass
    targets = _targets_at_equal_mass(q, forget, 0.03, xtol=3e-3 if quick else 1e-12)
    shifts = {k: retained_mode_shift(p, q, 2) for k, (_, p) in targets.items()}
    txt = ", ".join(f"{k}: {s.shift.mean():.3f}" for k, s in shifts.items())
    checks.append(_check("retained-mode centroid shift at forget mass 0.03 (LU < RU?)", txt,
                        "LU shift < RU shift / 5", shifts["likelihood"].shift.mean() < shifts["reverse_kl"].shift.mean() / 5))

    _plot_targets(out_dir / "gmm_targets.png", q, targets, shifts, rng, *((80, 150) if quick else (160, 400)))
    figures.append("gmm_targets.png")
    if not quick:
        _plot_gap(out_dir / "gmm_surrogate_gap.png", gaps)
        figures.append("gmm_surrogate_gap.png")
    text = ("Gaussian-mixture theory on the default 2-D instance (three modes, the third forgotten): exact "
            "scores through the VP process, FU signed mixture, RU/LU tilts, dual solutions with KKT "
            "certificates, PF-ODE sampler with exact log-densities, composed-score surrogate gap.")
    return Section("theory: Gaussian mixtures", tuple(checks), tuple(figures), text, time.perf_counter() - t0)
