"""Targets on mixtures: closed forms vs quadrature vs Monte Carlo, exact vs surrogate noise
predictions, domains and bad input (``docs/math.md`` §2, §4)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.gmm import (VARIANTS, GaussianMixture, constraint_value, default_instance, forward_kl_target,
                        gaussian_kl, gaussian_power_tilt, likelihood_target, objective_value, reverse_kl_eta_max,
                        reverse_kl_target)
from tests.strategies import covariances, unlearning_instances

MU, S = np.array([0.5, -0.2]), np.array([[0.8, 0.25], [0.25, 0.5]])
MU1, S1 = np.array([-1.0, 1.0]), np.array([[1.2, -0.3], [-0.3, 0.9]])
Q1G = GaussianMixture([1.0], [MU], [S])
F1G = GaussianMixture([1.0], [MU1], [S1])


def _within(est, exact, se, k=5.0):
    return abs(est - exact) <= k * se + 1e-12


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.45])
def test_reverse_kl_tilt_of_gaussians_matches_closed_form(lam):
    """q^(1+eta) q_1^(-eta) of two Gaussians is Gaussian (gaussian_power_tilt): log Z, KLs, score."""
    eta = lam / (1 - lam)
    p = reverse_kl_target(Q1G, [F1G], [lam])
    mean, cov, log_Z = gaussian_power_tilt(MU, S, MU1, S1, 1 + eta, eta)
    assert p.log_normaliser == pytest.approx(log_Z, abs=1e-10)
    assert constraint_value("reverse_kl", p, F1G) == pytest.approx(gaussian_kl(mean, cov, MU1, S1), abs=1e-9)
    assert objective_value("reverse_kl", p, Q1G) == pytest.approx(gaussian_kl(mean, cov, MU, S), abs=1e-9)
    x = np.random.default_rng(0).normal(size=(5, 2))
    np.testing.assert_allclose(p.score(x), -np.linalg.solve(cov, (x - mean).T).T, atol=1e-10)
    np.testing.assert_allclose(p.log_prob(x), GaussianMixture([1.0], [mean], [cov]).log_prob(x), atol=1e-10)


@pytest.mark.parametrize("ab", [0.999, 0.7, 0.2, 0.003])
def test_exact_eps_of_a_gaussian_tilt_matches_the_noised_gaussian(ab):
    """The RU tilt of Gaussians is N(m, C); its noised law is N(sqrt(ab) m, ab C + (1-ab) I), so the
    quadrature Tweedie eps must equal that Gaussian's eps; the composed surrogate must not."""
    lam = 0.3
    eta = lam / (1 - lam)
    p = reverse_kl_target(Q1G, [F1G], [lam])
    mean, cov, _ = gaussian_power_tilt(MU, S, MU1, S1, 1 + eta, eta)
    exact = GaussianMixture([1.0], [mean], [cov])
    x = exact.noised(ab).sample(40, np.random.default_rng(1))
    np.testing.assert_allclose(p.exact_eps(x, ab), exact.eps(x, ab), atol=1e-8)
    if ab < 0.9:
        assert np.abs(p.eps(x, ab) - exact.eps(x, ab)).max() > 1e-3


