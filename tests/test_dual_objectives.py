"""The shared dual step and score-space objectives (toy.core.dual, toy.core.objectives) against independent
computations: cvxpy for the projection, closed-form Gaussian tilts for the composed target, and the
Gaussian KL of two DDPM reverse steps for the path-KL weights."""

import cvxpy as cp
import numpy as np
import pytest
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from theory.gmm import GaussianMixture
from toy.core.dual import DualState, constraint_violation, dual_ascent_step, dual_domain, project_multipliers
from toy.core.objectives import composed_eps_target, eta_from_lam, lam_from_eta, path_kl_estimate, signed_denoising_objective
from toy.core.diffusion import reverse_step_kl_weights


@pytest.mark.parametrize("seed", range(8))
def test_projection_matches_cvxpy(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 6))
    v = rng.normal(0.3, 1.0, m)
    upper = rng.uniform(0.05, 1.0, m) if seed % 2 else None
    sum_max = float(rng.uniform(0.1, 1.0))
    x = cp.Variable(m)
    cons = [x >= 0, cp.sum(x) <= sum_max] + ([x <= upper] if upper is not None else [])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - v)), cons)
    prob.solve(solver=cp.CLARABEL)
    assert prob.status == cp.OPTIMAL
    got = project_multipliers(torch.tensor(v, dtype=torch.float64),
                              None if upper is None else torch.tensor(upper), sum_max)
    np.testing.assert_allclose(got.numpy(), x.value, atol=1e-7)


def test_violation_signs_follow_the_constraint_direction():
    b = torch.tensor([1.0])
    assert constraint_violation("reverse_kl", torch.tensor([2.0]), b) < 0  # KL above budget: feasible
    assert constraint_violation("forward_kl", torch.tensor([0.5]), b) > 0
    assert constraint_violation("likelihood", torch.tensor([0.5]), b) < 0  # likelihood below eps
    with pytest.raises(ValueError, match="problem"):
        constraint_violation("kl", torch.tensor([1.0]), b)


def test_dual_ascent_is_fixed_at_zero_violation_and_projects():
    lam = torch.tensor([0.2, 0.3], dtype=torch.float64)
    assert torch.equal(dual_ascent_step(lam, torch.zeros(2), 0.5), lam)
    out = dual_ascent_step(lam, torch.tensor([-10.0, 10.0]), 1.0, sum_max=0.9)
    assert out[0] == 0 and abs(float(out.sum()) - 0.9) < 1e-12


def test_dual_state_round_trips_and_stops_on_divergence():
    s = DualState("forward_kl", [1.0, 2.0], lr_dual=0.1, upper=[0.25, 0.25])
    s.step([0.0, 0.0])
    np.testing.assert_allclose(s.lam.numpy(), [0.1, 0.2])
    s.step([0.0, 0.0])
    np.testing.assert_allclose(s.lam.numpy(), [0.2, 0.25])  # capped at 1/n = 0.25
    t = DualState("forward_kl", [1.0, 2.0], lr_dual=0.1)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.lam, s.lam) and t.steps == 2
    with pytest.raises(FloatingPointError, match="step"):
        s.step([float("nan"), 0.0])
    big = DualState("likelihood", [0.0], lr_dual=1.0, max_lam=10.0)
    with pytest.raises(FloatingPointError, match="diverged"):
        big.step([100.0])


