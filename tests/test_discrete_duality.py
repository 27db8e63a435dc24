"""Duality on finite spaces, measured (``docs/math.md`` §3): weak duality always; zero gap with KKT residuals
~0 when the target at lam* is feasible with complementary slackness; RU's positive gaps, the
condition under which they appear, and their closing under refinement; what holds for FU and LU.

Every primal value here is certified independently of the dual: the global solver
(``theory.discrete.global_primal``), cvxpy (``theory.discrete.oracles``), or random search as a check on
the global solver itself."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory import discrete as d
from theory.discrete import dual as d_dual
from theory.discrete import global_primal as dg
from theory.discrete import oracles
from tests.strategies.discrete import fu_instances, lu_instances, ru_instances, simplices

TOL = 1e-8


def _assert_certified(s, q, forget, variant=d.DEFAULT_VARIANT):
    """Primal point feasible with the reported value; weak duality; zero gap when KKT certifies."""
    v = d.violation(s.problem, q, forget, s.p, s.budgets, variant)
    assert np.all(v <= 1e-7 * max(1.0, np.abs(s.budgets).max())), v
    assert d.objective_value(s.problem, q, s.p) == pytest.approx(s.primal_value, abs=1e-10, rel=1e-10)
    assert s.gap >= -TOL * max(1.0, abs(s.primal_value))
    if s.certificate == "kkt":
        assert abs(s.gap) <= TOL * max(1.0, abs(s.primal_value))
        assert s.kkt["feasibility"] <= 1e-9 and s.kkt["complementary_slackness"] <= 1e-8
        assert s.kkt["lagrangian_gap"] <= 1e-9 * max(1.0, abs(s.dual_value))


@given(ru_instances(m=1, max_n=6))
def test_reverse_kl_weak_duality_and_zero_gap_under_kkt_m1(inst):
    q, forget, b = inst
    s = d.solve("reverse_kl", q, forget, b)
    assert s.certificate in ("kkt", "global")
    _assert_certified(s, q, forget)
    g = dg.reverse_kl_global(q, forget, b)  # independent of the dual, whatever solve certified with
    assert g.value >= s.dual_value - TOL * max(1.0, abs(g.value))
    assert g.value == pytest.approx(s.primal_value, abs=TOL * max(1.0, abs(g.value)))


@settings(max_examples=12)
@given(ru_instances(m=2, max_n=4))
def test_reverse_kl_weak_duality_and_zero_gap_under_kkt_m2(inst):
    q, forget, b = inst
    s = d.solve("reverse_kl", q, forget, b)
    _assert_certified(s, q, forget)
    g = dg.reverse_kl_global(q, forget, b)
    assert g.value >= s.dual_value - TOL * max(1.0, abs(g.value))
    assert g.value == pytest.approx(s.primal_value, abs=TOL * max(1.0, abs(g.value)))


def _random_search_min(q, forget, b, problem, rng, n_samples=60000):
    """Smallest objective over random feasible points (Dirichlet, several concentrations): an upper
    bound on P* that knows nothing of KKT conditions."""
    n = len(q)
    on = q > 0
    best = np.inf
    for alpha in (0.1, 0.3, 1.0, 3.0):
        P = np.zeros((n_samples, n))
        P[:, on] = rng.dirichlet(np.full(on.sum(), alpha), size=n_samples)
        with np.errstate(divide="ignore", invalid="ignore"):
            if problem == "reverse_kl":
                obj = np.sum(np.where(P > 0, P * np.log(P / q), 0), 1)
                cons = np.stack([np.sum(np.where(P > 0, P * np.log(P / f), 0), 1) for f in forget])
            else:
                obj = np.sum(np.where(q > 0, q * np.log(q / P), 0), 1)
                cons = np.stack([np.sum(np.where(f > 0, f * np.log(f / P), 0), 1) for f in forget])
        ok = np.all(cons >= b[:, None], axis=0)
        if ok.any():
            best = min(best, obj[ok].min())
    return best


@settings(max_examples=10)
@given(ru_instances(m=1, min_n=3, max_n=3, q_zeros=False), st.integers(0, 2**32 - 1))
def test_reverse_kl_global_solver_beats_random_search(inst, seed):
    q, forget, b = inst
    g = dg.reverse_kl_global(q, forget, b)
    assert np.all(d.constraint_values("reverse_kl", q, forget, g.p) >= b - 1e-9)
    assert d.kl(g.p, q) == pytest.approx(g.value, abs=1e-12)
    assert g.value <= _random_search_min(q, forget, b, "reverse_kl", np.random.default_rng(seed)) + 1e-12


@settings(max_examples=10)
@given(st.integers(1, 2).flatmap(lambda m: fu_instances(m=m, min_n=3, max_n=3, q_zeros=False,
                                                       forget_zeros=False)), st.integers(0, 2**32 - 1))
def test_forward_kl_global_solver_beats_random_search(inst, seed):
    q, forget, b = inst
    try:
        g = dg.forward_kl_global(q, forget, b)
    except dg.NotCertified:
        return
    assert np.all(d.constraint_values("forward_kl", q, forget, g.p) >= b - 1e-9)
    assert g.value <= _random_search_min(q, forget, b, "forward_kl", np.random.default_rng(seed)) + 1e-12


# --- RU: where the gap is -----------------------------------------------------------------------

@st.composite
def _ru_gap_instances(draw):
    """m = 1 instances with a non-empty gap interval (b_M, b_max] (eqs. 20-21 of ``docs/math.md``): argmin q_1 is not in
    M = argmax q/q_1. Atom x gets the smallest q and the smallest q_1; the atom z with the largest q
    gets q_1(z) = q_1(x) sqrt(q(z)/q(x)) > q_1(x), so q(z)/q_1(z) > q(x)/q_1(x)."""
    n = draw(st.integers(3, 5))
    q = draw(simplices(n=n))
    q1 = draw(simplices(n=n))
    x = draw(st.integers(0, n - 1))
    q[x] = q.min() * draw(st.floats(0.1, 0.7))
    q = q / q.sum()
    z = int(np.argmax(q))
    q1[x] = q1.min() * draw(st.floats(0.05, 0.5))
    q1[z] = q1[x] * np.sqrt(q[z] / q[x])
    q1 = q1 / q1.sum()
    return q, q1[None, :], draw(st.floats(0.15, 0.85))


@given(_ru_gap_instances())
@example((np.array([0.05, 0.5, 0.45]), np.array([[0.02, 0.08, 0.9]]), 0.5))
def test_reverse_kl_gap_is_positive_exactly_where_lam_star_exceeds_one(inst):
    q, forget, frac = inst
    b_M, b_max = d.ru_gap_interval(q, forget)
    assert b_M < b_max
    # point masses met on the way close the gap at their own budgets: stay clear of them
    levels = np.sort(-np.log(forget[0]))
    nxt = levels[levels > b_M + 1e-9].min()
    b_gap = b_M + frac * (nxt - b_M)
    s = d.solve("reverse_kl", q, forget, [b_gap])
    assert s.lam[0] > 1.0 and s.certificate == "global"
    assert s.gap > 1e-9, (s.gap, b_M, b_gap, nxt)
    _assert_certified(s, q, forget)
    # below b_M the target path (Lam <= 1) reaches the budget with CS: zero gap, certified by KKT
    k0 = d.kl(q, forget[0])
    b_zero = k0 + frac * (b_M - k0)
    s0 = d.solve("reverse_kl", q, forget, [b_zero])
    assert s0.certificate == "kkt" and s0.lam[0] <= 1.0 + 1e-12
    _assert_certified(s0, q, forget)
    # at a point-mass budget on the envelope (here b_max, the largest one) the gap closes again
    s_max = d.solve("reverse_kl", q, forget, [b_max])
    assert abs(s_max.gap) <= TOL * max(1.0, s_max.primal_value)
    # b_max = -log min q_1 is met only by the point mass at argmin q_1 (x above): of the Lagrangian's
    # tied minimisers at lam*, the target is the vertex meeting complementary slackness
    np.testing.assert_array_equal(s_max.p_dual, np.eye(q.shape[0])[int(np.argmin(forget[0]))])


@settings(max_examples=8)
@given(_ru_gap_instances())
def test_refining_atoms_into_cells_closes_the_reverse_kl_gap(inst):
    """With K equal cells per atom the Lam = 1 face reaches budgets up to b_M + log K, so the gap is
    positive for b > b_M + log K and exactly zero once K >= exp(b - b_M); P*(K) decreases to the
    non-atomic value b - log max(q/q_1)."""
    q, forget, frac = inst
    q, forget = q[:3] / q[:3].sum(), forget[:, :3] / forget[:, :3].sum()  # keep (K+1)^n faces small
    b_M, b_max = d.ru_gap_interval(q, forget)
    if b_max - b_M < 0.05:
        b_M, b_max = d.ru_gap_interval(np.array([0.05, 0.5, 0.45]), np.array([[0.02, 0.08, 0.9]]))
        q, forget = np.array([0.05, 0.5, 0.45]), np.array([[0.02, 0.08, 0.9]])
    b = b_M + (0.3 + 0.6 * frac) * (min(b_max, b_M + np.log(5.0)) - b_M)
    K_star = int(np.ceil(np.exp(b - b_M)))
    prev_P = np.inf
    for K in range(1, K_star + 1):
        qr, fr = d.refine(q, forget, K)
        s = d.solve("reverse_kl", qr, fr, [b], certify=False)
        g = dg.reverse_kl_global(q, forget, [b], cells=K)
        gap = g.value - s.dual_value
        assert gap >= -TOL
        assert g.value <= prev_P + 1e-12  # refining only adds distributions
        prev_P = g.value
        if b > b_M + np.log(K) + 1e-6:
            assert gap > 1e-10 and s.certificate == "none"
        else:
            assert abs(gap) <= TOL and s.certificate == "kkt"
    r_max = np.max(np.log(q / forget[0]))
    assert prev_P == pytest.approx(b - r_max, abs=TOL)


# --- FU: strong duality on finite spaces ----------------------------------------------------------

@given(fu_instances(m=1, max_n=7))
def test_forward_kl_m1_has_zero_gap_certified_by_kkt_and_by_the_global_solver(inst):
    q, forget, b = inst
    s = d.solve("forward_kl", q, forget, b)
    assert s.certificate == "kkt"
    _assert_certified(s, q, forget)
    g = dg.forward_kl_global(q, forget, b)
    assert g.value == pytest.approx(s.dual_value, abs=TOL * max(1.0, g.value))


@pytest.mark.parametrize("m", [2, 3])
@given(data=st.data())
def test_forward_kl_with_several_constraints_has_zero_gap_unless_q_is_a_mixture_of_the_q_i(m, data):
    """When q is not a mixture of the q_i the dual optimum has Lam* < 1 (D's gradient is -inf on the
    rest of the boundary), so the target there is feasible with CS: zero gap, certified by KKT."""
    q, forget, b = data.draw(fu_instances(m=m, max_n=7 if m == 3 else 5))
    s = d.solve("forward_kl", q, forget, b)
    inst = d_dual.make_instance("forward_kl", q, forget, b)
    if d_dual._fu_boundary(inst) is None:
        assert s.certificate == "kkt" and float(s.lam.sum()) < 1.0
        _assert_certified(s, q, forget)
    else:  # Lam* may be 1; what is measured must still obey weak duality
        assert s.gap >= -TOL
    if m == 2:  # the dual-free enumeration agrees wherever it certifies
        try:
            g = dg.forward_kl_global(q, forget, b)
        except dg.NotCertified:
            return
        assert g.value >= s.dual_value - TOL * max(1.0, g.value)
        if s.certificate == "kkt":
            assert g.value == pytest.approx(s.primal_value, abs=TOL * max(1.0, g.value))


@settings(max_examples=15)
@given(st.integers(3, 6), st.integers(0, 2**32 - 1))
@example(n=6, seed=1945)  # ill-conditioned (Hessian eigenvalue 8e-4): Armijo on F alone stalled at 1.5e-9
def test_forward_kl_two_active_enumeration_finds_points_on_both_sides_of_sum_mu_one(n, seed):
    """For p = (mu·Q - q)/(sum mu - 1) > 0 (the region sum mu > 1, which the dual never visits) and
    for p = (q - mu·Q)/(1 - sum mu) > 0 with mu of any sign, b = KL(q_i||p) makes p a both-active
    stationary point: the enumeration must return it."""
    rng = np.random.default_rng(seed)
    q, Q = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(n), size=2)
    direction = rng.uniform(0.2, 1.0, 2)
    mu_neg = np.max(q / (direction @ Q)) * rng.uniform(1.05, 3.0) * direction
    mu_pos = rng.uniform(-1.0, 1.0) * 0.9 * min(np.min(q / (direction @ Q)), 1 / direction.sum()) * direction
    for mu in (mu_neg, mu_pos):
        if abs(mu.sum() - 1.0) < 1e-3:
            continue
        p = (q - mu @ Q) / (1.0 - mu.sum())
        assert np.all(p > 0)
        b = np.array([d.kl(f, p) for f in Q])
        roots = dg._fu_two_active(q, Q, b)
        assert any(np.allclose(r, p, atol=1e-8) for r in roots)


def test_forward_kl_dual_stays_finite_when_q_is_a_mixture_and_the_budgets_are_infeasible():
    """q = (delta_1 + delta_2)/2, q_i = delta_i, b = (1, 1): p_1, p_2 <= e^-1 cannot sum to 1, so P* =
    +inf, while D* = max over lam_i <= 1/2 is finite (0.307 at lam = (1/2, 1/2)): without Slater the
    gap is infinite. The solver says so instead of returning a number."""
    q = np.array([0.5, 0.5])
    forget = np.eye(2)
    b = np.array([1.0, 1.0])
    D = d.dual_function("forward_kl", q, forget, np.array([0.5, 0.5]), b)[0]
    assert D == pytest.approx(1.0 - np.log(2.0), abs=1e-12)
    grid = np.linspace(0.0, 0.5, 21)
    others = [d.dual_function("forward_kl", q, forget, np.array([a, c]), b)[0] for a in grid for c in grid]
    assert max(others) <= D + 1e-12  # the sup over the domain [0, 1/2]^2 is at its corner
    with pytest.raises(ValueError, match=r"forward_kl: budgets = \[1. 1.\] are infeasible.*0.7357"):
        d.solve("forward_kl", q, forget, [1.0, 1.0])
    with pytest.raises(ValueError, match="infeasible"):
        oracles.forward_kl_point_mass_primal(q, forget, [1.0, 1.0])


@st.composite
def _fu_point_mass(draw):
    n = draw(st.integers(3, 8))
    q = draw(simplices(n=n))
    m = draw(st.integers(1, min(3, n - 1)))
    atoms = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m, unique=True))
    t = np.array(draw(st.lists(st.floats(0.05, 1.5), min_size=m, max_size=m)))
    return q, np.eye(n)[atoms], -np.log(q[atoms]) + t


@given(_fu_point_mass())
# two draws on which the oracle's rel_entr form ended OPTIMAL_INACCURATE (flaky under the dev profile)
@example((np.full(3, 1.0 / 3.0), np.eye(3)[[1]], np.array([1.4347641957507564])))
@example((np.array([0.26156728786723543, 0.4768654242655291, 0.26156728786723543]), np.eye(3)[[0]],
          np.array([1.3910637135971131])))
def test_forward_kl_point_masses_match_the_convex_cvxpy_primal(inst):
    q, forget, b = inst
    s = d.solve("forward_kl", q, forget, b)
    orc = oracles.forward_kl_point_mass_primal(q, forget, b)
    assert s.certificate == "kkt"
    assert orc.value == pytest.approx(s.primal_value, abs=1e-6 * max(1.0, s.primal_value))
    _assert_same_multipliers("forward_kl", q, forget, b, s, orc.duals)
    np.testing.assert_allclose(orc.p, s.p, atol=1e-5)


# --- LU: convex, zero gap ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", d.VARIANTS)
@given(data=st.data())
def test_likelihood_zero_gap_and_multipliers_match_cvxpy(variant, data):
    m = data.draw(st.integers(1, 3))
    q, forget, b = data.draw(lu_instances(m=m, variant=variant))
    s = d.solve("likelihood", q, forget, b, variant=variant)
    assert s.certificate == "kkt"
    _assert_certified(s, q, forget, variant)
    orc = oracles.likelihood_primal(q, forget, b, variant)
    assert orc.value == pytest.approx(s.primal_value, abs=1e-6 * max(1.0, s.primal_value))
    _assert_same_multipliers("likelihood", q, forget, b, s, orc.duals, variant)


def _assert_same_multipliers(problem, q, forget, b, s, duals, variant=d.DEFAULT_VARIANT):
    """cvxpy's constraint duals are dual optimal; they equal lam* when D is strictly concave on the
    active set (else the multipliers form a set, e.g. two constraints binding at one p on 2 atoms).

    Clarabel's duals are only as accurate as its stopping rule: at 1e-10 they were measured 1e-5
    (relative) off a lam* whose dual gradient is 1e-16, converging to it as the tolerance tightens.
    So the allowed distance is derived from cvxpy's own dual residual: for a sigma-strongly concave D,
    |lam_cvx - lam*| <= |proj grad D(lam_cvx)| / sigma (doubled for the curvature change between)."""
    lam_c = np.where(duals > 1e-8 * max(1.0, np.max(duals)), duals, 0.0)  # interior-point zeros
    D_orc, g_orc = d.dual_function(problem, q, forget, lam_c, b, variant)
    assert D_orc == pytest.approx(s.dual_value, abs=1e-6 * max(1.0, abs(s.dual_value)))
    H = d.dual_hessian(problem, q, forget, s.lam, b, variant)
    act = s.lam > 0
    if H is None or not act.any():
        return
    sigma = np.linalg.eigvalsh(-H[np.ix_(act, act)]).min()
    if sigma > 1e-6:
        pg = np.where(lam_c > 0, g_orc, np.maximum(g_orc, 0.0))
        bound = 2.0 * np.abs(pg).max() / sigma + 1e-9 * max(1.0, s.lam.max())
        np.testing.assert_allclose(lam_c, s.lam, atol=bound)


def _two_atom_forward_kl_optimum(q, forget, b):
    """P* of FU on two atoms by hand, without the dual or the global solver: with p_t = (t, 1 - t),
    KL(q||p_t) is convex in t with its minimum at q(0), and each KL(q_i||p_t) is convex with its
    minimum 0 at q_i(0) and +inf at t = 0, 1, so {t: KL(q_i||p_t) >= b_i} is [0, 1] minus an open
    interval whose ends are the two roots of KL(q_i||p_t) = b_i. The constrained minimum of the
    convex objective is at t = q(0) if feasible, else at one of those roots."""
    from scipy.optimize import brentq

    def kl2(a, t):
        return float(a[0] * np.log(a[0] / t) + a[1] * np.log(a[1] / (1.0 - t)))

    cands = [q[0]]
    for qi, bi in zip(forget, b):
        cands += [brentq(lambda t: kl2(qi, t) - bi, lo, hi, xtol=1e-16, rtol=1e-15)
                  for lo, hi in ((1e-300, qi[0]), (qi[0], 1.0 - 1e-16))]
    feasible = [t for t in cands if all(kl2(qi, t) >= bi - 1e-12 for qi, bi in zip(forget, b))]
    return min(kl2(q, t) for t in feasible)


def test_forward_kl_dual_does_not_stall_at_the_mixture_point_on_two_atoms():
    """Regression (found by hypothesis, test_solution_is_permutation_invariant): on two atoms q is
    always a mixture of q_1, q_2; the target w/(1-Lam) is constant along rays ending at the point
    lam_B with sum lam_B,i q_i = q, so D is linear along them and projected Newton's ascent steps
    converged to lam_B = (0.649, 0.351), D = 0.01730, for one order of the atoms, while D* = P* =
    0.019138 at lam* = (0.515, 0): a spurious duality gap and wrong multipliers. The dual optimum must
    equal P* computed by hand (zero gap: at lam* the target is feasible with complementary slackness),
    for both orders. Tolerance: P* by brentq to ~1e-15 in t (slopes O(1)), the dual to Newton's
    1e-13 stopping rule; 1e-9 leaves room for both and is 2e6 times below the stall's error."""
    q = np.array([2 / 3, 1 / 3])
    forget = np.array([[28 / 37, 9 / 37], [0.5, 0.5]])
    b = np.array([0.07507988166307872, 0.004957474059647065])
    P = _two_atom_forward_kl_optimum(q, forget, b)
    assert P == pytest.approx(0.019138111, abs=1e-8)
    for order in ([0, 1], [1, 0]):
        s = d.solve("forward_kl", q[order], forget[:, order], b)
        assert s.dual_value == pytest.approx(P, abs=1e-9), order
        assert s.primal_value == pytest.approx(P, abs=1e-9), order


