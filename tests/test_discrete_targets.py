"""Closed-form targets and dual functions on finite spaces (``docs/math.md`` §2) against independent
computations: cvxpy (``theory.discrete.oracles``), finite differences, the Lagrangian itself."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from theory import discrete as d
from theory.discrete import core as d_core
from theory.discrete import oracles
from tests.strategies.discrete import lu_multipliers, simplices


@st.composite
def _q_forget(draw, m=2, min_n=2, max_n=6, q_zeros=True):
    n = draw(st.integers(min_n, max_n))
    q = draw(simplices(n=n, zeros=q_zeros))
    forget = np.stack([draw(simplices(n=n)) for _ in range(m)])
    return q, forget


def _fu_lam(q, forget, fracs):
    """Multipliers inside FU's dual domain: a fraction of the largest feasible scale along fracs."""
    direction = np.asarray(fracs, float)
    on = q > 0
    t_max = np.min(q[on] / np.maximum(direction @ forget[:, on], 1e-300))
    t_max = min(t_max, 1.0 / max(direction.sum(), 1e-300))
    return 0.9 * t_max * direction


@given(_q_forget(), st.lists(st.floats(0.0, 0.95), min_size=2, max_size=2), st.floats(-0.5, 3))
def test_reverse_kl_target_and_dual_match_cvxpy_below_and_above_lam_one(inst, lam, shift):
    q, forget = inst
    lam = np.array(lam)
    b = np.array([1.0, 0.5]) + shift  # KL budgets are >= 0
    # below Lam = 1 the target's atoms differ by exp(ptp(z)), z = (log q - sum lam_i log q_i)/(1 - Lam);
    # Clarabel cannot certify atoms below ~1e-8 (optimal_inaccurate), so lam is shrunk until
    # ptp(z) <= 12 there (the solver-free identity below holds for every lam); Lam >= 1.2 above
    on = q > 0

    def spread(c):
        lc = c * lam * 0.9 / max(1.0, lam.sum())
        z = (np.log(q[on]) - lc @ np.log(forget[:, on])) / (1 - lc.sum())
        return np.ptp(z)

    c = 1.0
    while spread(c) > 12.0:
        c *= 0.8
    below = c * lam * 0.9 / max(1.0, lam.sum())
    for lam_ in (below, lam + (1.2 - lam.sum()) / 2 if lam.sum() < 1.2 else lam):
        lam_ = np.maximum(lam_, 0.0)
        D, _ = d.dual_function("reverse_kl", q, forget, lam_, b)
        orc = oracles.lagrangian_minimum("reverse_kl", q, forget, lam_, b)
        assert D == pytest.approx(orc.value, abs=1e-6 * max(1.0, abs(D)))  # Clarabel's default accuracy
        p = d.reverse_kl_target(q, forget, lam_)
        # the closed-form target attains D exactly (solver-free)
        assert d.lagrangian("reverse_kl", q, forget, p, lam_, b) == pytest.approx(D, abs=1e-10 * max(1.0, abs(D)))
        if lam_.sum() < 0.9:  # strictly convex Lagrangian: the minimiser is unique
            np.testing.assert_allclose(p, orc.p, atol=1e-4)


@given(_q_forget(q_zeros=True), st.lists(st.floats(0.01, 1.0), min_size=2, max_size=2), st.floats(-0.7, 3))
def test_forward_kl_target_and_dual_match_cvxpy_inside_the_domain(inst, fracs, shift):
    q, forget = inst
    forget = np.where(q[None, :] > 0, forget, 0.0)
    forget = forget / forget.sum(1, keepdims=True)
    lam = _fu_lam(q, forget, fracs)
    b = np.array([0.7, 1.3]) + shift  # KL budgets are >= 0
    D, grad = d.dual_function("forward_kl", q, forget, lam, b)
    orc = oracles.lagrangian_minimum("forward_kl", q, forget, lam, b)
    assert D == pytest.approx(orc.value, abs=1e-6 * max(1.0, abs(D)))
    p = d.forward_kl_target(q, forget, lam)
    assert d.lagrangian("forward_kl", q, forget, p, lam, b) == pytest.approx(D, abs=1e-10 * max(1.0, abs(D)))
    np.testing.assert_allclose(p, orc.p, atol=1e-4)
    np.testing.assert_allclose(grad, b - np.array([d.kl(f, p) for f in forget]), atol=1e-10)