def test_eta_and_lam_are_inverse_and_esd_defaults_map_below_one():
    eta = torch.tensor([1.0, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(eta_from_lam(lam_from_eta(eta)).numpy(), eta.numpy())
    assert float(lam_from_eta(torch.tensor([1.0]))) == 0.5
    with pytest.raises(ValueError, match="sum"):
        eta_from_lam(torch.tensor([0.6, 0.5]))


@pytest.mark.parametrize("alpha_bar", [1.0 - 1e-12, 0.7, 0.05])
def test_composed_target_equals_exact_noised_tilt_for_equal_covariance_gaussians(alpha_bar):
    # q = N(0, s2 I), q1 = N(mu, s2 I): the tilt q (q/q1)^eta = N(-eta mu, s2 I), whose noised law is
    # N(-eta sqrt(ab) mu, (ab s2 + 1 - ab) I) -- and the composed score is exactly its score.
    s2, eta, mu = 0.5, 0.8, np.array([2.0, -1.0])
    q = GaussianMixture([1.0], [[0.0, 0.0]], [s2 * np.eye(2)])
    q1 = GaussianMixture([1.0], [mu], [s2 * np.eye(2)])
    tilt = GaussianMixture([1.0], [-eta * mu], [s2 * np.eye(2)])
    x = np.random.default_rng(1).normal(size=(16, 2))
    got = composed_eps_target(torch.tensor(q.eps(x, alpha_bar)), torch.tensor(q1.eps(x, alpha_bar))[None],
                              torch.tensor([eta], dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), tilt.eps(x, alpha_bar), rtol=1e-10, atol=1e-10)


def test_reverse_step_kl_weights_equal_gaussian_kl_of_reverse_steps():
    ab = torch.tensor(alphas_cumprod_for_schedule(50, 1e-3, 0.2))
    w = reverse_step_kl_weights(ab)
    rng = np.random.default_rng(0)
    ab_prev = np.concatenate([[1.0], ab.numpy()[:-1]])
    for t in (0, 7, 49):
        alpha, abar = ab.numpy()[t] / ab_prev[t], ab.numpy()[t]
        beta = 1 - alpha
        x, e1, e2 = rng.normal(size=(3, 4))
        mean = lambda e: (x - beta / np.sqrt(1 - abar) * e) / np.sqrt(alpha)  # noqa: E731
        kl = np.sum((mean(e1) - mean(e2)) ** 2) / (2 * beta)  # KL(N(m1, beta I) || N(m2, beta I))
        np.testing.assert_allclose(float(w[t]) * np.sum((e1 - e2) ** 2), kl, rtol=1e-10)


def test_path_kl_estimate_sums_weighted_squared_differences():
    eps_p, eps_q = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0)).unbind(0)[:2]
    eps_p, eps_q = eps_p.reshape(5, 1, 2), eps_q.reshape(5, 1, 2)
    w = torch.arange(1.0, 6.0)
    expect = sum(w[s] * ((eps_p[s] - eps_q[s]) ** 2).sum() for s in range(5))
    torch.testing.assert_close(path_kl_estimate(eps_p, eps_q, w), expect)


def test_signed_objective_is_retain_minus_weighted_forget():
    val = signed_denoising_objective(torch.tensor(2.0), torch.tensor([1.0, 3.0]), torch.tensor([0.1, 0.2]))
    assert abs(float(val) - (2.0 - 0.1 - 0.6)) < 1e-6


def test_log_ratio_estimator_averages_over_uniform_t_to_the_elbo_difference():
    # With t uniform on the T steps, E_t[T w_t (l_ref,t - l_cond,t)] = sum_t w_t (l_ref,t - l_cond,t),
    # the difference of the two negative ELBOs whose per-step terms reverse_step_kl_weights gives
    # (checked against the Gaussian KL of reverse steps above).
    from toy.core.objectives import log_ratio_from_denoising_losses

    ab = torch.tensor(alphas_cumprod_for_schedule(40, 1e-3, 0.2))
    w = reverse_step_kl_weights(ab)
    g = torch.Generator().manual_seed(0)
    l_cond, l_ref = torch.rand(40, generator=g), torch.rand(40, generator=g)
    per_t = log_ratio_from_denoising_losses(l_cond, l_ref, w, 40)
    expect = (w * (l_ref.double() - l_cond.double())).sum()
    torch.testing.assert_close(per_t.double().mean(), expect, rtol=1e-5, atol=1e-7)


def test_log_violation_has_the_linear_ones_sign_and_zero_and_validates():
    lin = DualState("likelihood", [0.004, 0.02], lr_dual=1.0)
    log = DualState("likelihood", [0.004, 0.02], lr_dual=1.0, violation_scale="log")
    for measured in ([0.004, 0.02], [0.04, 0.001], [0.001, 0.2]):
        v_lin, v_log = lin.violation(measured), log.violation(measured)
        assert torch.equal(torch.sign(v_lin), torch.sign(v_log))
    np.testing.assert_allclose(log.violation([0.04, 0.002]).numpy(), [np.log(10.0), np.log(0.1)])
    with pytest.raises(ValueError, match="positive constraint estimates"):
        log.violation([0.0, 0.01])
    with pytest.raises(ValueError, match="upper-bounded"):
        DualState("reverse_kl", [12.0], lr_dual=1.0, violation_scale="log")
    with pytest.raises(ValueError, match="violation_scale"):
        DualState("likelihood", [0.004], lr_dual=1.0, violation_scale="sqrt")
    # the scale is part of the checkpointed state; states saved before it existed load as linear
    state = log.state_dict()
    other = DualState("likelihood", [0.004, 0.02], lr_dual=1.0)
    other.load_state_dict(state)
    assert other.violation_scale == "log"
    del state["violation_scale"]
    other.load_state_dict(state)
    assert other.violation_scale == "linear"


