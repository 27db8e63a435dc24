"""Constructive hypothesis strategies for finite distributions and the three problems' instances.

Budgets are drawn as a fraction of the achievable range, so constraints are active (or, where
drawn so, inactive) by construction; no ``assume``. Exact zeros come from explicit masks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from theory import discrete
from theory.discrete import core as discrete_core

__all__ = ["simplices", "ru_instances", "fu_instances", "lu_instances", "lu_multipliers"]

_weights = st.floats(0.05, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def simplices(draw, n: int | None = None, min_n: int = 2, max_n: int = 8, zeros: bool = False,
              support: np.ndarray | None = None):
    """A point of the simplex on n atoms, entries >= 0.05/n-ish before normalisation; with
    ``zeros=True`` an explicit mask zeroes some atoms (never all); ``support`` (bool (n,)) zeroes
    every atom outside it."""
    if n is None:
        n = len(support) if support is not None else draw(st.integers(min_n, max_n))
    w = np.array(draw(st.lists(_weights, min_size=n, max_size=n)), dtype=np.float64)
    if zeros:
        mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        keep = draw(st.integers(0, n - 1))
        mask[keep] = False
        w[mask] = 0.0
    if support is not None:
        w = np.where(support, w, 0.0)
        if w.sum() == 0:
            w[np.flatnonzero(support)[0]] = 1.0
    return w / w.sum()


@st.composite
def ru_instances(draw, m: int = 1, min_n: int = 2, max_n: int = 6, q_zeros: bool = True,
                 active: bool = True):
    """(q, forget, budgets) for RU with supp q inside every supp q_i and a feasible budget:
    b_i = KL(q||q_i) + frac_i (KL(p0||q_i) - KL(q||q_i)) for a drawn p0 (a point mass when m = 1,
    the farthest one for q_1), frac_i in [0.05, 0.95] (active) or b_i = (1 - frac_i) KL(q||q_i) (inactive);
    every budget is >= 0, as KL budgets must be."""
    n = draw(st.integers(min_n, max_n))
    q = draw(simplices(n=n, zeros=q_zeros))
    forget = np.stack([draw(simplices(n=n)) for _ in range(m)])
    kq = np.array([discrete.kl(q, f) for f in forget])
    if m == 1:
        on = q > 0
        x = np.flatnonzero(on)[np.argmin(forget[0, on])]
        p0 = np.eye(n)[x]
    else:
        p0 = draw(simplices(n=n, support=q > 0))
        x = draw(st.sampled_from(list(np.flatnonzero(q > 0))))
        p0 = 0.5 * p0 + 0.5 * np.eye(n)[x]
    k0 = np.array([discrete.kl(p0, f) for f in forget])
    fracs = np.array(draw(st.lists(st.floats(0.05, 0.95), min_size=m, max_size=m)))
    if active:
        b = np.where(k0 > kq, kq + fracs * (k0 - kq), (1.0 - fracs) * k0)
    else:
        b = (1.0 - fracs) * kq
    return q, forget, b


@st.composite
def fu_instances(draw, m: int = 1, min_n: int = 2, max_n: int = 6, q_zeros: bool = True,
                 forget_zeros: bool = True, active: bool = True):
    """(q, forget, budgets) for FU with supp q_i inside supp q: b_i = (1 - t_i/2.05) KL(q_i||q) (inactive);
    active with m = 1: b_1 = KL(q_1||q) + t, t in [0.05, 2]; with m > 1 a fraction of the way from
    KL(q_i||q) to KL(q_i||p0) for a drawn p0 > 0 on supp q (feasible by construction). Every budget
    is >= 0, as KL budgets must be."""
    n = draw(st.integers(min_n, max_n))
    q = draw(simplices(n=n, zeros=q_zeros))
    on = q > 0
    rows = []
    for _ in range(m):
        support = on & (draw(simplices(n=n, zeros=True)) > 0) if forget_zeros else on
        rows.append(draw(simplices(n=n, support=support if support.any() else on)))
    forget = np.stack(rows)
    t = np.array(draw(st.lists(st.floats(0.05, 2.0), min_size=m, max_size=m)))
    base = np.array([discrete.kl(f, q) for f in forget])
    fracs = t / 2.05
    if not active:
        return q, forget, (1.0 - fracs) * base
    if m == 1:  # one constraint: every budget is feasible (p may vanish on supp q_1)
        return q, forget, base + t
    # several: below the values at a drawn p0 > 0 on supp q, so p0 is feasible
    x = draw(st.sampled_from(list(np.flatnonzero(on))))
    p0 = 0.7 * draw(simplices(n=n, support=on)) + 0.3 * np.eye(n)[x]
    k0 = np.array([discrete.kl(f, p0) for f in forget])
    return q, forget, np.where(k0 > base, base + fracs * (k0 - base), (1.0 - fracs) * k0)


@st.composite
def lu_instances(draw, m: int = 1, min_n: int = 2, max_n: int = 8, variant: str = "likelihood",
                 q_zeros: bool = True, active: bool = True):
    """(q, forget, budgets) for LU: for a drawn p0 on supp q, b_i = E_p0[g_i] + frac_i (E_q[g_i] -
    E_p0[g_i]) when E_q[g_i] > E_p0[g_i] (strictly feasible and active), else E_p0[g_i] + 0.1."""
    n = draw(st.integers(min_n, max_n))
    q = draw(simplices(n=n, zeros=q_zeros))
    on = q > 0
    forget = np.stack([draw(simplices(n=n)) for _ in range(m)])
    g = discrete_core.g_values(q, forget, variant)
    x = draw(st.sampled_from(list(np.flatnonzero(on))))
    p0 = 0.5 * draw(simplices(n=n, support=on)) + 0.5 * np.eye(n)[x]
    Eq, E0 = g[:, on] @ q[on], g[:, on] @ p0[on]
    fracs = np.array(draw(st.lists(st.floats(0.1, 0.9), min_size=m, max_size=m)))
    if active:
        b = np.where(Eq - E0 > 1e-6, E0 + fracs * (Eq - E0), E0 + 0.1)
    else:
        b = Eq + fracs
    return q, forget, b


def lu_multipliers(m: int, high: float = 20.0):
    """(m,) multipliers >= 0 with exact zeros possible."""
    return st.lists(st.one_of(st.just(0.0), st.floats(0.0, high)), min_size=m, max_size=m).map(np.array)