@pytest.mark.parametrize("variant", d.VARIANTS)
@given(inst=_q_forget(q_zeros=True), lam=lu_multipliers(2))
def test_likelihood_target_and_dual_match_cvxpy_for_every_variant(variant, inst, lam):
    q, forget = inst
    b = np.array([0.2, 0.3])
    # the target's atoms differ by up to exp(sum lam_i ptp(g_i)); beyond ~e^12 Clarabel cannot certify
    # a minimiser with atoms below 1e-8 (status optimal_inaccurate), so the oracle check stops there;
    # the solver-free identity L(target, lam) = D(lam) below covers every lam
    g = d_core.g_values(q, forget, variant)[:, q > 0]
    spread = float(lam @ np.ptp(g, axis=1))
    lam = lam * min(1.0, 12.0 / spread) if spread > 0 else lam
    D, grad = d.dual_function("likelihood", q, forget, lam, b, variant=variant)
    orc = oracles.lagrangian_minimum("likelihood", q, forget, lam, b, variant=variant)
    assert D == pytest.approx(orc.value, abs=1e-6 * max(1.0, abs(D)))
    p = d.likelihood_target(q, forget, lam, variant=variant)
    assert d.lagrangian("likelihood", q, forget, p, lam, b, variant) == pytest.approx(D, abs=1e-10 * max(1.0, abs(D)))
    np.testing.assert_allclose(p, orc.p, atol=1e-4)
    assert np.all(p[q == 0] == 0)


def _fd_check(problem, q, forget, lam, b, h=1e-6):
    _, grad = d.dual_function(problem, q, forget, lam, b)
    H = d.dual_hessian(problem, q, forget, lam, b)
    m = len(lam)
    fd_g = np.zeros(m)
    fd_H = np.zeros((m, m))
    for i in range(m):
        e = np.zeros(m)
        e[i] = h
        vp, gp = d.dual_function(problem, q, forget, lam + e, b)
        vm, gm = d.dual_function(problem, q, forget, lam - e, b)
        fd_g[i] = (vp - vm) / (2 * h)
        fd_H[:, i] = (gp - gm) / (2 * h)
    scale = max(1.0, np.abs(grad).max())
    np.testing.assert_allclose(grad, fd_g, atol=2e-6 * scale)
    np.testing.assert_allclose(H, fd_H, atol=2e-5 * max(1.0, np.abs(H).max()))
    np.testing.assert_allclose(H, H.T, atol=1e-12 * max(1.0, np.abs(H).max()))
    assert np.linalg.eigvalsh(H).max() <= 1e-10 * max(1.0, np.abs(H).max())  # concave


@given(_q_forget(q_zeros=False), st.lists(st.floats(0.05, 0.6), min_size=2, max_size=2))
def test_dual_gradient_and_hessian_match_finite_differences(inst, fracs):
    q, forget = inst
    b = np.array([0.4, 0.9])
    _fd_check("likelihood", q, forget, np.array(fracs) * 10, b)
    _fd_check("reverse_kl", q, forget, np.array(fracs) * 0.7, b)
    _fd_check("forward_kl", q, forget, _fu_lam(q, forget, fracs), b)


@given(_q_forget(q_zeros=True), st.lists(st.floats(0.0, 3.0), min_size=2, max_size=2),
       st.lists(st.floats(0.0, 3.0), min_size=2, max_size=2))