def test_log_violation_delta_correction_removes_the_jensen_bias_of_log_mean():
    """Monte Carlo (independent of the formula): means of n = 128 draws of a lognormal with
    CV^2 = 9 (the LU constraint function's spread at the default budget). E[log mean] sits below
    log E by about se^2 / (2 mu^2) = 9 / 256 = 0.035; the corrected violation must be unbiased to
    within the Monte Carlo error and at least 4x less biased than the plain log."""
    rng = np.random.default_rng(0)
    cv2, n, reps, mu = 9.0, 128, 20000, 0.004
    s2 = np.log1p(cv2)
    x = rng.lognormal(np.log(mu) - s2 / 2, np.sqrt(s2), size=(reps, n))
    m, se = x.mean(1), x.std(1, ddof=1) / np.sqrt(n)
    dual = DualState("likelihood", [mu], lr_dual=1.0, violation_scale="log")
    plain = np.array([float(dual.violation([mi])) for mi in m[:4000]])
    corrected = np.array([float(dual.violation([mi], [si])) for mi, si in zip(m[:4000], se[:4000])])
    mc = 3 * corrected.std() / np.sqrt(corrected.size)
    assert abs(plain.mean()) > 0.02  # the bias the correction is for
    assert abs(corrected.mean()) <= max(mc, abs(plain.mean()) / 4)


def _delayed_dual_run(gain, delay, steps=600, seed=0, noise=0.0):
    """Newton-scaled dual ascent in log scale on a plant ``log C(lam) = log b - s (lam - lam*)``
    measured ``delay`` dual steps late (plus optional noise), from lam = 0 (C = 10 b)."""
    rng = np.random.default_rng(seed)
    s, lam_star, b = np.log(10.0) / 20.0, 20.0, 0.004
    dual = DualState("likelihood", [b], lr_dual=gain / s, violation_scale="log")
    lams = [0.0]
    for k in range(steps):
        seen = lams[max(0, k - delay)]
        c = b * np.exp(-s * (seen - lam_star) + noise * rng.standard_normal())
        dual.step([c])
        lams.append(float(dual.lam[0]))
    return np.array(lams), lam_star


def test_delay_limited_gain_keeps_the_delayed_dual_ascent_stable_where_the_undelayed_gain_is_not():
    """The rule behind ``toy.config.delay_limited_gain``: integral control of gain k with a pure delay
    of D steps has phase margin pi/2 - k D; k D = pi/6 converges without sustained oscillation,
    while the undelayed gain 0.3 at D = 16 is unstable (simulated, not derived)."""
    from toy.config import DUAL_GAIN
    d = 16
    lam_ok, lam_star = _delayed_dual_run((np.pi / 6) / d, d)
    assert abs(lam_ok[-100:] - lam_star).max() < 0.01 * lam_star
    assert lam_ok.max() < 1.5 * lam_star  # a bounded overshoot
    lam_bad, _ = _delayed_dual_run(DUAL_GAIN["likelihood"], d)
    assert np.ptp(lam_bad[-100:]) > 0.5 * lam_star  # sustained oscillation
    # with noise, the limited gain still averages to lam*
    lam_noisy, _ = _delayed_dual_run((np.pi / 6) / d, d, steps=1500, noise=0.5)
    assert abs(lam_noisy[-500:].mean() - lam_star) < 0.05 * lam_star


