"""The input rules every tier shares: the problem names, LU's constraint variants, and the budgets
each problem accepts (``docs/math.md``, the three problems).

``theory.discrete``, ``theory.gmm`` and the toy tier call these functions first, so the same bad
input gets the same ``ValueError`` with the same message from each: the offending value and its
index in plain numbers (no numpy reprs). What depends on the instance (the largest achievable
KL, the smallest achievable ``E_p[g_i]``) is checked by each tier afterwards.

* RU ``reverse_kl`` and FU ``forward_kl``: budgets are KL thresholds, finite and ``>= 0``.
* LU ``likelihood``: budgets are bounds on ``E_p[g_i]``; for the variants with ``g_i >= 0``
  (``"likelihood"``: g_i = q_i, ``"likelihood_ratio"``: g_i = q_i/q) every ``E_p[g_i] >= 0``, so a
  budget must be ``> 0`` to be met; ``"log_likelihood"`` (g_i = log q_i) budgets may be negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PROBLEMS", "VARIANTS", "DEFAULT_VARIANT", "check_problem", "check_variant", "check_budgets",
           "plain"]

#: The three problems (``docs/math.md``), by the names every public function takes.
PROBLEMS = ("reverse_kl", "forward_kl", "likelihood")

#: LU's constraint functionals g_i: the paper's likelihood q_i (the default), the log-likelihood
#: log q_i, and the likelihood ratio q_i/q (a diffusion-classifier score).
VARIANTS = ("likelihood", "log_likelihood", "likelihood_ratio")
DEFAULT_VARIANT = "likelihood"

#: Variants whose g_i is non-negative: their budgets must be > 0.
_NONNEGATIVE_G = ("likelihood", "likelihood_ratio")


def plain(x: Any) -> Any:
    """``x`` with numpy scalars and arrays turned into Python numbers and lists (recursively in
    tuples and lists), so that messages print ``0`` and ``0.5``, never ``np.int64(0)``."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return type(x)(plain(v) for v in x)
    return x


def check_problem(problem: str) -> str:
    """``problem`` if it is one of ``PROBLEMS``, else ``ValueError`` naming it."""
    if not isinstance(problem, str) or problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {PROBLEMS}, got {plain(problem)!r}")
    return problem


def check_variant(variant: str, problem: str = "likelihood") -> str:
    """``variant`` if it is one of ``VARIANTS``, else ``ValueError`` naming it."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"{problem}: variant must be one of {VARIANTS}, got {plain(variant)!r}")
    return variant


def check_budgets(problem: str, budgets: Any, m: int | None = None, *, variant: str | None = None) -> np.ndarray:
    """Budgets as a float64 vector (m,) after the rules every tier shares; ``ValueError`` otherwise.

    Rules: ``problem`` is known; ``budgets`` is a number or a 1-D array of numbers, of length ``m``
    when given, all finite; RU/FU budgets (KL thresholds) are ``>= 0``. With ``variant`` (LU's
    constraint functional, checked) LU budgets of a variant with ``g_i >= 0`` must be ``> 0``:
    ``E_p[g_i] >= 0`` for every p. The message names the problem, the budget and its index.
    """
    check_problem(problem)
    try:
        b = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{problem}: budgets must be numbers, got {plain(budgets)!r}") from exc
    if b.ndim != 1:
        raise ValueError(f"{problem}: budgets must have 1 dimension(s), got shape {b.shape}")
    if m is not None and b.shape != (m,):
        raise ValueError(f"{problem}: budgets must have shape ({m},), got {b.shape}")
    bad = np.flatnonzero(~np.isfinite(b))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{problem}: budgets must be finite, got {float(b[i])} at index {i}")
    if problem != "likelihood":
        bad = np.flatnonzero(b < 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{problem}: budgets are KL thresholds and must be >= 0, got {float(b[i]):.6g} "
                             f"at index {i}")
    elif variant is not None and check_variant(variant, problem) in _NONNEGATIVE_G:
        bad = np.flatnonzero(b <= 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{problem}: budgets[{i}] = {float(b[i]):.6g} cannot be met: g_i >= 0 ({variant} "
                             "variant), so E_p[g_i] >= 0 for every p and a budget must be > 0")
    return b