def test_reverse_kl_dual_is_concave_across_the_lam_one_branch(inst, a, c):
    q, forget = inst
    b = np.array([0.8, 1.1])
    a, c = np.array(a), np.array(c)
    Da = d.dual_function("reverse_kl", q, forget, a, b)[0]
    Dc = d.dual_function("reverse_kl", q, forget, c, b)[0]
    Dm = d.dual_function("reverse_kl", q, forget, (a + c) / 2, b)[0]
    assert Dm >= (Da + Dc) / 2 - 1e-9 * max(1.0, abs(Da), abs(Dc))


@given(_q_forget(m=1, q_zeros=True), st.floats(0.0, 1.0))
def test_reverse_kl_dual_is_continuous_at_lam_one_and_finite_above(inst, t):
    q, forget = inst
    b = np.array([1.5])
    D1 = d.dual_function("reverse_kl", q, forget, np.array([1.0]), b)[0]
    Dl = d.dual_function("reverse_kl", q, forget, np.array([1.0 - 1e-9]), b)[0]
    assert abs(D1 - Dl) <= 1e-6 * max(1.0, abs(D1))
    D2, g2 = d.dual_function("reverse_kl", q, forget, np.array([1.0 + 5 * t]), b)
    assert np.isfinite(D2) and np.all(np.isfinite(g2))
    on = q > 0
    f = -np.log(q[on]) + (1 + 5 * t) * np.log(forget[0, on])
    assert D2 == pytest.approx((1 + 5 * t) * 1.5 + f.min(), abs=1e-12 * max(1.0, abs(D2)))


def test_forward_kl_dual_is_minus_inf_outside_its_domain():
    q = np.array([0.5, 0.5])
    forget = np.array([[0.9, 0.1]])
    val, grad = d.dual_function("forward_kl", q, forget, np.array([0.6]), np.array([1.0]))
    assert val == -np.inf and grad is None
    with pytest.raises(ValueError, match=r"forward_kl: lam = \[0.6\] is outside the dual domain.*-0.04"):
        d.forward_kl_target(q, forget, np.array([0.6]))


def test_kl_is_inf_not_nan_when_supports_do_not_nest():
    assert d.kl([0.5, 0.5, 0.0], [1.0, 0.0, 0.0]) == np.inf
    assert d.kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert d.kl([0.0, 1.0], [0.0, 1.0]) == 0.0
    q = np.array([0.5, 0.5, 0.0])
    forget = np.array([[0.5, 0.0, 0.5]])
    p = d.likelihood_target(q, forget, np.array([3.0]))
    assert np.all(np.isfinite(p)) and p[2] == 0.0
    v = d.constraint_values("forward_kl", q, np.array([[0.5, 0.5, 0.0]]), np.array([1.0, 0.0, 0.0]))
    assert v[0] == np.inf


@example(lam=np.array([0.0]))
@given(lam=lu_multipliers(1, high=0.999))
def test_reverse_kl_tilt_is_the_composed_power_formula(lam):
    q = np.array([0.1, 0.2, 0.3, 0.4])
    q1 = np.array([0.4, 0.3, 0.2, 0.1])
    eta = lam[0] / (1 - lam[0])
    log_expected = np.log(q) + eta * np.log(q / q1)
    expected = np.exp(log_expected - log_expected.max())
    np.testing.assert_allclose(d.reverse_kl_target(q, q1[None], lam), expected / expected.sum(), rtol=1e-10,
                               atol=1e-300)


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
@given(data=st.data())
def test_dual_optimum_beats_every_multiplier_on_a_grid(problem, data):
    """D* from the solver (Newton / LP) is at least D on a dense grid of multipliers (m = 1), across
    RU's Lam = 1 kink: the dual solver's optimality checked by brute force."""
    from tests.strategies.discrete import fu_instances, lu_instances, ru_instances

    strat = {"reverse_kl": ru_instances(m=1), "forward_kl": fu_instances(m=1),
             "likelihood": lu_instances(m=1)}[problem]
    q, forget, b = data.draw(strat)
    lam, D = d.optimal_multipliers(problem, q, forget, b)
    hi = {"reverse_kl": 4.0 * max(1.0, lam[0]), "likelihood": 4.0 * max(1.0, lam[0]),
          "forward_kl": min(1.0, float(np.min(q[forget[0] > 0] / forget[0, forget[0] > 0])))}[problem]
    grid = np.linspace(0.0, hi, 801)
    vals = np.array([d.dual_function(problem, q, forget, np.array([x]), b)[0] for x in grid])
    assert D >= np.max(vals[np.isfinite(vals)]) - 1e-12 * max(1.0, abs(D))


