"""The figure of one toy run: learned samples over the target density, the multiplier's path with
its tolerance band and averaging window, and the constraint against its budget."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from theory.gmm import GaussianMixture
from toy.config import ToyConfig
from toy.reference import Quadrature

log = logging.getLogger(__name__)


def draw_figure(path: Path, cfg: ToyConfig, q: GaussianMixture, quads: Sequence[Quadrature], summary: dict, hist: dict) -> Path:
    """Learned samples over the target density (view clipped to the target's support, the samples
    outside it counted), and the lam trajectory over the whole run against lam*, with the derived
    tolerance band and, for LU, the averaging window. Drawn on a ``matplotlib.figure.Figure``: no
    backend is forced on the caller."""
    from matplotlib.figure import Figure

    quad = quads[0]
    x = np.load(Path(cfg.out) / "samples.npy")
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    g = quad.grid
    lam_t = summary.get("target_lam", summary["lam_star"])
    dens = np.exp(quad.log_target(lam_t)).reshape(len(g.ys), len(g.xs))
    qd = np.exp(quad.log_q).reshape(len(g.ys), len(g.xs))
    ax.contour(g.xs, g.ys, qd, levels=6, colors="0.6", linewidths=0.8)
    cs = ax.contour(g.xs, g.ys, dens, levels=8, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=f"x_0 target density at lam = {float(np.asarray(lam_t).reshape(-1)[0]):.4g}")
    # the view: where the target has mass (density above 1e-4 of its peak), plus a margin
    ys_m, xs_m = np.nonzero(dens > 1e-4 * dens.max())
    x_lo, x_hi = g.xs[xs_m.min()] - 0.5, g.xs[xs_m.max()] + 0.5
    y_lo, y_hi = g.ys[ys_m.min()] - 0.5, g.ys[ys_m.max()] + 0.5
    inside = (x[:, 0] >= x_lo) & (x[:, 0] <= x_hi) & (x[:, 1] >= y_lo) & (x[:, 1] <= y_hi)
    ax.scatter(x[inside, 0], x[inside, 1], s=2, c="tab:red", alpha=0.4,
               label=f"learned samples ({int((~inside).sum())} of {len(x)} outside this view)")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
    ax.set_title(f"{cfg.problem} {cfg.algorithm}: learned (red) vs target (contours), q (grey)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    if hist["lam"]:
        lam_hist = np.asarray(hist["lam"])
        every = cfg.train.steps / len(lam_hist)  # dual steps are evenly spaced over the run
        steps = np.arange(len(lam_hist)) * every
    else:  # fixed multipliers: the whole run at one value
        lam_hist = np.tile(np.asarray(summary["lam"]), (2, 1))
        every, steps = cfg.train.steps / 2, np.array([0, cfg.train.steps])
    for i in range(lam_hist.shape[1]):
        ax.plot(steps, lam_hist[:, i], label=f"lam_{i} learned" if hist["lam"] else f"lam_{i} (fixed)")
        ax.axhline(np.asarray(summary["lam_star"])[i], color="k", ls="--", label="lam* (theory, x_0)")
        if summary.get("lam_surrogate") is not None:
            ax.axhline(np.asarray(summary["lam_surrogate"])[i], color="tab:orange", ls=":", label="exact-score surrogate")
        if summary.get("lam_tolerance_interval") is not None and i == 0:
            lo_t, hi_t = summary["lam_tolerance_interval"]
            top = min(hi_t, 2 * max(np.max(lam_hist), lo_t))
            ax.axhspan(lo_t, top, color="tab:green", alpha=0.12, label="derived tolerance band")
        win = summary.get("lam_window")
        if win is not None and i == 0:
            a0 = win["start"] * every
            ax.axvspan(a0, cfg.train.steps, color="0.5", alpha=0.15,
                       label=f"window: last {win['length']} dual steps (after 3 tau = {3 * win['tau']:.0f})")
            ax.hlines(np.asarray(win["mean"])[i], a0, cfg.train.steps, color="k", lw=2,
                      label=f"window mean {np.asarray(win['mean'])[i]:.4g}")
    ax.set_xlim(0, cfg.train.steps)
    ax.set_xlabel("step")
    ax.set_ylabel("lam")
    ax.legend(fontsize=8)
    ax.set_title("multiplier trajectory", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
