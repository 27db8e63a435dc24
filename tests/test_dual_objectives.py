"""The shared dual step and score-space objectives (toy.dual, toy.objectives) against independent
computations: cvxpy for the projection, closed-form Gaussian tilts for the composed target, and the
Gaussian KL of two DDPM reverse steps for the path-KL weights."""

import cvxpy as cp
import numpy as np
import pytest
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from theory.gmm import GaussianMixture
from toy.dual import DualState, constraint_violation, dual_ascent_step, project_multipliers
from toy.objectives import (composed_eps_target, eta_from_lam, lam_from_eta, path_kl_estimate,
                            reverse_step_kl_weights, signed_denoising_objective)


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
    from toy.objectives import log_ratio_from_denoising_losses

    ab = torch.tensor(alphas_cumprod_for_schedule(40, 1e-3, 0.2))
    w = reverse_step_kl_weights(ab)
    g = torch.Generator().manual_seed(0)
    l_cond, l_ref = torch.rand(40, generator=g), torch.rand(40, generator=g)
    per_t = log_ratio_from_denoising_losses(l_cond, l_ref, w, 40)
    expect = (w * (l_ref.double() - l_cond.double())).sum()
    torch.testing.assert_close(per_t.double().mean(), expect, rtol=1e-5, atol=1e-7)
