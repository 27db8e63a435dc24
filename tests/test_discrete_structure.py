"""Structure of the finite solutions: P*(b) monotone, permutation invariance, inactive constraints,
budgets recovered from lam* (round trip), and clear errors on bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory import discrete as d
from tests.strategies.discrete import fu_instances, lu_instances, ru_instances, simplices

TOL = 1e-8


@settings(max_examples=15)
@given(ru_instances(m=1, max_n=5), st.floats(0.05, 0.95))
def test_reverse_kl_primal_value_is_monotone_in_the_budget(inst, t):
    q, forget, b = inst
    b2 = b + t * (np.max(-np.log(forget[0, q > 0])) - b)  # a larger, still feasible budget
    s1, s2 = d.solve("reverse_kl", q, forget, b), d.solve("reverse_kl", q, forget, b2)
    assert s2.primal_value >= s1.primal_value - TOL
    assert s2.dual_value >= s1.dual_value - TOL  # and D*(b) too (lam* >= 0)


@given(fu_instances(m=1), st.floats(0.05, 1.0))
def test_forward_kl_primal_value_is_monotone_in_the_budget(inst, t):
    q, forget, b = inst
    s1, s2 = d.solve("forward_kl", q, forget, b), d.solve("forward_kl", q, forget, b + t)
    assert s2.primal_value >= s1.primal_value - TOL


@given(lu_instances(m=1), st.floats(0.05, 0.95))
def test_likelihood_primal_value_decreases_as_the_budget_loosens(inst, t):
    q, forget, b = inst
    Eq = forget[:, q > 0] @ q[q > 0]
    s1, s2 = d.solve("likelihood", q, forget, b), d.solve("likelihood", q, forget, b + t * (Eq - b))
    assert s2.primal_value <= s1.primal_value + TOL


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
@given(data=st.data())
def test_solution_is_permutation_invariant(problem, data):
    strat = {"reverse_kl": ru_instances(m=1, max_n=5), "forward_kl": fu_instances(m=2),
             "likelihood": lu_instances(m=2)}[problem]
    q, forget, b = data.draw(strat)
    perm = np.array(data.draw(st.permutations(range(len(q)))))
    s = d.solve(problem, q, forget, b)
    sp = d.solve(problem, q[perm], forget[:, perm], b)
    assert sp.dual_value == pytest.approx(s.dual_value, abs=TOL * max(1.0, abs(s.dual_value)))
    assert sp.primal_value == pytest.approx(s.primal_value, abs=TOL * max(1.0, abs(s.primal_value)))
    np.testing.assert_allclose(sp.lam, s.lam, atol=1e-6 * max(1.0, s.lam.max()))
    if s.certificate == "kkt" and sp.certificate == "kkt" and problem != "reverse_kl":
        np.testing.assert_allclose(sp.p, s.p[perm], atol=1e-7)


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
@given(data=st.data())
def test_inactive_constraints_give_zero_multipliers_and_p_equal_to_q(problem, data):
    m = data.draw(st.integers(1, 3))
    strat = {"reverse_kl": ru_instances(m=m, active=False), "forward_kl": fu_instances(m=m, active=False),
             "likelihood": lu_instances(m=m, active=False)}[problem]
    q, forget, b = data.draw(strat)
    s = d.solve(problem, q, forget, b)
    assert s.certificate == "kkt"
    np.testing.assert_array_equal(s.lam, np.zeros(m))
    np.testing.assert_allclose(s.p, q, atol=1e-15)
    assert s.primal_value == pytest.approx(0.0, abs=1e-15) and s.dual_value == pytest.approx(0.0, abs=1e-15)


def _round_trip(problem, q, forget, lam):
    """b = constraint values at the target p(lam); solving with b must give back p(lam), and lam
    itself where it is determined: D strictly concave at lam (curvature >= 1e-4; the solver's dual
    gradient is <= 1e-13, so |lam* - lam| <= 1e-13 / 1e-4)."""
    target = {"reverse_kl": d.reverse_kl_target, "forward_kl": d.forward_kl_target,
              "likelihood": d.likelihood_target}[problem]
    p = target(q, forget, lam)
    b = d.constraint_values(problem, q, forget, p)
    s = d.solve(problem, q, forget, b)
    np.testing.assert_allclose(s.p, p, atol=1e-7)
    assert s.dual_value == pytest.approx(d.dual_function(problem, q, forget, lam, b)[0], abs=1e-10)
    H = d.dual_hessian(problem, q, forget, lam, b)
    if np.linalg.eigvalsh(-H).min() >= 1e-4:
        np.testing.assert_allclose(s.lam, lam, rtol=1e-6, atol=1e-8)


@given(simplices(min_n=2, max_n=7, zeros=True), st.data())
def test_budgets_recovered_from_lam_round_trip(q, data):
    """lam -> target p(lam) -> b(lam) = constraint values at p(lam) -> solve -> lam* = lam, p* = p(lam)."""
    n = len(q)
    on = q > 0
    m = data.draw(st.integers(1, 2))
    forget = np.stack([data.draw(simplices(n=n)) for _ in range(m)])
    fr = np.array(data.draw(st.lists(st.floats(0.05, 1.0), min_size=m, max_size=m)))
    g = forget[:, on]
    if np.linalg.matrix_rank(np.vstack([g, np.ones(on.sum())])) == m + 1:  # else b is not strictly feasible
        _round_trip("likelihood", q, forget, fr * 5)
    if np.ptp(np.log(q[on] / forget[0, on])) > 1e-6:  # else every lam gives p = q
        _round_trip("reverse_kl", q, forget[:1], fr[:1] * 0.9)
    f1 = np.where(on, forget[0], 0.0)
    f1 = f1 / f1.sum()
    if np.max(np.abs(f1 - q)) > 1e-6:
        _round_trip("forward_kl", q, f1[None], np.array([0.9 * fr[0] * np.min(q[on] / f1[on])]))


# --- bad input ---------------------------------------------------------------------------------

Q = [0.5, 0.3, 0.2]
F = [[0.2, 0.3, 0.5]]


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
@pytest.mark.parametrize("q, forget, budgets, match", [
    ([0.5, -0.1, 0.6], F, [0.1], r"q must be non-negative, got -0.1"),
    ([0.5, np.nan, 0.5], F, [0.1], r"q must be finite, got nan"),
    ([0.5, 0.3, 0.1], F, [0.1], r"q must sum to 1, got 0.9"),
    (Q, [[0.2, 0.3]], [0.1], r"forget must have shape \(m, 3\) to match q, got \(1, 2\)"),
    (Q, [0.2, 0.3, 0.5], [0.1], r"forget must have 2 dimension\(s\), got shape \(3,\)"),
    (Q, [[0.2, 0.3, 0.6]], [0.1], r"forget must sum to 1 \(row 0\), got 1.1"),
    (Q, F, [0.1, 0.2], r"budgets must have shape \(1,\), got \(2,\)"),
    (Q, F, [np.inf], r"budgets must be finite, got inf"),
    ([[0.5, 0.5]], F, [0.1], r"q must have 1 dimension\(s\)"),
])
def test_bad_input_raises_value_error_naming_problem_and_value(problem, q, forget, budgets, match):
    with pytest.raises(ValueError, match=f"^{problem}: .*" + match):
        d.solve(problem, q, forget, budgets)


def test_unknown_problem_and_variant_are_rejected():
    with pytest.raises(ValueError, match=r"problem must be one of .* got 'kl'"):
        d.solve("kl", Q, F, [0.1])
    with pytest.raises(ValueError, match=r"likelihood: variant must be one of .* got 'score'"):
        d.solve("likelihood", Q, F, [0.3], variant="score")
    with pytest.raises(ValueError, match=r"reverse_kl: lam must be >= 0, got \[-0.5\]"):
        d.reverse_kl_target(Q, F, [-0.5])


def test_forget_supports_each_problem_does_not_allow():
    with pytest.raises(ValueError, match=r"reverse_kl: forget\[0\] is 0 at atom 1 where q = 0.3 > 0"):
        d.solve("reverse_kl", Q, [[0.5, 0.0, 0.5]], [0.1])
    with pytest.raises(ValueError, match=r"forward_kl: forget\[0\] has mass 0.5 at atom 2 where q = 0"):
        d.solve("forward_kl", [0.5, 0.5, 0.0], [[0.5, 0.0, 0.5]], [0.1])
    with pytest.raises(ValueError, match=r"likelihood: forget\[0\] is 0 at atom 1 .* log-likelihood"):
        d.solve("likelihood", Q, [[0.5, 0.0, 0.5]], [-1.0], variant="log_likelihood")
    # allowed: RU forget mass off supp q, FU forget zeros inside supp q, LU likelihood zeros
    d.solve("reverse_kl", [0.5, 0.5, 0.0], [[0.4, 0.4, 0.2]], [0.5])
    d.solve("forward_kl", Q, [[0.0, 1.0, 0.0]], [2.0])
    d.solve("likelihood", Q, [[0.5, 0.0, 0.5]], [0.3])


def test_infeasible_budgets_state_the_largest_achievable_value():
    best = -np.log(0.2)
    with pytest.raises(ValueError, match=rf"reverse_kl: budgets\[0\] = 2 is infeasible: the largest achievable "
                                         rf"KL\(p\|\|q_0\) .* is {best:.12g}"):
        d.solve("reverse_kl", Q, F, [2.0])
    with pytest.raises(ValueError, match=r"likelihood: budgets\[0\] = 0.1 is infeasible: the smallest achievable "
                                         r"E_p\[g_0\] \(likelihood\) is 0.2"):
        d.solve("likelihood", Q, F, [0.1])
    with pytest.raises(ValueError, match=r"likelihood: budgets = \[0.24 0.24\] are jointly infeasible"):
        d.solve("likelihood", Q, [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]], [0.24, 0.24])
    with pytest.raises(ValueError, match=r"forward_kl: budgets = \[1. 1.\] are infeasible.*largest achievable"):
        d.solve("forward_kl", [0.5, 0.5], np.eye(2), [1.0, 1.0])
    # RU with two constraints: each feasible alone, jointly not (q_1 and q_2 small on different atoms)
    q2, f2 = [0.5, 0.5], [[0.1, 0.9], [0.9, 0.1]]
    with pytest.raises(ValueError, match=r"reverse_kl: budgets = \[2. 2.\] are (jointly )?infeasible"):
        d.solve("reverse_kl", q2, f2, [2.0, 2.0])


def test_forward_kl_with_a_forget_distribution_equal_to_q_is_reported_not_crashed():
    # regression (found by hypothesis): q_1 = q on two atoms used to raise "infeasible" although
    # p = (0.62, 0.38) is feasible; the degenerate case is now uncertified, with weak duality intact
    import numpy as np

    from theory import discrete

    q = np.array([0.5, 0.5, 0.0])
    forget = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    s = discrete.solve("forward_kl", q, forget, [0.0230026, 0.86713496])
    assert s.primal_value >= s.dual_value - 1e-9
    assert np.isfinite(s.dual_value)


def test_likelihood_budget_equal_to_the_smallest_g_is_rejected():
    """LU needs a p with E_p[g] < b strictly (Slater). With g = q_1 = (0.25, 0.75) the smallest E_p[g]
    is 0.25 (p = delta_0): b = 0.25 exactly must be rejected, b slightly above accepted. (Mutation
    testing: `b < low` for `b <= low` survived.)"""
    q, forget = np.array([0.5, 0.5]), np.array([[0.25, 0.75]])
    with pytest.raises(ValueError, match="infeasible"):
        d.solve("likelihood", q, forget, [0.25])
    assert d.solve("likelihood", q, forget, [0.3]).certificate == "kkt"


@settings(max_examples=25)
@given(ru_instances(m=2, q_zeros=False), st.data())
def test_reverse_kl_dual_beyond_lam_one_is_the_lp_value_with_a_supergradient(inst, data):
    """For Lam >= 1 the RU Lagrangian is linear in p over the simplex: D(lam) = lam·b + min_x f_lam(x),
    f_lam = -log q + sum lam_i log q_i (written out here), concave and piecewise linear in lam. The
    returned gradient must be a supergradient: D(lam') <= D(lam) + g·(lam' - lam) for every lam'
    (checked at drawn points with Lam' >= 1 too, where the same formula holds); the slack allowed is
    float64 rounding of sums of O(10) logs."""
    q, forget, b = inst

    def D(lam):
        f = -np.log(q) + lam @ np.log(forget)
        return float(lam @ b + f.min())

    pts = st.lists(st.floats(0.0, 3.0), min_size=2, max_size=2).map(np.array).filter(lambda v: v.sum() >= 1.0)
    lam = data.draw(pts)
    val, g = d.dual_function("reverse_kl", q, forget, lam, b)
    assert val == pytest.approx(D(lam), abs=1e-10 * max(1.0, abs(val)))
    for _ in range(5):
        other = data.draw(pts)
        assert D(other) <= val + g @ (other - lam) + 1e-9 * (1.0 + np.abs(other - lam).sum() * np.abs(g).max())
