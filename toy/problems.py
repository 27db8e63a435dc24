"""The toy instances and the bridge to ``theory``: the default 2-D three-component mixture with one
mode to unlearn, its default budgets, the dual solution lam* and the budget checks, and ``Problem``
(everything of one run that its problem, budgets and variant fix: lam*, quadratures, dual domain).

``theory.gmm`` owns the instance and the dual solution (``default_instance``, ``solve``); the
rules every tier shares for budgets are ``theory.validation.check_budgets``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

import theory.gmm as gmm
from theory.gmm import GaussianMixture
from theory.validation import check_budgets as check_shared_budget_rules
from toy.core.dual import dual_domain
from toy.reference import Quadrature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instance:
    """q (pretraining law), forget (list of q_i), default budgets per problem, and provenance."""

    q: GaussianMixture
    forget: tuple
    budgets: dict
    source: str


def default_instance() -> Instance:
    """The default instance, ``theory.gmm.default_instance()``: q, forget and the budgets per problem."""
    q, forget, budgets = gmm.default_instance()
    budgets = {p: np.atleast_1d(np.asarray(b, dtype=np.float64)) for p, b in budgets.items()}
    return Instance(q, tuple(forget), budgets, "theory.gmm.default_instance")


def lam_star(problem: str, q: GaussianMixture, forget: Sequence[GaussianMixture], budgets: npt.ArrayLike, variant: str = "likelihood") -> tuple[np.ndarray, str]:
    """lam* from ``theory.gmm.solve``. Returns (lam*, source)."""
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    sol = gmm.solve(problem, q, list(forget), budgets, variant=variant)
    return np.atleast_1d(np.asarray(sol.lam, dtype=np.float64)), "theory.gmm.solve"


def check_budgets(problem: str, q: GaussianMixture, forget: Sequence[GaussianMixture], budgets: npt.ArrayLike,
                  variant: str = "likelihood") -> None:
    """Refuse budgets that break the rules every tier shares (``theory.validation.check_budgets``:
    shape, finite, KL budgets >= 0, LU budgets > 0 where g_i >= 0) or lie outside the achievable
    range along the dual path, naming the range."""
    budgets = check_shared_budget_rules(problem, budgets, len(forget),
                                        variant=variant if problem == "likelihood" else None)
    for i, (f, b) in enumerate(zip(forget, budgets)):
        quad = Quadrature(problem, q, [f], variant)
        v0, v1 = quad.achievable_range()
        lo, hi = min(v0, v1), max(v0, v1)
        beyond = b < lo if problem == "likelihood" else b > hi
        if beyond:
            raise ValueError(_refusal(problem, q, f, i, float(b), lo, hi, variant))


def _refusal(problem: str, q, f, i: int, b: float, lo: float, hi: float, variant: str) -> str:
    """Why a budget beyond the toy quadrature's range is refused: theory's own answer (its solver
    works on an adaptive grid to the end of the dual domain) decides between "beyond the achievable
    range" (theory reaches the domain edge with the constraint unmet, and says where) and "theory
    solves it, but the toy's fixed 2-D grid cannot represent that target"."""
    toy_range = f"the toy's quadrature grid represents [{lo:.6g}, {hi:.6g}]"
    try:
        sol = gmm.solve(problem, q, [f], np.array([b]), variant=variant)
    except ValueError as exc:
        return f"budget {b:.6g} for forget distribution {i} of {problem}: theory.gmm.solve refuses it: {exc}"
    boundary = sol.info.get("boundary")
    if boundary:
        return (f"budget {b:.6g} for forget distribution {i} is beyond the achievable range of {problem} "
                f"(theory.gmm.solve: {boundary})")
    return (f"budget {b:.6g} for forget distribution {i} of {problem} is achievable (theory.gmm.solve: lam* = "
            f"{float(np.asarray(sol.lam)[0]):.6g}, certificate {sol.certificate}), but the toy cannot "
            f"represent its target: {toy_range} (the tilted target's mass leaves the grid)")


@dataclass(frozen=True)
class Problem:
    """The instance side of one run, fixed by its problem, budgets and variant: q and the forget
    laws, the budgets (m,), theory's lam* and its source, one ``Quadrature`` per forget law, the
    slopes ``d constraint / d lam`` of the x_0 target at lam* (behind the dual step size), the dual
    domain (``upper``, ``sum_max``), the FU domain's ends ``fu_upper`` (whatever the problem: SISS's
    default weight is half of it) and, once the run has it, the exact-score surrogate's fixed point
    ``lam_surrogate`` (``dataclasses.replace``)."""

    name: str
    q: GaussianMixture
    forget: tuple
    budgets: np.ndarray
    variant: str
    lam_star: np.ndarray
    lam_star_source: str
    quads: tuple
    slopes: np.ndarray
    upper: tuple | None
    sum_max: float | None
    fu_upper: tuple
    lam_surrogate: np.ndarray | None = None


def build_problem(problem: str, budgets: npt.ArrayLike, variant: str = "likelihood") -> Problem:
    """``Problem`` of the default instance at ``budgets`` (one per forget distribution), refused
    here when theory says they cannot be met (``check_budgets``)."""
    inst = default_instance()
    q, forget = inst.q, list(inst.forget)
    budgets = np.asarray(budgets, dtype=np.float64)
    if budgets.shape[0] != len(forget):
        raise ValueError(f"{len(forget)} forget distribution(s) but {budgets.shape[0]} budget(s) {budgets.tolist()}")
    check_budgets(problem, q, forget, budgets, variant)
    lam_th, source = lam_star(problem, q, forget, budgets, variant)
    quads = tuple(Quadrature(problem, q, [f], variant) for f in forget)
    fu_quads = quads if problem == "forward_kl" else [Quadrature("forward_kl", q, [f], variant) for f in forget]
    fu_upper = tuple(qd.lam_max() for qd in fu_quads)
    domain = dual_domain(problem, len(budgets), upper=list(fu_upper) if problem == "forward_kl" else None)
    slopes = np.array([dual_slope(qd, lam_i) for qd, lam_i in zip(quads, lam_th)])
    return Problem(problem, q, tuple(forget), budgets, variant, lam_th, source, quads, slopes, domain.upper,
                   domain.sum_max, fu_upper)


def dual_slope(quad: Quadrature, lam: float) -> float:
    """d constraint / d lam of the x_0 target at lam (central difference, one-sided at 0)."""
    h = 1e-4 * max(1.0, lam) if quad.problem != "reverse_kl" else 1e-4
    lo = max(lam - h, 0.0)
    hi = lam + h
    if quad.problem == "forward_kl":
        hi = min(hi, quad.lam_max())
    return float((quad.constraint_values([hi])[0] - quad.constraint_values([lo])[0]) / (hi - lo))
