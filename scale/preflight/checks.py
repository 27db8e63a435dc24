"""The pre-flight's checks of its short run: multipliers moving as their violations say, and a
run stopped after one step and resumed reproducing the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from theory.report import Check

if TYPE_CHECKING:
    from scale.concept import ConceptConfig
    from scale.data import DataConfig

#: deterministic (exact equality); CUDA kernels may reorder float sums
RESUME_RTOL = {"cpu": 0.0, "cuda": 1e-3}


def run_method(kind: str, cfg: ConceptConfig | DataConfig, **kw: Any) -> dict:
    """Run the unlearning method of ``kind`` (``scale.concept.run`` or ``scale.data.run``); its summary."""
    from scale import concept, data

    return (concept if kind == "concept" else data).run(cfg, **kw)


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def direction_check(rows: list[dict], lam0: npt.ArrayLike, lr_dual: float, upper: npt.ArrayLike | None = None, sum_max: float | None = None) -> Check:
    """Every dual step moves each multiplier in the direction of its violation (``violation > 0``:
    up), except where the projection holds it on the boundary of the dual domain; with ``lr_dual = 0``
    the multipliers stay fixed."""
    prev = np.asarray(lam0, dtype=float).reshape(-1)
    bad = []
    for r in rows:
        lam, v = np.asarray(r["lam"], dtype=float), np.asarray(r["violation"], dtype=float)
        d = lam - prev
        for i in range(lam.size):
            if lr_dual == 0:
                ok = d[i] == 0
            elif v[i] > 0:  # up, unless held by the box's top or the sum bound
                held = (upper is not None and lam[i] >= upper[i] - 1e-12) or \
                       (sum_max is not None and lam.sum() >= sum_max - 1e-9)
                ok = d[i] > 0 or held
            elif v[i] < 0:  # down, unless held at zero
                ok = d[i] < 0 or lam[i] == 0
            else:
                ok = True
            if not ok:
                bad.append(f"step {r['step']} lam[{i}] {prev[i]:.4g}->{lam[i]:.4g} at violation {v[i]:.4g}")
        prev = lam
    steps = len(rows)
    return Check("multipliers move as the violation says", f"{steps} dual steps" + (f"; {bad[0]}" if bad else ""),
                 "fixed" if lr_dual == 0 else "up when violated, down when slack (or on the boundary)", not bad)


def initial_multipliers(kind: str, cfg: ConceptConfig | DataConfig, m: int, n: int) -> tuple[np.ndarray, float, np.ndarray | None, float | None]:
    if kind == "concept":
        from scale.concept import initial_dual

        d = initial_dual(cfg)
        return d.lam.numpy(), d.lr_dual, None, d.sum_max
    if cfg.method == "forward_kl":
        from toy.core.dual import dual_domain

        return np.zeros(m), cfg.lr_dual / n, np.asarray(dual_domain("forward_kl", m, n_train=n).upper), None
    return np.full(m, cfg.siss_weight / n), 0.0, None, None


def resume_check(kind: str, pcfg: ConceptConfig | DataConfig, out: Path, reference_rows: list[dict], device: str) -> Check:
    """A run stopped after one step and resumed for two more reproduces the uninterrupted run's
    first three rows (loss, multipliers, constraint estimates)."""
    k = min(3, len(reference_rows))
    rcfg = replace(pcfg, out=str(out), train=replace(pcfg.train, steps=k, checkpoint_every=1))
    shutil.rmtree(out, ignore_errors=True)
    from scale import figures

    with figures.disabled():
        run_method(kind, rcfg, stop_after=1)
    # mark the first row: a run that resumes at step 1 keeps it, one that starts over rewrites it
    first = metrics_rows(out)[:1]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r | {"before_resume": True}) + "\n" for r in first))
    with figures.disabled():
        run_method(kind, rcfg, resume=True)
    got = metrics_rows(out)
    if not got or not got[0].get("before_resume"):
        return Check("checkpoint + resume reproduces the run", "the second run started over at step 0",
                     "it resumes at step 1", False)
    rtol = RESUME_RTOL["cuda" if device == "cuda" else "cpu"]
    worst = 0.0
    for a, b in zip(reference_rows[:k], got[:k]):
        for key in ("loss", "lam", "measured"):
            if a.get(key) is None and b.get(key) is None:
                continue
            x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30))))
    ok = len(got) == k and worst <= rtol
    return Check("checkpoint + resume reproduces the run", f"{len(got)} rows, max rel. diff {worst:.2g}",
                 f"{k} rows, rel. diff <= {rtol:g}", ok)
