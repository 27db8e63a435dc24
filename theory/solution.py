"""The result of solving one constrained unlearning problem (``docs/math.md`` §2-3).

A ``Solution`` carries both sides of the duality so that a gap is *measured*: ``primal_value`` is
an independently certified primal optimum P* (or the best certified bound), ``dual_value`` is
D(lam*), and ``gap = primal_value - dual_value >= 0`` by weak duality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: How the primal value was certified.
CERTIFICATES = (
    "kkt",  # the target at lam* is feasible with complementary slackness: zero gap, P* = D*
    "global",  # a global solver that does not use the dual (enumeration / branch and bound)
    "cvxpy",  # a convex program solved by cvxpy (LU, or FU with single-atom forget sets)
    "none",  # nothing certifies the primal; primal_value is the value of p, an upper bound only
)


@dataclass(frozen=True)
class Solution:
    """Primal and dual optimum of one instance.

    Attributes:
        problem: one of ``theory.PROBLEMS``.
        p: the (certified) primal optimum; an ``np.ndarray`` on finite spaces, a distribution
           object (e.g. a tilted mixture) on continuous ones.
        lam: (m,) dual optimum lam*.
        primal_value: P*, certified as ``certificate`` says.
        dual_value: D(lam*).
        gap: ``primal_value - dual_value`` (>= 0 up to solver tolerance).
        budgets: (m,) thresholds b (or eps for LU) as given.
        constraint_values: (m,) constraint functionals at ``p`` (KL(p||q_i), KL(q_i||p) or E_p[g_i]).
        certificate: one of ``CERTIFICATES``.
        p_dual: the Lagrangian minimiser at lam* (equals ``p`` when the gap is zero).
        kkt: named KKT residuals at (p_dual, lam*): feasibility, complementary slackness,
             stationarity of the dual.
        info: solver details (iterations, timings, branch used).
    """

    problem: str
    p: Any
    lam: np.ndarray
    primal_value: float
    dual_value: float
    gap: float
    budgets: np.ndarray
    constraint_values: np.ndarray
    certificate: str
    p_dual: Any = None
    kkt: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def strong_duality(self) -> bool:
        """True when the measured gap is zero to 1e-7 relative to the objective scale."""
        return self.certificate != "none" and abs(self.gap) <= 1e-7 * max(1.0, abs(self.primal_value))