def test_forward_kl_target_on_the_mixture_face_is_not_amplified_rounding_noise():
    """Regression (found by hypothesis, test_solution_is_permutation_invariant): q = (2/11, ..., 1/11)
    is a mixture of q_1, q_2 (all three are (a, a, a, a, a, 1 - 5a)), lam* lies on the face Lam = 1
    where w = q - sum lam_i q_i is rounding noise, and the target w/(1 - Lam) was that noise divided by
    ~1e-16: a vector summing to 0.92 (or 1.25 for another memory layout of the same array) whose
    KL(q||p) was reported as an upper bound on P* for one layout and +inf for the other. Every p
    minimises the Lagrangian there; whatever the solver returns must be a distribution, and the same
    for both layouts."""
    q = np.array([2 / 11] * 5 + [1 / 11])
    forget = np.array([[4 / 21] * 5 + [1 / 21], [8 / 45] * 5 + [5 / 45]])
    b = np.array([0.07497207171355237, 0.07128185093878382])
    sols = [d.solve("forward_kl", q, f, b) for f in (forget, forget[:, [0, 1, 2, 3, 4, 5]])]
    for s in sols:
        for p in (s.p, s.p_dual):
            if p is not None:
                assert np.all(p >= 0) and p.sum() == pytest.approx(1.0, abs=1e-9)
        if np.isfinite(s.primal_value):  # an upper bound on P* needs a feasible distribution
            assert np.all(d.violation("forward_kl", q, forget, s.p, b) <= 1e-9)
            assert s.primal_value == pytest.approx(d.kl(q, s.p), abs=1e-12)
    assert sols[0].primal_value == sols[1].primal_value
    assert sols[0].dual_value == pytest.approx(sols[1].dual_value, abs=1e-12)
