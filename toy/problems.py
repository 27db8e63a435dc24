"""The toy instances and the bridge to ``theory``: the default 2-D three-component mixture with one
mode to unlearn, its default budgets, the dual solution lam* and target samplers.

``theory.gmm`` owns the instance and the dual solution (``default_instance``, ``solve``); while a
piece is missing there this module falls back to ``toy.reference`` (2-D quadrature), and says so
in the returned ``source`` so a summary never passes one for the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from theory import PROBLEMS
from theory.gmm import GaussianMixture
from toy.reference import Quadrature

log = logging.getLogger(__name__)

#: Multipliers at which the fallback default budgets are the target's constraint value: RU eta = 1/2,
#: FU half the dual domain, LU the value halfway between E_q[g] and 0 is reached near lam = 2.
FALLBACK_LAM = {"reverse_kl": 1.0 / 3.0, "forward_kl": None, "likelihood": 2.0}


@dataclass(frozen=True)
class Instance:
    """q (pretraining law), forget (list of q_i), default budgets per problem, and provenance."""

    q: GaussianMixture
    forget: tuple
    budgets: dict
    source: str


def _fallback_mixture() -> tuple[GaussianMixture, list[GaussianMixture]]:
    cov = 0.25 * np.eye(2)
    q = GaussianMixture([1 / 3, 1 / 3, 1 / 3], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [cov, cov, cov])
    return q, [GaussianMixture([1.0], [[0.0, 2.5]], [cov])]


def _theory_gmm():
    import theory.gmm as gmm
    return gmm


def default_instance() -> Instance:
    """The default instance: ``theory.gmm.default_instance()`` when it exists, else the fallback
    (three equal-weight isotropic modes, the top one forgotten, budgets = the target's
    constraint value at ``FALLBACK_LAM``, by quadrature)."""
    gmm = _theory_gmm()
    if hasattr(gmm, "default_instance"):
        inst = gmm.default_instance()
        q, forget, budgets = _unpack_theory_instance(inst)
        return Instance(q, tuple(forget), budgets, "theory.gmm.default_instance")
    q, forget = _fallback_mixture()
    budgets = {}
    for p in PROBLEMS:
        quad = Quadrature(p, q, forget)
        lam = FALLBACK_LAM[p] if FALLBACK_LAM[p] is not None else 0.5 * quad.lam_max()
        budgets[p] = quad.constraint_values([lam])
    return Instance(q, tuple(forget), budgets, "toy fallback (theory.gmm.default_instance missing)")


def _unpack_theory_instance(inst):
    """``(q, forget, budgets)`` as ``theory.gmm.default_instance`` returns it (a mapping or an object
    with those attributes also accepted)."""
    if isinstance(inst, tuple):
        q, forget, budgets = inst
    else:
        get = (lambda k: inst[k]) if isinstance(inst, dict) else (lambda k: getattr(inst, k))
        q, forget, budgets = get("q"), get("forget"), get("budgets")
    forget = list(forget)
    budgets = {p: np.atleast_1d(np.asarray(budgets[p], dtype=np.float64)) for p in PROBLEMS}
    return q, forget, budgets


def lam_star(problem: str, q, forget, budgets, variant: str = "likelihood") -> tuple[np.ndarray, str]:
    """lam* from ``theory.gmm.solve`` when available; otherwise (one constraint only) by toy's
    quadrature. Returns (lam*, source)."""
    gmm = _theory_gmm()
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    if hasattr(gmm, "solve"):
        sol = gmm.solve(problem, q, list(forget), budgets, variant=variant)
        return np.atleast_1d(np.asarray(sol.lam, dtype=np.float64)), "theory.gmm.solve"
    if budgets.shape[0] != 1:
        raise ValueError(f"without theory.gmm.solve only one constraint is supported, got {budgets.shape[0]}")
    return np.array([Quadrature(problem, q, forget, variant).solve(float(budgets[0]))]), "toy.reference quadrature"


def check_budgets(problem: str, q, forget, budgets, variant: str = "likelihood") -> None:
    """Refuse budgets outside the achievable range along the dual path, naming the range."""
    budgets = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    if not np.all(np.isfinite(budgets)):
        raise ValueError(f"budgets must be finite, got {budgets.tolist()}")
    if problem == "likelihood" and np.any(budgets <= 0) and variant != "log_likelihood":
        raise ValueError(f"likelihood budgets must be > 0 (E_p[q_i] > 0 for every p), got {budgets.tolist()}")
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
    gmm = _theory_gmm()
    if not hasattr(gmm, "solve"):
        return (f"budget {b:.6g} for forget distribution {i} is outside the range of {problem} that {toy_range} "
                f"(theory.gmm.solve unavailable to say more)")
    try:
        sol = gmm.solve(problem, q, [f], np.array([b]), variant=variant)
    except ValueError as exc:
        return f"budget {b:.6g} for forget distribution {i} of {problem}: theory.gmm.solve refuses it: {exc}"
    boundary = (getattr(sol, "info", None) or {}).get("boundary")
    if boundary:
        return (f"budget {b:.6g} for forget distribution {i} is beyond the achievable range of {problem} "
                f"(theory.gmm.solve: {boundary})")
    return (f"budget {b:.6g} for forget distribution {i} of {problem} is achievable (theory.gmm.solve: lam* = "
            f"{float(np.asarray(sol.lam)[0]):.6g}, certificate {getattr(sol, 'certificate', '?')}), but the toy cannot "
            f"represent its target: {toy_range} (the tilted target's mass leaves the grid)")
