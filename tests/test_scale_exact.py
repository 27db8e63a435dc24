"""The scale estimators at Stable Diffusion's real latent size (4x64x64) and schedule, against exact
values: the models are ``scale.exact.MixtureUNet`` harnesses (Gaussians with diagonal covariances),
for which the strided ancestral chain, its end points, the path KL, the ELBO terms and the denoising
losses are per-dimension closed forms, written out here independently of the code under test.

Tolerances: each estimate is a mean over independent per-sample terms (one engine slice per sample,
so the terms are exactly those of one global batch); it must lie within 3 standard errors of the
exact value (two-sided miss rate 0.27% if the estimator is unbiased).

``python -m tests.test_scale_exact`` prints the agreement table (estimate, exact, se).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scale import builders
from scale.exact import DiagonalMixture, MixtureUNet, sd_scheduler

SHAPE = (4, 64, 64)
D = 4 * 64 * 64
PROMPT = "a photo of the digit 3"


# ------------------------------------------------------------------ the harness itself


def test_harness_eps_and_log_prob_equal_theory_gmm_for_diagonal_mixtures():
    from theory.gmm import GaussianMixture

    g = torch.Generator().manual_seed(0)
    d = 6
    mix = DiagonalMixture(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.randn(3, d, generator=g, dtype=torch.float64),
                          0.1 + torch.rand(3, d, generator=g, dtype=torch.float64))
    ref = GaussianMixture(mix.weights.numpy(), mix.means.numpy(), np.stack([np.diag(v) for v in mix.variances.numpy()]))
    x = torch.randn(9, d, generator=g, dtype=torch.float64)
    ab = torch.rand(9, generator=g, dtype=torch.float64) * 0.98 + 0.01
    np.testing.assert_allclose(mix.eps(x, ab).numpy(), ref.eps(x.numpy(), ab.numpy()), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mix.log_prob(x, ab).numpy(), ref.log_prob(x.numpy(), ab.numpy()), rtol=1e-12)
    np.testing.assert_allclose(mix.log_prob(x).numpy(), ref.log_prob(x.numpy()), rtol=1e-12)


def test_harness_is_a_unet_with_one_mixture_per_prompt_embedding_at_real_size():
    sch = sd_scheduler()
    g = torch.Generator().manual_seed(1)
    mixes = [DiagonalMixture(torch.tensor([0.5, 0.5]), torch.randn(2, D, generator=g, dtype=torch.float64), 0.5),
             DiagonalMixture(torch.ones(1), torch.zeros(1, D, dtype=torch.float64), 2.0)]
    keys = torch.randn(2, 5, 8, generator=g)
    unet = MixtureUNet(mixes, SHAPE, sch.alphas_cumprod, keys=keys)
    x = torch.randn(3, *SHAPE, generator=g)
    t = torch.tensor([0, 500, 999])
    out = unet(x, t, encoder_hidden_states=keys[[1, 0, 1]]).sample
    assert out.shape == x.shape and out.dtype == torch.float32
    ab = sch.alphas_cumprod.double()[t]
    # component 1 is N(0, 2 I): eps = sqrt(1 - ab) x / (2 ab + 1 - ab), written out
    for j in (0, 2):
        want = (1 - ab[j]).sqrt() * x[j].double() / (2 * ab[j] + 1 - ab[j])
        torch.testing.assert_close(out[j].double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1].double(), mixes[0].eps(x[1:2], ab[1:2]).reshape(SHAPE), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="matches no registered prompt embedding"):
        unet(x, t, encoder_hidden_states=keys[[1, 0, 1]] + 0.1)


def test_harness_samples_have_the_mixtures_first_and_second_moments():
    """``DiagonalMixture.sample``: per dimension ``E x = sum_k w_k mu_k`` and ``E x^2 = sum_k w_k (s_k^2 +
    mu_k^2)``. Tolerance: 4 standard errors of each sample mean (sample sd / sqrt(n)), six checks;
    variances 0.25 and 2-4 make a standard deviation taken for a variance (or squared) miss by >> 4 se."""
    mix = DiagonalMixture(torch.tensor([0.3, 0.7], dtype=torch.float64),
                          torch.tensor([[1.0, -2.0, 0.0], [-0.5, 1.0, 3.0]], dtype=torch.float64),
                          torch.tensor([[0.25, 2.0, 4.0], [0.25, 3.0, 0.5]], dtype=torch.float64))
    n = 20000
    x = mix.sample(n, torch.Generator().manual_seed(4))
    w = mix.weights.reshape(-1, 1)
    for got, want in ((x, (w * mix.means).sum(0)), (x ** 2, (w * (mix.variances + mix.means ** 2)).sum(0))):
        se = got.std(0) / math.sqrt(n)
        assert torch.all((got.mean(0) - want).abs() <= 4 * se), (got.mean(0), want, se)


# ------------------------------------------------------------------ closed forms of single-Gaussian chains


def _a(ab, var):
    """eps(x_t) = a (x_t - sqrt(ab) mu) for N(mu, var): a = sqrt(1 - ab) / (ab var + 1 - ab)."""
    return (1 - ab).sqrt() / (ab * var + 1 - ab)


def _chain_laws(ab_all, ts, mu, var):
    """Per-dimension (mean, variance) of the strided ancestral chain of N(mu, diag var) at each
    visited step, and of its end point (the last step is the mean)."""
    m, v = torch.zeros_like(mu), torch.ones_like(mu)
    laws = []
    for s, t in enumerate(ts):
        ab_t = ab_all[t]
        ab_prev = ab_all[ts[s + 1]] if s + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        laws.append((m, v))
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        ca = beta / (1 - ab_t).sqrt() * _a(ab_t, var)
        m = ((1 - ca) * m + ca * ab_t.sqrt() * mu) / alpha.sqrt()
        v = (1 - ca) ** 2 * v / alpha + (beta if s + 1 < len(ts) else 0.0)
    return laws, (m, v)


def _elbo_loss(ab_t, m0, v0, mu, var):
    """sum over dimensions of E(eps(x_t) - n)^2, x_0 ~ N(m0, v0), model N(mu, var)."""
    a = _a(ab_t, var)
    return (a ** 2 * ab_t * ((m0 - mu) ** 2 + v0) + (a * (1 - ab_t).sqrt() - 1) ** 2).sum()


def _instance(seed=0):
    g = torch.Generator().manual_seed(seed)
    mu_b = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    var_b = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    delta = 0.05 * torch.randn(D, generator=g, dtype=torch.float64)
    mu_c, var_c = mu_b + delta, var_b * torch.exp(0.2 * torch.randn(D, generator=g, dtype=torch.float64))
    mu_p, var_p = mu_b + 0.5 * delta, var_b * 1.02
    return (mu_b, var_b), (mu_c, var_c), (mu_p, var_p)


def _concept_task(method, sample_steps, batch, mixtures=None, **kw):
    """A ConceptTask whose reference is the harness (base prompt -> q_b, concept -> q_c) and whose
    model being trained is the harness (base -> q_b, concept -> p); ``mixtures = (q_b, q_c, p)``
    replaces the single Gaussians of ``_instance``."""
    from scale.concept import ConceptConfig, ConceptTask
    from scale.engine import TrainConfig, make_accelerator
    from scale.exact import ExactTrainable
    from scale.models import ConceptModels, encode_prompts

    tok = builders.build_word_tokenizer(PROMPT.split())
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=1)
    sch = sd_scheduler()
    keys = encode_prompts(tok, te, ["", PROMPT], check_nonempty=False)
    (mu_b, var_b), (mu_c, var_c), (mu_p, var_p) = _instance()
    mix = lambda mu, var: DiagonalMixture(torch.ones(1), mu.unsqueeze(0), var.unsqueeze(0))  # noqa: E731
    q_b, q_c, p = mixtures or (mix(mu_b, var_b), mix(mu_c, var_c), mix(mu_p, var_p))
    ref = MixtureUNet([q_b, q_c], SHAPE, sch.alphas_cumprod, keys=keys)
    model = MixtureUNet([q_b, p], SHAPE, sch.alphas_cumprod, keys=keys)
    cfg = ConceptConfig(method=method, concepts=(PROMPT,), budgets=(0.0,), sample_steps=sample_steps,
                        train=TrainConfig(batch_size=batch, micro_batch=batch, cpu=True), **kw)
    acc = make_accelerator(cfg.train)
    return ConceptTask(cfg, ConceptModels(model, te, tok, None, sch, "exact"), ExactTrainable(model, ref), acc, model)


def _per_sample(task, dual, batch, steps=1):
    """The engine's constraint estimates one sample at a time (slice j of ``batch``)."""
    from scale.engine import Slice

    return torch.tensor([float(task.step(s, Slice(j, batch), dual, False).measured_sum[0])
                         for s in range(steps) for j in range(batch)], dtype=torch.float64)


