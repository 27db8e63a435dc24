"""The scale-only diffusion pieces (``scale.diffusion``) and the strided chain of ``toy.core.diffusion``:
SISS weights in log space, the LU weight, strided KL weights."""

from __future__ import annotations

import math

import pytest
import torch

from scale import builders
from toy.core.diffusion import add_noise, strided_kl_weights, strided_timesteps
from scale.diffusion import likelihood_weight, siss_log_weights
from toy.core.diffusion import reverse_step_kl_weights
from tests.scale_fixtures import T


def test_siss_log_weights_match_naive_where_finite_and_stay_finite_at_small_t():
    g = torch.Generator().manual_seed(0)
    x0, a0, eps = (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ab = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.9, 0.95], dtype=torch.float64)
    x_t = add_noise(x0, eps, ab)
    lwx, lwa = siss_log_weights(x_t, x0, a0, ab, mix=0.3)
    s = ab.sqrt().reshape(-1, 1, 1, 1)
    v = (1 - ab).reshape(-1, 1, 1, 1)
    qx = torch.exp(-((x_t - s * x0) ** 2 / (2 * v)).flatten(1).sum(1))
    qa = torch.exp(-((x_t - s * a0) ** 2 / (2 * v)).flatten(1).sum(1))
    torch.testing.assert_close(lwx.exp(), qx / (0.7 * qx + 0.3 * qa))
    torch.testing.assert_close(lwa.exp(), qa / (0.7 * qx + 0.3 * qa))
    # at t = 0 (1 - alpha_bar ~ 1e-4) the naive densities underflow to 0/0; the log form does not
    ab0 = torch.full((6,), 0.9999, dtype=torch.float64)
    x_t0 = add_noise(x0, eps, ab0)
    lwx0, lwa0 = siss_log_weights(x_t0, x0, a0, ab0, mix=0.3)
    assert torch.all(torch.isfinite(lwx0)) and torch.all(torch.isfinite(lwa0))
    torch.testing.assert_close(lwx0.exp(), torch.full((6,), 1 / 0.7, dtype=torch.float64))
    naive = torch.exp(-((x_t0 - ab0.sqrt().reshape(-1, 1, 1, 1) * a0) ** 2
                        / (2 * (1 - ab0).reshape(-1, 1, 1, 1))).flatten(1).sum(1).float())
    assert torch.all(naive == 0)  # what the published code would divide by


def test_likelihood_weight_is_ratio_or_one_and_never_overflows():
    lr = torch.tensor([-1.0, 0.0, 2.0, 1e4])
    g, c = likelihood_weight(lr, "likelihood_ratio", clamp=5.0)
    torch.testing.assert_close(g, torch.tensor([math.exp(-1), 1.0, math.exp(2), math.exp(5)], dtype=torch.float64))
    torch.testing.assert_close(c, g)
    g2, c2 = likelihood_weight(lr, "log_likelihood_ratio", clamp=5.0)
    torch.testing.assert_close(g2, torch.tensor([-1.0, 0.0, 2.0, 1e4], dtype=torch.float64))  # g = log r: never clamped
    assert torch.all(c2 == 1)
    with pytest.raises(ValueError, match="likelihood constraint"):
        likelihood_weight(lr, "likelihood")


def test_strided_kl_weights_reduce_to_the_full_chain():
    ab = builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4).alphas_cumprod.double()
    ts = strided_timesteps(T, T)
    torch.testing.assert_close(strided_kl_weights(ab, ts), reverse_step_kl_weights(ab).flip(0))
    ts5 = strided_timesteps(T, 5)
    assert ts5.tolist() == sorted(ts5.tolist(), reverse=True) and ts5[0] == T - 1 and ts5[-1] == 0