@settings(max_examples=8)
@given(unlearning_instances(), st.floats(0.01, 0.999), st.integers(0, 2 ** 31))
def test_exact_eps_at_lam_zero_is_the_mixture_eps(inst, ab, seed):
    q, forget = inst
    p = likelihood_target(q, forget, [0.0])
    x = q.noised(ab).sample(8, np.random.default_rng(seed))
    np.testing.assert_allclose(p.exact_eps(x, ab), q.eps(x, ab), atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lu_eps_is_the_exact_noised_tilt_by_two_quadratures(variant):
    """LU's ``.eps`` (Gauss-Hermite through q's posterior) = the grid Tweedie ``exact_eps``
    (independent quadrature) to 1e-4 at every noise level (measured <= 4e-4 for the ratio variant
    at n_gh = 20, ~1e-5 for the others; n_gh = 24 here), per-sample alpha_bar included; and it is
    not the plug-in surrogate."""
    q, forget, _ = default_instance()
    lam = {"likelihood": 20.0, "log_likelihood": 0.3, "likelihood_ratio": 0.85}[variant]
    p = likelihood_target(q, forget, [lam], variant)
    assert p.eps_is_exact
    rng = np.random.default_rng(10)
    abs_ = np.array([0.999, 0.9, 0.5, 0.1, 0.001])
    x = np.concatenate([q.noised(ab).sample(6, rng) for ab in abs_])
    ab = np.repeat(abs_, 6)
    e = p.eps(x, ab)
    tol = 1e-3 if variant == "likelihood_ratio" else 1e-4
    np.testing.assert_allclose(e, p.exact_eps(x, ab), atol=tol)
    assert np.abs(e - p.surrogate_eps(x, ab)).max() > 1e-2


def test_composed_surrogate_is_esd_formula_from_the_mixtures_eps():
    q, forget, _ = default_instance()
    lam = np.array([0.4])
    eta = lam[0] / (1 - lam[0])
    p = reverse_kl_target(q, forget, lam)
    x = np.random.default_rng(2).normal(size=(30, 2)) * 2
    for ab in (0.9, 0.3, 0.05):
        e_q, e_1 = q.eps(x, ab), forget[0].eps(x, ab)
        np.testing.assert_allclose(p.eps(x, ab), e_q - eta * (e_1 - e_q), atol=1e-12)


@pytest.mark.parametrize("problem, variant", [("reverse_kl", None)] + [("likelihood", v) for v in VARIANTS])
def test_x0_score_of_every_tilt_matches_finite_differences_of_its_log_density(problem, variant):
    q, forget, _ = default_instance()
    lam = {None: 0.4, "likelihood": 30.0, "log_likelihood": 0.5, "likelihood_ratio": 2.0}[variant]
    p = reverse_kl_target(q, forget, [lam]) if problem == "reverse_kl" else likelihood_target(q, forget, [lam], variant)
    x = q.sample(10, np.random.default_rng(3))
    h = 1e-5
    fd = np.stack([(p.log_prob(x + h * e) - p.log_prob(x - h * e)) / (2 * h) for e in np.eye(2)], 1)
    np.testing.assert_allclose(p.score(x), fd, atol=1e-5 * (1 + np.abs(fd).max()))
    tr = sum((p.score(x + h * e)[:, i] - p.score(x - h * e)[:, i]) / (2 * h) for i, e in enumerate(np.eye(2)))
    np.testing.assert_allclose(p.score_divergence(x), tr, atol=1e-4 * (1 + np.abs(tr).max()))


@pytest.mark.parametrize("lam", [0.2, 0.6])
def test_log_likelihood_tilt_of_gaussians_matches_closed_form(lam):
    """q q_1^(-lam) of Gaussians is Gaussian: log Z and E_p[log q_1] in closed form."""
    p = likelihood_target(Q1G, [F1G], [lam], variant="log_likelihood")
    mean, cov, log_Z = gaussian_power_tilt(MU, S, MU1, S1, 1.0, lam)
    assert p.log_normaliser == pytest.approx(log_Z, abs=1e-10)
    # E_p[log q_1] = -KL(p||q_1) - H(p), H(p) = (d/2) log(2 pi e) + log|C| / 2
    h_p = np.log(2 * np.pi * np.e) + 0.5 * np.linalg.slogdet(cov)[1]
    expect = -gaussian_kl(mean, cov, MU1, S1) - h_p
    assert constraint_value("likelihood", p, F1G, variant="log_likelihood") == pytest.approx(expect, abs=1e-9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gibbs_normaliser_and_constraint_match_monte_carlo(variant):
    """Z = E_q[exp(-lam g)] and E_p[g] = E_q[g e^{-lam g}] / Z by plain Monte Carlo from q
    (delta-method standard errors; 5 se)."""
    q, forget, _ = default_instance()
    lam = {"likelihood": 20.0, "log_likelihood": 0.3, "likelihood_ratio": 1.5}[variant]
    p = likelihood_target(q, forget, [lam], variant)
    x = q.sample(400_000, np.random.default_rng(4))
    g = {"likelihood": np.exp(forget[0].log_prob(x)), "log_likelihood": forget[0].log_prob(x),
         "likelihood_ratio": np.exp(forget[0].log_prob(x) - q.log_prob(x))}[variant]
    w = np.exp(-lam * g)
    n = len(w)
    Z = w.mean()
    assert _within(Z, np.exp(p.log_normaliser), w.std() / np.sqrt(n))
    ratio = (w * g).mean() / Z
    se = np.sqrt(np.var(w * g - ratio * w) / n) / Z
    assert _within(ratio, constraint_value("likelihood", p, forget[0], variant=variant, q=q), se)


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
def test_constraint_and_objective_match_monte_carlo_from_target_samples(problem):
    """Quadrature values vs Monte Carlo means over the target's own samples (which also checks the
    samplers: rejection on the quadrature grid for tilts, rejection from the positive part for FU)."""
    q, forget, _ = default_instance()
    f = forget[0]
    lam = {"reverse_kl": 0.3, "forward_kl": 0.2, "likelihood": 20.0}[problem]
    p = {"reverse_kl": reverse_kl_target, "forward_kl": forward_kl_target, "likelihood": likelihood_target}[problem](
        q, forget, [lam])
    rng = np.random.default_rng(5)
    n = 100_000
    if problem == "forward_kl":
        x = f.sample(n, rng)
        v = f.log_prob(x) - p.log_prob(x)
        y = q.sample(n, rng)
        o = q.log_prob(y) - p.log_prob(y)
    else:
        x = p.sample(n, rng)
        v = p.log_prob(x) - f.log_prob(x) if problem == "reverse_kl" else np.exp(f.log_prob(x))
        o = p.log_prob(x) - q.log_prob(x)
    assert _within(v.mean(), constraint_value(problem, p, f), v.std() / np.sqrt(n))
    assert _within(o.mean(), objective_value(problem, p, q), o.std() / np.sqrt(n))


def test_importance_sampled_normaliser_in_3d_matches_closed_form_within_its_error():
    rng = np.random.default_rng(6)
    mu, mu1 = np.array([0.3, 0.0, -0.2]), np.array([-0.5, 0.4, 0.6])
    Sq = np.array([[0.7, 0.1, 0.0], [0.1, 0.5, 0.1], [0.0, 0.1, 0.6]])
    S1_ = 1.3 * np.eye(3)
    lam = 0.25
    eta = lam / (1 - lam)
    p = reverse_kl_target(GaussianMixture([1.0], [mu], [Sq]), [GaussianMixture([1.0], [mu1], [S1_])], [lam], rng=rng)
    _, _, log_Z = gaussian_power_tilt(mu, Sq, mu1, S1_, 1 + eta, eta)
    assert 0 < p.log_normaliser_se < 0.01
    assert abs(p.log_normaliser - log_Z) < 5 * p.log_normaliser_se


def test_forward_kl_target_at_the_removed_weight_is_exact_retraining():
    """SISS / data-unlearning limit: q - w_3 N_3 over 1 - w_3 is the mixture of the other modes."""
    q, forget, _ = default_instance()
    p = forward_kl_target(q, forget, [q.weights[2]])
    retrained = GaussianMixture(q.weights[:2] / q.weights[:2].sum(), q.means[:2], q.covs[:2])
    x = q.sample(100, np.random.default_rng(7))
    for ab in (1.0, 0.4, 0.01):
        np.testing.assert_allclose(p.log_prob(x, ab), retrained.log_prob(x, ab), atol=1e-12)
        np.testing.assert_allclose(p.eps(x, ab), retrained.eps(x, ab), atol=1e-12)


@settings(max_examples=10)
@given(unlearning_instances(), st.floats(0.0, 0.95))
def test_forward_kl_target_is_the_signed_mixture_at_every_noise_level(inst, frac):
    q, forget = inst
    f = forget[0]
    k = int(np.argmin(np.abs(q.means - f.means).sum(1) + np.abs(q.covs - f.covs).sum((1, 2))))
    lam = frac * q.weights[k]
    p = forward_kl_target(q, forget, [lam])
    x = q.sample(20, np.random.default_rng(8))
    for ab in (1.0, 0.5, 0.05):
        dens = (np.exp(q.log_prob(x, ab)) - lam * np.exp(f.log_prob(x, ab))) / (1 - lam)
        np.testing.assert_allclose(np.exp(p.log_prob(x, ab)), dens, rtol=1e-9, atol=1e-300)


# ---- domains and bad input ------------------------------------------------------------------


def test_reverse_kl_domain_with_a_narrow_forget_gaussian():
    """A forget Gaussian narrower than q caps eta at 1 / max gen-eig(P_1 - P, P) (closed form here:
    q = N(0, I), q_1 = N(0, I/4): (1+eta) - 4 eta > 0 iff eta < 1/3, i.e. lam < 1/4)."""
    q = GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)])
    f = GaussianMixture([1.0], [[0.5, 0.0]], [0.25 * np.eye(2)])
    assert reverse_kl_eta_max(q, f) == pytest.approx(1 / 3, rel=1e-12)
    p = reverse_kl_target(q, [f], [0.24])
    assert np.isfinite(p.log_normaliser)
    with pytest.raises(ValueError, match=r"infinite normaliser.*lam < 0\.25\b"):
        reverse_kl_target(q, [f], [0.26])