def likelihood_agreement(batch=32, sample_steps=20, draws=4):
    """(estimate, se, exact ELBO difference at the chain's end points, exact log ratio there, values)."""
    from toy.core.diffusion import strided_timesteps
    from toy.core.dual import DualState
    from toy.core.diffusion import reverse_step_kl_weights

    task = _concept_task("likelihood", sample_steps, batch, classifier_draws=draws)
    vals = _per_sample(task, DualState("likelihood", [0.0], 0.0), batch)
    (mu_b, var_b), (mu_c, var_c), (mu_p, var_p) = _instance()
    ab = sd_scheduler().alphas_cumprod.double()
    _, (m0, v0) = _chain_laws(ab, strided_timesteps(1000, sample_steps).tolist(), mu_p, var_p)
    w = reverse_step_kl_weights(ab)
    elbo = sum(float(w[t] * (_elbo_loss(ab[t], m0, v0, mu_b, var_b) - _elbo_loss(ab[t], m0, v0, mu_c, var_c)))
               for t in range(1000))
    true = float((-0.5 * torch.log(var_c / var_b) - ((m0 - mu_c) ** 2 + v0) / (2 * var_c)
                  + ((m0 - mu_b) ** 2 + v0) / (2 * var_b)).sum())
    return float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), elbo, true, vals