def test_lu_pool_gain_follows_the_estimate_delay():
    """``resolve`` derives LU's pool (2 T chains) and its delay-limited gain; fresh estimates and RU
    keep the problem's undelayed gain."""
    from toy.config import DUAL_GAIN, ToyConfig, estimate_delay, override, resolve
    lu = resolve(ToyConfig(problem="likelihood"))
    assert lu.train.pool_chains == 2 * lu.diffusion.num_timesteps
    # chain life T x pool_every / 2 = 200 steps, plus half the 128-end-point window at k = 2 per advance
    d = (100 * 4 / 2 + (128 / 2) * 4 / 2) / 20
    assert estimate_delay(lu) == pytest.approx(d)
    assert lu.dual.gain == pytest.approx((np.pi / 6) / d)
    for cfg in (override(ToyConfig(problem="likelihood"), {"train.estimate": "fresh"}), ToyConfig(problem="reverse_kl")):
        cfg = resolve(cfg)
        assert estimate_delay(cfg) == 0 and cfg.dual.gain == DUAL_GAIN[cfg.problem]


@pytest.mark.parametrize("n, k", [(5, 1), (7, 3)])
def test_fu_data_domain_ends_where_the_signed_mixture_is_retraining(n, k):
    """eq. 14: on n training points with k forget points, lam_i = 1/n is the end of the FU domain and
    its signed mixture (eq. 12) is the uniform law on the kept points; a step past it goes negative."""
    upper = np.asarray(dual_domain("forward_kl", k, n_train=n).upper)
    q = np.full(n, 1.0 / n)
    forget = np.eye(n)[:k]  # delta at the first k points

    def signed_mixture(lam):
        w = q - lam @ forget
        return w / (1.0 - lam.sum())

    np.testing.assert_allclose(signed_mixture(upper), np.r_[np.zeros(k), np.full(n - k, 1.0 / (n - k))], atol=1e-15)
    past = upper.copy()
    past[0] *= 1.0 + 1e-6
    assert signed_mixture(past).min() < 0
    assert dual_domain("forward_kl", k, upper=[0.2] * k).upper == (0.2,) * k


def test_ru_domain_keeps_the_tilt_defined_and_lu_is_the_orthant():
    dom = dual_domain("reverse_kl", 3)
    lam = project_multipliers(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), dom.upper, dom.sum_max)
    assert abs(float(lam.sum()) - 0.95) < 1e-9 and float(lam.sum()) < 1.0  # eta = lam/(1 - sum lam) finite
    assert dual_domain("likelihood", 2) == type(dom)()
    for bad in [dict(problem="reverse_kl", m=1, ru_sum_max=1.0), dict(problem="forward_kl", m=1),
                dict(problem="forward_kl", m=1, n_train=0), dict(problem="forward_kl", m=2, upper=[0.1]),
                dict(problem="kl", m=1), dict(problem="likelihood", m=0)]:
        with pytest.raises(ValueError):
            dual_domain(**bad)