def test_bad_multipliers_and_instances_are_rejected_with_the_value():
    q, forget, _ = default_instance()
    with pytest.raises(ValueError, match=r"sum\(lam\) < 1, got 1"):
        reverse_kl_target(q, forget, [1.0])
    with pytest.raises(ValueError, match="finite"):
        reverse_kl_target(q, forget, [np.nan])
    with pytest.raises(ValueError, match=">= 0"):
        likelihood_target(q, forget, [-1.0])
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        forward_kl_target(q, forget, [0.1, 0.1])
    with pytest.raises(ValueError, match="dual domain"):
        forward_kl_target(q, forget, [0.31])
    with pytest.raises(ValueError, match="dimension"):
        reverse_kl_target(q, [GaussianMixture([1.0], [[0.0, 0.0, 0.0]], [np.eye(3)])], [0.1])
    with pytest.raises(ValueError, match="variant"):
        likelihood_target(q, forget, [1.0], variant="loglik")
    with pytest.raises(ValueError, match="infinite normaliser"):
        likelihood_target(q, forget, [1.5], variant="log_likelihood")


@settings(max_examples=10)
@given(st.data())
def test_reverse_kl_tilt_of_equal_covariance_gaussians_is_a_shift(data):
    """Equal covariances: the tilt is N(mu + eta (mu - mu_1), S) exactly (eq. 7 of ``docs/math.md``, closed form)."""
    Sx = data.draw(covariances(2))
    mu = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=2, max_size=2)))
    mu1 = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=2, max_size=2)))
    lam = data.draw(st.floats(0.0, 0.6))
    eta = lam / (1 - lam)
    p = reverse_kl_target(GaussianMixture([1.0], [mu], [Sx]), [GaussianMixture([1.0], [mu1], [Sx])], [lam])
    shifted = GaussianMixture([1.0], [mu + eta * (mu - mu1)], [Sx])
    x = shifted.sample(10, np.random.default_rng(9))
    np.testing.assert_allclose(p.log_prob(x), shifted.log_prob(x), atol=1e-9)