def reverse_kl_agreement(batch=32, sample_steps=20):
    """(one-term path-KL estimate, se, exact path KL of the strided chain)."""
    from toy.core.diffusion import strided_kl_weights, strided_timesteps
    from toy.core.dual import DualState

    task = _concept_task("reverse_kl", sample_steps, batch)
    vals = _per_sample(task, DualState("reverse_kl", [1.0], 0.0), batch)
    (_, _), (mu_c, var_c), (mu_p, var_p) = _instance()
    ab = sd_scheduler().alphas_cumprod.double()
    ts = strided_timesteps(1000, sample_steps)
    laws, _ = _chain_laws(ab, ts.tolist(), mu_p, var_p)
    w = strided_kl_weights(ab, ts)
    exact = 0.0
    for s, (m, v) in enumerate(laws):
        ab_t = ab[ts[s]]
        A = _a(ab_t, var_p) - _a(ab_t, var_c)
        C = -ab_t.sqrt() * (_a(ab_t, var_p) * mu_p - _a(ab_t, var_c) * mu_c)
        exact += float(w[s] * ((A * m + C) ** 2 + A ** 2 * v).sum())
    return float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), exact


def forward_kl_agreement(copies=16, draws=4):
    """(forget-loss estimate of ``scale.data.forget_losses``, se, exact mean denoising loss)."""
    from scale.data import forget_losses

    (mu_b, var_b), _, _ = _instance()
    sch = sd_scheduler()
    unet = MixtureUNet([DiagonalMixture(torch.ones(1), mu_b.unsqueeze(0), var_b.unsqueeze(0))], SHAPE,
                       sch.alphas_cumprod)
    g = torch.Generator().manual_seed(7)
    image = (mu_b + 1.5 * var_b.sqrt() * torch.randn(D, generator=g, dtype=torch.float64))  # an atypical image
    vals = forget_losses(unet, image.float().reshape(1, *SHAPE).repeat(copies, 1, 1, 1), sch.alphas_cumprod,
                         draws, seed=3).double()
    ab = sch.alphas_cumprod.double()
    a0 = image.float().double()
    exact = sum(float(_elbo_loss(ab[t], a0, torch.zeros(()), mu_b, var_b)) for t in range(1000)) / (1000 * D)
    return float(vals.mean()), float(vals.std() / math.sqrt(copies)), exact


def test_likelihood_estimate_at_real_size_is_unbiased_for_the_elbo_difference_at_the_model_end_points_and_unclamped():
    est, se, elbo, true, vals = likelihood_agreement()
    assert abs(est - elbo) <= 3 * se, (est, elbo, se)
    # the ELBO difference is the log ratio up to the discretisation gap, here far below the se
    assert abs(elbo - true) < 0.1 * se
    # unclamped: per-sample values far beyond the old clamp of +-5 nats
    assert vals.abs().max() > 10 and torch.isfinite(vals).all()


def test_reverse_kl_path_kl_estimate_at_real_size_matches_the_exact_path_kl():
    est, se, exact = reverse_kl_agreement()
    assert abs(est - exact) <= 3 * se, (est, exact, se)
    assert se < 0.5 * exact  # the comparison has power


def test_forward_kl_forget_loss_at_real_size_matches_the_exact_denoising_loss():
    est, se, exact = forward_kl_agreement()
    assert abs(est - exact) <= 3 * se, (est, exact, se)
    assert se < 0.2 * exact