def test_dual_update_is_violation_then_scale_then_project_written_out():
    """The composable pieces give ``proj(lam + lr * v)`` with v written out per problem (RU/FU
    ``b - measured``, LU ``measured - b``, LU log scale ``log m - log b + se^2 / (2 m^2)``) and the
    projection onto the problem's domain; a state that drops a piece (scale or project) fails."""
    from toy.core.dual import DualUpdate, Project, ScaleBy, Violation, dual_update
    lam = torch.tensor([0.3, 0.1], dtype=torch.float64)
    # RU: violation b - m = [2, -1], step 0.1 -> [0.5, 0.0]; sum 0.5 <= 0.95, box [0, inf)
    up = dual_update("reverse_kl", [5.0, 3.0], 0.1, sum_max=0.95)
    new, v = up(lam, [3.0, 4.0])
    np.testing.assert_allclose(v.numpy(), [2.0, -1.0])
    np.testing.assert_allclose(new.numpy(), [0.5, 0.0], atol=1e-15)
    # the sum bound binds: [0.3 + 1.0, 0.1 + 0.5] = [1.3, 0.6] -> shift tau with sum = 0.95: tau = 0.475
    new, _ = dual_update("reverse_kl", [5.0, 3.0], 0.5, sum_max=0.95)(lam, [3.0, 2.0])
    np.testing.assert_allclose(new.numpy(), [1.3 - 0.475, 0.6 - 0.475], atol=1e-9)
    # LU: m - b, and the log scale with the Jensen correction
    new, v = dual_update("likelihood", [0.5, 0.5], 2.0)(lam, [1.0, 0.25])
    np.testing.assert_allclose(v.numpy(), [0.5, -0.25])
    np.testing.assert_allclose(new.numpy(), [1.3, 0.0], atol=1e-15)
    _, v = dual_update("likelihood", [0.5, 0.5], 1.0, violation_scale="log")(lam, [1.0, 0.25], [0.1, 0.05])
    np.testing.assert_allclose(v.numpy(), [np.log(2.0) + 0.5 * 0.1 ** 2, np.log(0.5) + 0.5 * 0.2 ** 2])
    # FU box: lam_i <= upper_i
    new, _ = dual_update("forward_kl", [9.0, 9.0], 1.0, upper=[0.25, 0.4])(lam, [8.0, 8.7])
    np.testing.assert_allclose(new.numpy(), [0.25, 0.4])
    # the pieces by hand equal the chained update
    pieces = DualUpdate(Violation("forward_kl", torch.tensor([9.0, 9.0], dtype=torch.float64)), ScaleBy(0.01),
                        Project(torch.tensor([0.25, 0.4], dtype=torch.float64)))
    np.testing.assert_allclose(pieces(lam, [8.0, 8.7])[0].numpy(), [0.25, 0.103])  # 0.31 capped at 0.25
    # the state holds lam, the step count and the update; its state_dict round-trips the pieces
    s = DualState("likelihood", [0.5, 0.5], 2.0, lam_init=lam, violation_scale="log")
    t = DualState("likelihood", [1.0, 1.0], 0.0)
    t.load_state_dict(s.state_dict())
    assert t.lr_dual == 2.0 and t.violation_scale == "log" and torch.equal(t.budgets, s.budgets)
    assert torch.equal(t.lam, s.lam) and t.steps == s.steps
    with pytest.raises(ValueError, match="lr_dual must be >= 0"):
        ScaleBy(-1.0)


def test_ancestral_and_ddim_steps_match_the_ddpm_posterior_written_out():
    """ancestral_step's mean must be the DDPM posterior mean q(x_{t-1} | x_t, x_0) at Tweedie's x_0 (Ho et
    al. 2020, eqs. 6-7): mu = sqrt(ab_prev) beta/(1-ab_t) x0 + sqrt(alpha) (1-ab_prev)/(1-ab_t) x_t,
    x0 = (x_t - sqrt(1-ab_t) eps)/sqrt(ab_t), beta = 1 - ab_t/ab_prev, with variance beta; and a DDIM
    step with the true noise z of x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) z must land on sqrt(ab_prev) x0 +
    sqrt(1-ab_prev) z exactly. Written out in float64; the steps compute in float32 on O(1) values
    with 1/sqrt(alpha), 1/sqrt(ab) <= 10 here, so 1e-5 covers their rounding (~1e-6) and no more."""
    from toy.core.diffusion import ancestral_step, ddim_step

    g = torch.Generator().manual_seed(0)
    B = 64
    ab_t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    ab_prev = ab_t + (1.0 - ab_t) * torch.rand(B, generator=g, dtype=torch.float64) * 0.9
    x0 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    z = torch.randn(B, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(B, 2, generator=g, dtype=torch.float64)
    a, ap = ab_t[:, None], ab_prev[:, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * z
    beta, alpha = 1 - a / ap, a / ap
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    mu = ap.sqrt() * beta / (1 - a) * x0_hat + alpha.sqrt() * (1 - ap) / (1 - a) * x_t
    got = ancestral_step(x_t.float(), eps.float(), ab_t.float(), ab_prev.float(), None)
    np.testing.assert_allclose(got.double().numpy(), mu.numpy(), atol=1e-5)
    got = ancestral_step(x_t.float(), eps.float(), ab_t.float(), ab_prev.float(), noise=noise.float())
    np.testing.assert_allclose(got.double().numpy(), (mu + beta.sqrt() * noise).numpy(), atol=1e-5)
    got = ddim_step(x_t.float(), z.float(), ab_t.float(), ab_prev.float())
    np.testing.assert_allclose(got.double().numpy(), (ap.sqrt() * x0 + (1 - ap).sqrt() * z).numpy(), atol=1e-5)