def test_tail_margin_by_directions_equals_the_eigenvalue_formula():
    """The d <= 2 direction sweep (used for mixture forget sets) against the exact generalised-
    eigenvalue margin (single Gaussians): duplicate the forget Gaussian into a two-component
    mixture to force the direction path."""
    from theory.gmm.targets import log_tilt_tail_margin

    q, _, _ = default_instance()
    f = GaussianMixture([1.0], [[0.3, 1.0]], [[[0.3, 0.1], [0.1, 0.2]]])
    f2 = GaussianMixture([0.5, 0.5], [[0.3, 1.0], [0.3, 1.0001]], [f.covs[0], f.covs[0]])
    for a, c in ((1.2, 0.2), (1.5, 0.5), (3.0, 2.0)):
        exact = log_tilt_tail_margin(q, [f], a, np.array([c]))
        swept = log_tilt_tail_margin(q, [f2], a, np.array([c]))
        assert swept == pytest.approx(exact, abs=1e-5 * max(1, abs(exact)))


def test_constraint_values_in_3d_are_monte_carlo_within_their_error():
    rng = np.random.default_rng(12)
    mu, mu1 = np.array([0.3, 0.0, -0.2]), np.array([-0.5, 0.4, 0.6])
    Sq, S1_ = np.diag([0.7, 0.5, 0.6]), 1.3 * np.eye(3)
    q3, f3 = GaussianMixture([1.0], [mu], [Sq]), GaussianMixture([1.0], [mu1], [S1_])
    lam = 0.25
    eta = lam / (1 - lam)
    p = reverse_kl_target(q3, [f3], [lam], rng=rng)
    mean, cov, _ = gaussian_power_tilt(mu, Sq, mu1, S1_, 1 + eta, eta)
    exact = gaussian_kl(mean, cov, mu1, S1_)
    # self-normalised importance sampling (proposal q with doubled covariances): its standard error
    # from 6 independent replicates; the mean must sit within 5 of them (plus log Z's own error)
    reps = np.array([constraint_value("reverse_kl", p, f3, rng=rng, n_mc=100_000) for _ in range(6)])
    se = reps.std(ddof=1) / np.sqrt(len(reps))
    assert abs(reps.mean() - exact) < 5 * se + 5 * p.log_normaliser_se
    pf = forward_kl_target(q3, [GaussianMixture([1.0], [mu], [0.5 * Sq])], [0.2])
    x = GaussianMixture([1.0], [mu], [0.5 * Sq]).sample(400_000, rng)
    v = GaussianMixture([1.0], [mu], [0.5 * Sq]).log_prob(x) - pf.log_prob(x)
    assert constraint_value("forward_kl", pf, GaussianMixture([1.0], [mu], [0.5 * Sq]), rng=rng) == pytest.approx(
        v.mean(), abs=5 * v.std() / np.sqrt(len(v)) * np.sqrt(2))


@pytest.mark.parametrize("problem", ["reverse_kl", "likelihood"])
def test_reweighted_dsm_weights_have_unit_mean_under_q_and_reweight_q_into_the_tilt(problem):
    """E_q[w] = 1 and E_q[w f] = E_p[f] (f = x and r_forget) by Monte Carlo from q, 5 se."""
    q, forget, _ = default_instance()
    p = reverse_kl_target(q, forget, [0.2]) if problem == "reverse_kl" else likelihood_target(q, forget, [20.0])
    x = q.sample(400_000, np.random.default_rng(13))
    w = np.exp(p.log_weight(x))
    n = len(w)
    assert _within(w.mean(), 1.0, w.std() / np.sqrt(n))
    for i in range(2):
        v = w * x[:, i]
        assert _within(v.mean(), p.expect(lambda y: y[:, i]), v.std() / np.sqrt(n))
    if problem == "likelihood":
        assert np.all(p.log_weight(x) <= -p.log_normaliser + 1e-12)
