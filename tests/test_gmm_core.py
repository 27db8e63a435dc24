"""Gaussian and signed mixtures under diffusion: every exact quantity against an independent one
(finite differences of log-densities, diffusers' scheduler, Monte Carlo, brute-force grids)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from theory.diffusion import alphas_cumprod_for_schedule
from theory.gmm import GaussianMixture, SignedMixture, default_instance, min_log_ratio
from tests.strategies import alpha_bars, gaussian_mixtures

H = 1e-5


def _fd_grad(f, x):
    return np.stack([(f(x + H * e) - f(x - H * e)) / (2 * H) for e in np.eye(x.shape[1])], 1)


@given(gaussian_mixtures(d=2), alpha_bars, st.integers(0, 2 ** 31))
@example(GaussianMixture([1.0], [[0.0, 0.0]], [np.eye(2)]), 1.0, 0)
def test_noised_score_matches_finite_differences_of_noised_log_density(g, ab, seed):
    x = g.noised(ab).sample(6, np.random.default_rng(seed))
    fd = _fd_grad(lambda y: g.log_prob(y, ab), x)
    # central differences: error ~ h^2 |d3 log p| + eps/h; 1e-5 leaves ~1e-6 for these curvatures
    np.testing.assert_allclose(g.score(x, ab), fd, atol=2e-5 * (1 + np.abs(fd).max()))


@given(gaussian_mixtures(d=2), alpha_bars, st.integers(0, 2 ** 31))
def test_score_divergence_matches_finite_differences_of_score(g, ab, seed):
    x = g.noised(ab).sample(5, np.random.default_rng(seed))
    jac_trace = sum((g.score(x + H * e, ab)[:, i] - g.score(x - H * e, ab)[:, i]) / (2 * H)
                    for i, e in enumerate(np.eye(2)))
    np.testing.assert_allclose(g.score_divergence(x, ab), jac_trace, atol=1e-5 * (1 + np.abs(jac_trace).max()))


def test_eps_is_tweedie_posterior_noise_by_monte_carlo():
    """E[z | x_t] for one Gaussian component, computed by conditioning the joint (x_0, z) law on a
    thin shell around x_t, agrees with ``eps``; here by the exact Gaussian conditional instead:
    for N(mu, S), E[z | x_t] = sqrt(1-ab) (ab S + (1-ab) I)^{-1} (x_t - sqrt(ab) mu)."""
    mu, S = np.array([1.0, -0.5]), np.array([[0.7, 0.2], [0.2, 0.4]])
    g = GaussianMixture([1.0], [mu], [S])
    x = np.random.default_rng(0).normal(size=(4, 2))
    for ab in (0.9, 0.3, 0.01):
        cov_t = ab * S + (1 - ab) * np.eye(2)
        expect = np.sqrt(1 - ab) * np.linalg.solve(cov_t, (x - np.sqrt(ab) * mu).T).T
        np.testing.assert_allclose(g.eps(x, ab), expect, atol=1e-12)


def test_noised_mixture_matches_monte_carlo_forward_process():
    """Sampling x_0 ~ q and noising it gives the law q.noised(ab): moments within 5 standard errors."""
    q, _, _ = default_instance()
    rng = np.random.default_rng(1)
    n, ab = 200_000, 0.4
    x_t = np.sqrt(ab) * q.sample(n, rng) + np.sqrt(1 - ab) * rng.standard_normal((n, 2))
    qt = q.noised(ab)
    m_exact = qt.weights @ qt.means
    se = x_t.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(x_t.mean(axis=0) - m_exact) < 5 * se)
    # E_{q_t}[score] = 0 (integration by parts) — within 5 standard errors
    s = qt.score(x_t[:50_000])
    assert np.all(np.abs(s.mean(axis=0)) < 5 * s.std(axis=0) / np.sqrt(50_000))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_matches_diffusers_ddpm_scheduler(schedule):
    diffusers = pytest.importorskip("diffusers")
    from theory.diffusion import betas_for_schedule

    T = 1000
    sch = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
    # diffusers builds betas in float32: torch.linspace evaluates start + i * step there (up to ~4
    # roundings of relative size 2^-24); scaled_linear squares that (2 * 4 + 1 roundings);
    # squaredcos is computed in float64 and cast once
    ulps = {"linear": 4, "scaled_linear": 9, "squaredcos_cap_v2": 1}[schedule]
    np.testing.assert_allclose(betas_for_schedule(T, schedule=schedule), sch.betas.double().numpy(),
                               rtol=ulps * 2 ** -24)
    ours = alphas_cumprod_for_schedule(T, schedule=schedule)
    # alpha = 1 - beta in float32 turns a relative beta error r into r * beta / alpha (+ 1 rounding);
    # products add relative errors, so up to step t the bound is the cumulative sum
    u = 2.0 ** -24
    beta = betas_for_schedule(T, schedule=schedule)
    bound = np.cumsum((ulps * beta / (1 - beta) + 1) * u)
    np.testing.assert_array_less(np.abs(ours / np.cumprod(sch.alphas.double().numpy()) - 1), bound)
    # diffusers' own float32 cumprod adds one rounding per step
    np.testing.assert_array_less(np.abs(ours / sch.alphas_cumprod.double().numpy() - 1),
                                 bound + u * np.arange(1, T + 1))


def test_eps_along_diffusers_schedule_is_finite_and_matches_noised_score():
    q, _, _ = default_instance()
    ab = alphas_cumprod_for_schedule(1000)
    rng = np.random.default_rng(2)
    t = rng.integers(0, 1000, size=64)
    x = rng.normal(size=(64, 2))
    e = q.eps(x, ab[t])
    per = np.stack([q.eps(x[i:i + 1], ab[t[i]])[0] for i in range(64)])
    np.testing.assert_allclose(e, per, atol=1e-14)
    assert np.all(np.isfinite(e))


# ---- signed mixtures --------------------------------------------------------------------------


def test_signed_mixture_merges_a_removed_component_exactly():
    q, forget, _ = default_instance()
    lam = 0.2
    w = np.concatenate([q.weights, [-lam]]) / (1 - lam)
    s = SignedMixture(w, np.concatenate([q.means, forget[0].means]), np.concatenate([q.covs, forget[0].covs]))
    assert s.n_components == 3
    np.testing.assert_allclose(s.weights, [0.35 / 0.8, 0.35 / 0.8, 0.1 / 0.8])
    x = q.sample(50, np.random.default_rng(0))
    ref = GaussianMixture(s.weights, s.means, s.covs)
    for ab in (1.0, 0.5, 0.02):
        np.testing.assert_allclose(s.log_prob(x, ab), ref.log_prob(x, ab), atol=1e-12)
        np.testing.assert_allclose(s.eps(x, ab), ref.eps(x, ab), atol=1e-12)


def _wide_minus_narrow(lam):
    """N(0, 2I) - lam N(0.3, 0.5 I) (over 1 - lam): non-negative iff lam <= min ratio."""
    return SignedMixture(np.array([1.0, -lam]) / (1 - lam), [[0.0, 0.0], [0.3, 0.0]], [2 * np.eye(2), 0.5 * np.eye(2)])


def test_signed_mixture_nonnegativity_threshold_matches_brute_force_grid():
    num = GaussianMixture([1.0], [[0.0, 0.0]], [2 * np.eye(2)])
    den = GaussianMixture([1.0], [[0.3, 0.0]], [0.5 * np.eye(2)])
    x = np.stack(np.meshgrid(np.linspace(-6, 6, 1201), np.linspace(-6, 6, 1201)), -1).reshape(-1, 2)
    brute = (num.log_prob(x) - den.log_prob(x)).min()
    assert min_log_ratio(num, den) == pytest.approx(brute, abs=1e-4)
    lam_max = np.exp(brute)
    _wide_minus_narrow(0.999 * lam_max)
    with pytest.raises(ValueError, match="goes negative"):
        _wide_minus_narrow(1.001 * lam_max)


def test_signed_mixture_with_heavier_negative_tail_is_rejected():
    with pytest.raises(ValueError, match="goes negative"):
        SignedMixture([2.0, -1.0], [[0.0, 0.0], [0.0, 0.0]], [np.eye(2), np.diag([1.0, 1.2])])


@given(st.floats(0.05, 0.95), alpha_bars, st.integers(0, 2 ** 31))
def test_signed_mixture_score_and_divergence_match_finite_differences(lam_frac, ab, seed):
    num = GaussianMixture([1.0], [[0.0, 0.0]], [2 * np.eye(2)])
    den = GaussianMixture([1.0], [[0.3, 0.0]], [0.5 * np.eye(2)])
    s = _wide_minus_narrow(lam_frac * np.exp(min_log_ratio(num, den)))
    x = np.random.default_rng(seed).normal(size=(5, 2)) * 1.5
    fd = _fd_grad(lambda y: s.log_prob(y, ab), x)
    np.testing.assert_allclose(s.score(x, ab), fd, atol=1e-5 * (1 + np.abs(fd).max()))
    tr = sum((s.score(x + H * e, ab)[:, i] - s.score(x - H * e, ab)[:, i]) / (2 * H) for i, e in enumerate(np.eye(2)))
    np.testing.assert_allclose(s.score_divergence(x, ab), tr, atol=1e-4 * (1 + np.abs(tr).max()))


def test_signed_mixture_sampling_matches_its_moments():
    """Rejection sampling: mean and second moment within 5 standard errors of the closed form."""
    s = _wide_minus_narrow(0.2)
    x = s.sample(100_000, np.random.default_rng(3))
    m = s.weights @ s.means
    m2 = np.einsum("k,kij->ij", s.weights, s.covs + np.einsum("ki,kj->kij", s.means, s.means))
    assert np.all(np.abs(x.mean(0) - m) < 5 * x.std(0) / np.sqrt(len(x)))
    emp2 = np.einsum("ni,nj->nij", x, x)
    assert np.all(np.abs(emp2.mean(0) - m2) < 5 * emp2.std(0) / np.sqrt(len(x)))


def test_signed_mixture_integrates_to_one_and_stays_nonnegative_when_noised():
    from theory.gmm.quadrature import grid_for, log_integral

    s = _wide_minus_narrow(0.2)
    for ab in (1.0, 0.5, 0.05):
        st_ = s.noised(ab)
        g = grid_for(st_)
        lp = st_.log_prob(g.nodes)
        assert np.all(np.isfinite(lp))
        assert log_integral(lp, g) == pytest.approx(0.0, abs=1e-10)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, msg", [
    (dict(weights=[0.5, 0.4], means=[[0, 0], [1, 1]], covs=[np.eye(2)] * 2), "sum to 1"),
    (dict(weights=[0.5, 0.5], means=[[0, 0], [1, np.nan]], covs=[np.eye(2)] * 2), "finite"),
    (dict(weights=[0.5, 0.5], means=[[0, 0], [1, 1]], covs=[np.eye(2), [[1, 2], [2, 1]]]), "positive definite"),
    (dict(weights=[0.5, 0.5], means=[[0, 0], [1, 1]], covs=[np.eye(2), np.eye(3)]), "shape"),
    (dict(weights=[0.5, 0.5], means=[[0, 0, 0], [1, 1, 1]], covs=[np.eye(2)] * 2), "shape"),
    (dict(weights=[1.5, -0.5], means=[[0, 0], [1, 1]], covs=[np.eye(2)] * 2), "positive"),
])
def test_gaussian_mixture_rejects_bad_input_with_the_value(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GaussianMixture(**kwargs)


def test_bad_alpha_bar_and_points_are_rejected():
    q, _, _ = default_instance()
    with pytest.raises(ValueError, match="alpha_bar"):
        q.eps(np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match="alpha_bar"):
        q.score(np.zeros((2, 2)), np.nan)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        q.log_prob(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x must be finite, got \[nan\]"):
        q.eps(np.array([[0.0, np.nan]]), 0.5)


@settings(max_examples=10)
@given(gaussian_mixtures(d=3, k_max=2), st.floats(0.05, 1.0), st.integers(0, 2 ** 31))
def test_stein_identities_hold_under_sampling_in_3d(g, ab, seed):
    """Integration by parts: E_{q_t}[score] = 0 and E_{q_t}[div score + |score|^2] = E[Lap q_t / q_t] = 0,
    each within 6 standard errors of n = 20000 samples of the noised law (sample, score and
    score_divergence checked together)."""
    x = g.noised(ab).sample(20_000, np.random.default_rng(seed))
    s = g.score(x, ab)
    stein = g.score_divergence(x, ab) + np.sum(s * s, axis=1)
    n = x.shape[0]
    assert np.all(np.abs(s.mean(0)) < 6 * s.std(0) / np.sqrt(n))
    assert abs(stein.mean()) < 6 * stein.std() / np.sqrt(n)


@settings(max_examples=15)
@given(gaussian_mixtures(d=2, k_min=1, k_max=3), st.integers(0, 2), st.floats(0.2, 0.8))
def test_min_log_ratio_is_below_every_grid_value_and_close_to_the_grid_minimum(q, j, shrink):
    """A forget Gaussian narrower than one of q's components: the infimum of log q/q_1 is attained
    inside; it can never exceed q/q_1 at any point, and a fine brute-force grid gets within 1e-3."""
    j = j % q.n_components
    f = GaussianMixture([1.0], q.means[j:j + 1], shrink * q.covs[j:j + 1])
    m = min_log_ratio(q, f)
    lo, hi = f.box(6.0)
    xs = [np.linspace(lo[i], hi[i], 700) for i in range(2)]
    x = np.stack(np.meshgrid(*xs), -1).reshape(-1, 2)
    vals = q.log_prob(x) - f.log_prob(x)
    assert m <= vals.min() + 1e-9
    assert vals.min() - m < 1e-3 * (1 + abs(m))


def test_min_log_ratio_is_minus_infinity_when_the_denominator_has_the_heavier_tail():
    q = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [np.eye(2), np.diag([1.0, 0.5])])
    f = GaussianMixture([1.0], [[0.0, 0.0]], [np.diag([0.5, 1.2])])  # wider than both along y
    assert min_log_ratio(q, f) == -np.inf


def test_gaussian_mixture_noised_score_matches_finite_differences():
    g = GaussianMixture([0.3, 0.7], [[0.0, 0.0], [3.0, 1.0]], [np.eye(2), [[2.0, 0.5], [0.5, 1.0]]])
    x = np.random.default_rng(0).normal(size=(7, 2))
    for ab in (1.0, 0.3, 0.01):
        h = 1e-6
        fd = np.stack([(g.log_prob(x + h * e, ab) - g.log_prob(x - h * e, ab)) / (2 * h) for e in np.eye(2)], 1)
        np.testing.assert_allclose(g.score(x, ab), fd, atol=1e-6)
        np.testing.assert_allclose(g.noised(ab).log_prob(x), g.log_prob(x, ab), atol=1e-12)


def test_responsibilities_are_component_posteriors_computed_with_scipy():
    from scipy.stats import multivariate_normal

    g = GaussianMixture([0.2, 0.5, 0.3], [[0.0, 0.0], [2.0, 1.0], [-1.0, 2.0]],
                        [np.eye(2), [[1.5, 0.4], [0.4, 0.7]], 0.5 * np.eye(2)])
    x = np.random.default_rng(1).normal(size=(9, 2)) * 2
    for ab in (1.0, 0.4):
        dens = np.stack([w * multivariate_normal(np.sqrt(ab) * mu, ab * np.asarray(S) + (1 - ab) * np.eye(2)).pdf(x)
                         for w, mu, S in zip(g.weights, g.means, g.covs)], axis=1)
        np.testing.assert_allclose(g.responsibilities(x, ab), dens / dens.sum(1, keepdims=True), rtol=1e-10)