def test_forward_kl_forget_losses_are_each_images_own_for_distinct_images():
    """``forget_losses`` of 128 images alternating a typical image (mu + 0.5 sd z) and an atypical one
    (mu + 3 sd z) of ``N(mu, diag var)`` (4x8x8, SD's schedule): each value is its own image's mean
    denoising loss over its 4 draws, so the 64 values of each image agree with that image's exact loss
    (within 3 se of the 64: the values are iid, t_63 two-sided miss rate 0.4%) and the two exact
    losses lie far apart (a value that mixed the images' draws would miss both)."""
    from scale.data import forget_losses

    shape, d, c = (4, 8, 8), 256, 64
    g = torch.Generator().manual_seed(8)
    mu = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    sch = sd_scheduler()
    unet = MixtureUNet([DiagonalMixture(torch.ones(1), mu.unsqueeze(0), var.unsqueeze(0))], shape, sch.alphas_cumprod)
    images = [mu + f * var.sqrt() * torch.randn(d, generator=g, dtype=torch.float64) for f in (0.5, 3.0)]
    batch = torch.stack(images * c).float().reshape(2 * c, *shape)  # a, b, a, b, ...
    vals = forget_losses(unet, batch, sch.alphas_cumprod, 4, seed=3).double()
    ab = sch.alphas_cumprod.double()
    exact, ses = [], []
    for k, image in enumerate(images):
        a0 = image.float().double()
        exact.append(sum(float(_elbo_loss(ab[t], a0, torch.zeros(()), mu, var)) for t in range(1000)) / (1000 * d))
        v = vals[k::2]
        ses.append(float(v.std() / math.sqrt(c)))
        assert abs(float(v.mean()) - exact[k]) <= 3 * ses[k], (k, float(v.mean()), exact[k], ses[k])
    assert exact[1] - exact[0] > 10 * max(ses), (exact, ses)  # the comparison has power


def test_reverse_kl_path_kl_estimate_with_two_component_mixtures_matches_full_trajectory_monte_carlo():
    """Nonlinear (mixture) noise predictions at real size: the engine's one-term estimates against
    the full path-KL sum along independent float64 trajectories of the model, simulated here."""
    from toy.core.diffusion import strided_timesteps
    from toy.core.dual import DualState

    g = torch.Generator().manual_seed(21)

    def two(shift, spread):  # two components 2.6 noise-free standard units apart in total
        base = 0.5 * torch.randn(D, generator=g, dtype=torch.float64) + shift
        sep = spread * torch.randn(D, generator=g, dtype=torch.float64)
        return DiagonalMixture(torch.tensor([0.3, 0.7], dtype=torch.float64), torch.stack([base - sep, base + sep]),
                               0.5 + torch.rand(2, D, generator=g, dtype=torch.float64))

    q_b, q_c = two(0.0, 0.01), two(0.0, 0.01)
    p = DiagonalMixture(q_c.weights, 0.5 * (q_b.means + q_c.means), q_c.variances)
    B, S = 32, 10
    task = _concept_task("reverse_kl", S, B, mixtures=(q_b, q_c, p))
    vals = _per_sample(task, DualState("reverse_kl", [1.0], 0.0), B)
    est, se = float(vals.mean()), float(vals.std() / math.sqrt(B))
    # independent: N ancestral trajectories of p in float64, the whole sum over steps on each
    ab = sd_scheduler().alphas_cumprod.double()
    ts = strided_timesteps(1000, S).tolist()
    N = 32
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zg = torch.Generator().manual_seed(6)
    tot = torch.zeros(N, dtype=torch.float64)
    for s, t in enumerate(ts):
        ab_t = ab[t]
        ab_prev = ab[ts[s + 1]] if s + 1 < S else torch.tensor(1.0, dtype=torch.float64)
        alpha, abv = ab_t / ab_prev, ab_t.expand(N)
        beta = 1 - alpha
        e_p, e_c = p.eps(x, abv), q_c.eps(x, abv)
        tot += beta / (2 * alpha * (1 - ab_t)) * (e_p - e_c).pow(2).sum(1)
        x = (x - beta / (1 - ab_t).sqrt() * e_p) / alpha.sqrt()
        if s + 1 < S:
            x = x + beta.sqrt() * torch.randn(N, D, generator=zg, dtype=torch.float64)
    mc, se_mc = float(tot.mean()), float(tot.std() / math.sqrt(N))
    assert abs(est - mc) <= 3 * math.hypot(se, se_mc), (est, se, mc, se_mc)
    assert se < 0.5 * mc


if __name__ == "__main__":
    torch.set_num_threads(1)
    est, se, elbo, true, _ = likelihood_agreement()
    print("| quantity | estimate | exact | se |\n|---|---|---|---|")
    print(f"| LU E_p[log r] (ELBO difference at end points) | {est:.3f} | {elbo:.3f} (true log ratio {true:.3f}) | {se:.3f} |")
    est, se, exact = reverse_kl_agreement()
    print(f"| RU path KL(p || q_c) | {est:.3f} | {exact:.3f} | {se:.3f} |")
    est, se, exact = forward_kl_agreement()
    print(f"| FU forget loss | {est:.5f} | {exact:.5f} | {se:.5f} |")