def test_reverse_kl_dual_optimum_on_the_gap_instance_beats_the_grid_for_every_budget():
    """Regression: as Lam -> 1- the exponential-family shortcut for KL(p_lam||q_1) cancelled to 0,
    Newton stopped at lam = 1 and D* came out 0.31 too low at b = 3 (lam* = 1.661)."""
    q, forget = np.array([0.05, 0.5, 0.45]), np.array([[0.02, 0.08, 0.9]])
    grid = np.linspace(0.0, 4.0, 401)
    for b in [*np.linspace(0.5, -np.log(0.02), 6), 3.0]:
        lam, D = d.optimal_multipliers("reverse_kl", q, forget, [b])
        best = max(d.dual_function("reverse_kl", q, forget, np.array([x]), [b])[0] for x in grid)
        assert D >= best - 1e-12


def test_constraint_functionals_of_every_lu_variant_match_their_definitions():
    """docs/math.md: g_i = q_i (likelihood), log q_i (log_likelihood), q_i/q (likelihood_ratio). The
    other LU tests take g from g_values itself (and so do the cvxpy oracles), so its definition is
    checked here against the formulas written out: E_p[g_i] for a fixed p, and the Gibbs tilt
    p ∝ q exp(-lam g) normalised by hand. Values are O(1) sums of 4 terms: 1e-12 is rounding."""
    q = np.array([0.4, 0.3, 0.2, 0.1])
    forget = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p = np.array([0.1, 0.2, 0.3, 0.4])
    lam = np.array([0.7, 1.3])
    by_hand = {"likelihood": forget, "log_likelihood": np.log(forget), "likelihood_ratio": forget / q}
    for variant, g in by_hand.items():
        expected = np.array([sum(p[x] * g[i, x] for x in range(4)) for i in range(2)])
        got = d.constraint_values("likelihood", q, forget, p, variant)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=variant)
        w = np.array([q[x] * np.exp(-(lam[0] * g[0, x] + lam[1] * g[1, x])) for x in range(4)])
        np.testing.assert_allclose(d.likelihood_target(q, forget, lam, variant), w / w.sum(), atol=1e-12,
                                   err_msg=variant)


def test_reverse_kl_target_beyond_lam_one_breaks_ties_towards_the_largest_q():
    """For Lam > 1 the RU Lagrangian (1 - Lam) sum p log p + sum p f, f = -log q + sum lam_i log q_i, is
    concave: minimised at the vertices of argmin f, among which the documented choice is the one with
    the largest q (the smallest objective KL(p||q) = -log q(x) among equally good minimisers). Here
    q_1 = c sqrt(q) on atoms 0 and 1 makes f(0) = f(1) = 2 log c for lam = 2 (f(2) = log(q_1(2)^2 /
    q(2)) = log 0.694 > log 0.25), so both are minimisers and atom 0 (q = 0.5 > 0.3) is the answer."""
    q = np.array([0.5, 0.3, 0.2])
    c = 0.5
    q1 = np.array([c * np.sqrt(0.5), c * np.sqrt(0.3), 0.0])
    q1[2] = 1.0 - q1[:2].sum()
    lam = np.array([2.0])
    f = -np.log(q) + 2.0 * np.log(q1)
    assert abs(f[0] - f[1]) < 1e-14 and f[2] > f[0] + 0.5  # the tie, checked by hand
    np.testing.assert_array_equal(d.reverse_kl_target(q, q1[None, :], lam), [1.0, 0.0, 0.0])
