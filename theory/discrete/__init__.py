"""The three unlearning problems on a finite space (``docs/math.md``): targets, dual functions, solver.

Distributions are float64 vectors on n atoms: ``q`` (n,) the pretrained model, ``forget`` (m, n) the
distributions q_1..q_m to unlearn, ``lam`` (m,) multipliers, ``budgets`` (m,) thresholds b_i (for LU
the eps_i of ``docs/math.md``; we call every threshold a budget).

* RU ``reverse_kl``:  min KL(p||q)  s.t. KL(p||q_i) >= b_i        (non-convex)
* FU ``forward_kl``:  min KL(q||p)  s.t. KL(q_i||p) >= b_i        (non-convex)
* LU ``likelihood``:  min KL(p||q)  s.t. E_p[g_i] <= b_i          (convex), with
  g_i = q_i (``variant="likelihood"``, the default, as the paper states LU), log q_i
  (``"log_likelihood"``) or q_i/q (``"likelihood_ratio"``, a diffusion-classifier score).

``solve`` maximises the concave dual D(lam) (closed forms, projected Newton, an LP for RU's
``sum(lam) >= 1`` branch), then certifies a primal optimum: by the KKT conditions when the target at
lam* is feasible with complementary slackness (zero gap), otherwise by an independent global primal
solver (``theory.discrete.global_primal``) or a convex program (``theory.discrete.oracles``). The gap
``P* - D*`` is measured, never assumed. Decisions and evidence: ``docs/theory-discrete.md``.

Modules, lowest first: ``core`` (validation, divergences, constraint functionals, Lagrangian,
targets), ``dual`` (dual functions, their maximisation, feasibility of budgets), ``global_primal``
(certified global primal by enumeration), ``oracles`` (cvxpy), ``solver`` (``solve``), ``verify``
(the ``dualunlearn verify`` section; matplotlib, not imported here).
"""

from theory.discrete.core import (DEFAULT_VARIANT, KKT_TOL, SUM_TOL, VARIANTS, constraint_values, forward_kl_target,
                                  kl, lagrangian, likelihood_target, logsumexp, objective_value, refine,
                                  reverse_kl_target, violation)
from theory.discrete.dual import dual_function, dual_hessian, optimal_multipliers, ru_gap_interval
from theory.discrete.solver import solve

__all__ = [
    "VARIANTS", "DEFAULT_VARIANT", "SUM_TOL", "KKT_TOL", "kl", "logsumexp", "reverse_kl_target",
    "forward_kl_target", "likelihood_target", "constraint_values", "objective_value", "violation",
    "dual_function", "dual_hessian", "lagrangian", "optimal_multipliers", "solve", "refine", "ru_gap_interval",
]
