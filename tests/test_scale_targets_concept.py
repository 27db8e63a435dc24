"""What the concept methods actually train towards, pinned by targets written out here from the frozen
reference's outputs (docs/scale.md "Which noise-prediction target each method uses").

The models are exact harnesses (``scale.exact.MixtureUNet``, small shape): the reference is one set of
mixtures (base prompt -> q, concept -> q_c, retain prompt -> q_r), the model being trained another.
A forward hook makes the trained forward's output a leaf tensor; after ``loss.backward()`` its
gradient gives the regression target the engine used, ``target = eps_theta - grad * N / (2 w)`` for a
loss ``sum w ||eps_theta - target||^2 / N`` (N = global batch x dimensions; w = 1 for concept states,
``retain_weight`` for retain states). That target is compared with the formula:

- RU / RU dual-only (fit phase) / ESD: ``eps_q - eta (eps_c - eps_q)``, ``eta = lam / (1 - lam)``;
- LU, g = log r: ``eps_q - lam (eps_c - eps_q)``; g = r: ``eps_q - lam r (eps_c - eps_q)`` with r the
  sample's own constraint value;
- retain states: ``eps_ref(x, r)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from scale import builders
from scale.exact import DiagonalMixture, ExactTrainable, MixtureUNet, sd_scheduler

SHAPE = (1, 4, 4)
D = 16
CONCEPT, RETAIN = "a photo of the digit 3", "a photo of the digit 5"


def _mix(seed, shift):
    g = torch.Generator().manual_seed(seed)
    return DiagonalMixture(torch.tensor([0.4, 0.6], dtype=torch.float64),
                           torch.randn(2, D, generator=g, dtype=torch.float64) + shift,
                           0.2 + torch.rand(2, D, generator=g, dtype=torch.float64))


@pytest.fixture(scope="module")
def parts():
    from scale.models import encode_prompts

    tok = builders.build_word_tokenizer((CONCEPT + " 5").split())
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=1)
    keys = encode_prompts(tok, te, ["", CONCEPT, RETAIN], check_nonempty=False)
    sch = sd_scheduler()
    ref_mix = [_mix(0, 0.0), _mix(1, 1.0), _mix(2, -1.0)]
    model_mix = [_mix(0, 0.0), _mix(3, 0.5), _mix(4, -0.5)]
    ref = MixtureUNet(ref_mix, SHAPE, sch.alphas_cumprod, keys=keys)
    model = MixtureUNet(model_mix, SHAPE, sch.alphas_cumprod, keys=keys)
    return dict(tok=tok, te=te, keys=keys, sch=sch, ref=ref, model=model, ref_mix=ref_mix)


def _task(parts, method, batch=4, concepts=(CONCEPT,), sch_override=None, **kw):
    from scale.concept import ConceptConfig, ConceptTask
    from scale.engine import TrainConfig, make_accelerator
    from scale.models import ConceptModels

    cfg = ConceptConfig(method=method, concepts=concepts, budgets=(1.0,), sample_steps=5,
                        train=TrainConfig(batch_size=batch, micro_batch=batch, cpu=True), **kw)
    acc = make_accelerator(cfg.train)
    sch, model, ref = parts["sch"], parts["model"], parts["ref"]
    if sch_override is not None:  # the same mixtures on another schedule
        sch = sch_override
        model = MixtureUNet(model.mixtures, SHAPE, sch.alphas_cumprod, keys=parts["keys"])
        ref = MixtureUNet(ref.mixtures, SHAPE, sch.alphas_cumprod, keys=parts["keys"])
    models = ConceptModels(model, parts["te"], parts["tok"], None, sch, "exact")
    return ConceptTask(cfg, models, ExactTrainable(model, ref), acc, model)


def _trained_forward(task, run):
    """Run ``run()`` (one engine step) with the trained forward's output made a leaf; return
    (x, t, emb, eps_theta, its gradient, the step's output)."""
    seen = {}

    def hook(module, args, kwargs, out):
        if torch.is_grad_enabled():
            out.sample.requires_grad_(True)
            seen.update(x=args[0], t=args[1], emb=kwargs["encoder_hidden_states"], eps=out.sample)

    h = task.model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = run()
    finally:
        h.remove()
    out.loss.backward()
    return seen["x"], seen["t"], seen["emb"], seen["eps"].detach(), seen["eps"].grad, out


def _ref_eps(parts, x, t, which):
    ab = parts["sch"].alphas_cumprod.double()[t.cpu()]
    return parts["ref_mix"][which].eps(x.reshape(x.shape[0], -1), ab).reshape(x.shape)


def _implied_target(eps, grad, batch, weight=1.0):
    return eps.double() - grad.double() * batch * D / (2.0 * weight)


def _dual(problem, lam, lr=0.0):
    from toy.core.dual import DualState

    return DualState(problem, [1.0], lr, lam_init=[lam])


@pytest.mark.parametrize("method,lam", [("reverse_kl", 0.3), ("reverse_kl_dual_only", 0.45)])
def test_reverse_kl_trains_towards_the_composed_target_at_eta_lam_over_one_minus_lam(parts, method, lam):
    from scale.engine import Slice

    task = _task(parts, method)
    dual = _dual("reverse_kl", lam)
    x, t, _, eps, grad, _ = _trained_forward(task, lambda: task.step(0, Slice(0, 1), dual, False))
    e_q, e_c = _ref_eps(parts, x, t, 0), _ref_eps(parts, x, t, 1)
    eta = lam / (1.0 - lam)
    want = e_q - eta * (e_c - e_q)
    torch.testing.assert_close(_implied_target(eps, grad, 4), want, rtol=1e-4, atol=1e-4)


def test_reverse_kl_with_retain_prompts_trains_retain_states_towards_the_reference_under_them(parts):
    from scale.engine import Slice

    task = _task(parts, "reverse_kl", retain_prompts=(RETAIN,), retain_weight=2.5)
    dual = _dual("reverse_kl", 0.2)
    x, t, _, eps, grad, _ = _trained_forward(task, lambda: task.step(0, Slice(0, 1), dual, False))
    b = 4
    e_q, e_c = _ref_eps(parts, x[:b], t[:b], 0), _ref_eps(parts, x[:b], t[:b], 1)
    torch.testing.assert_close(_implied_target(eps[:b], grad[:b], b), e_q - 0.25 * (e_c - e_q), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_implied_target(eps[b:], grad[b:], b, 2.5), _ref_eps(parts, x[b:], t[b:], 2),
                               rtol=1e-4, atol=1e-4)


def test_reverse_kl_dual_only_estimate_is_the_path_kl_of_the_composed_reference(parts):
    """The dual-only phase samples the composed reference eps* = eps_q - eta (eps_c - eps_q) and sums
    w_s ||eps* - eps_c||^2 = w_s (1 + eta)^2 ||eps_q - eps_c||^2 along its own states."""
    from toy.core.diffusion import strided_timesteps
    from scale.engine import Slice

    task = _task(parts, "reverse_kl_dual_only")
    lam = 0.4
    states = []
    h = parts["ref"].register_forward_hook(lambda m, a, o: states.append((a[0][:4].clone(), a[1][:4].clone())))
    try:
        out = task.step(0, Slice(0, 1), _dual("reverse_kl", lam), True)
    finally:
        h.remove()
    assert out.loss is None
    ab = parts["sch"].alphas_cumprod.double()
    ts = strided_timesteps(1000, 5)
    eta = lam / (1 - lam)
    want = torch.zeros((), dtype=torch.float64)
    for s, (x, t) in enumerate(states):
        assert int(t[0]) == int(ts[s])
        ab_t = ab[ts[s]]
        ab_prev = ab[ts[s + 1]] if s + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        alpha = ab_t / ab_prev
        w = (1 - alpha) / (2 * alpha * (1 - ab_t))
        d2 = (_ref_eps(parts, x, t, 0) - _ref_eps(parts, x, t, 1)).pow(2).flatten(1).sum(1)
        want = want + w * (1 + eta) ** 2 * d2.sum()
    assert len(states) == 5
    torch.testing.assert_close(out.measured_sum[0], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim_cfg", "ancestral"])
def test_esd_trains_towards_the_negatively_guided_reference_at_its_eta(parts, sampler):
    from scale.concept import initial_dual
    from scale.engine import Slice

    task = _task(parts, "esd", esd_eta=1.5, esd_sampler=sampler)
    x, t, emb, eps, grad, out = _trained_forward(task, lambda: task.step(0, Slice(0, 1), initial_dual(task.cfg), False))
    e_q, e_c = _ref_eps(parts, x, t, 0), _ref_eps(parts, x, t, 1)
    torch.testing.assert_close(_implied_target(eps, grad, 4), e_q - 1.5 * (e_c - e_q), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb, parts["keys"][1:2].expand_as(emb))  # trained under the concept prompt
    # the logged KL(p || q_c) diagnostic: one-term estimate N w ||eps_theta - eps_c||^2 with the
    # chain the state belongs to: the full 1000-step chain for the published DDIM states (N = T,
    # alpha_t = ab_t / ab_{t-1}), the 5-step strided chain for ancestral states (N = S)
    ab = parts["sch"].alphas_cumprod.double()
    ts = list(range(999, -1, -1)) if sampler == "ddim_cfg" else torch.linspace(999, 0, 5).round().long().tolist()
    w = []
    for tb in t.tolist():
        s = ts.index(tb)
        a_prev = ab[ts[s + 1]] if s + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        alpha = ab[tb] / a_prev
        w.append(len(ts) * (1 - alpha) / (2 * alpha * (1 - ab[tb])))
    want = (torch.stack(w) * (eps.double() - e_c).pow(2).flatten(1).sum(1)).sum()
    torch.testing.assert_close(out.measured_sum[0], want, rtol=1e-4, atol=1e-6)


def test_esd_published_states_are_guided_ddim_states_of_the_model_being_trained(parts):
    """The published sampler's state at its stop step, rebuilt here: DDIM (eta = 0) on 50 steps with
    guidance 3 between the trained model under "" and under the concept."""
    from scale.engine import Slice, step_generator

    task = _task(parts, "esd", esd_guidance=3.0, esd_ddim_steps=50)
    x, t, _ = task._draw_states_ddim_cfg(step_generator(0, 0), 4, Slice(0, 1))[:3]
    gen = step_generator(0, 0)
    z = torch.randn((4, *SHAPE), generator=gen).double()
    stop = torch.randint(0, 50, (4,), generator=gen)
    ab = parts["sch"].alphas_cumprod.double()
    ts = torch.linspace(999, 0, 50, dtype=torch.float64).round().long()
    model_mix = parts["model"].mixtures
    for j in range(4):
        xj = z[j].reshape(1, -1)
        for s in range(int(stop[j])):
            a, a_prev = ab[ts[s]], ab[ts[s + 1]]
            e_u = model_mix[0].eps(xj, a.reshape(1))
            e_c = model_mix[1].eps(xj, a.reshape(1))
            e = e_u + 3.0 * (e_c - e_u)
            x0 = (xj - (1 - a).sqrt() * e) / a.sqrt()
            xj = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        assert int(t[j]) == int(ts[stop[j]])
        torch.testing.assert_close(x[j].double().reshape(1, -1), xj, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("constraint", ["log_likelihood_ratio", "likelihood_ratio"])
def test_likelihood_trains_towards_the_tilt_target_with_its_state_dependent_weight(parts, constraint):
    from scale.engine import Slice

    lam = 0.7
    for j in range(4):  # one sample per slice: the step's constraint value is that sample's g
        task = _task(parts, "likelihood", likelihood_constraint=constraint, classifier_draws=2)
        x, t, _, eps, grad, out = _trained_forward(task, lambda: task.step(0, Slice(j, 4), _dual("likelihood", lam), False))
        g = float(out.measured_sum[0])
        c = g if constraint == "likelihood_ratio" else 1.0
        e_q, e_c = _ref_eps(parts, x, t, 0), _ref_eps(parts, x, t, 1)
        torch.testing.assert_close(_implied_target(eps, grad, 4), e_q - lam * c * (e_c - e_q), rtol=1e-4, atol=1e-4)


def _chain(parts, which, z, noises, stop, steps=5, sch=None):
    """The model's strided ancestral chain written out in float64 (docs/math.md §4): from x = z at
    t = ts[0] = T-1, step s maps x to ``(x - beta/sqrt(1 - ab_t) eps_p(x, t)) / sqrt(alpha) +
    sqrt(beta) noise_s`` with ``alpha = ab_t / ab_prev``, ``ab_prev`` the next visited step's (1 after
    the last step, where no noise is added: the end point is the mean). Returns each sample's state
    at its stop step and the chain's end point."""
    sch = sch or parts["sch"]
    ab = sch.alphas_cumprod.double()
    ts = torch.linspace(ab.numel() - 1, 0, steps, dtype=torch.float64).round().long()
    mix = parts["model"].mixtures[which]
    x = z.double().reshape(z.shape[0], -1)
    at_stop = torch.zeros_like(x)
    for s in range(steps):
        at_stop[stop == s] = x[stop == s]
        a = ab[ts[s]]
        a_prev = ab[ts[s + 1]] if s + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        alpha = a / a_prev
        beta = 1 - alpha
        x = (x - beta / (1 - a).sqrt() * mix.eps(x, a.expand(x.shape[0]))) / alpha.sqrt()
        if s + 1 < steps:
            x = x + beta.sqrt() * noises[s].double().reshape(x.shape[0], -1)
    return at_stop.reshape(z.shape), x.reshape(z.shape), ts


def test_on_policy_states_are_the_models_ancestral_chain_at_the_stop_steps_timestep(parts):
    """RU trains at the state x_{ts[stop]} of the model's own strided ancestral chain, evaluated at
    that state's timestep ts[stop]; LU's end points are the same chains run on to their last step
    (the mean: Tweedie's x_0 at t = 0, from alpha_bar = ab_0 to 1). The draws are re-made from
    ``step_generator`` in the documented order (z, stop, one noise per step but the last).
    Tolerance: the engine runs the 5 steps in float32, the chain here in float64; 1e-4 on O(1)
    states is ~10^3 float32 roundings, while a timestep off by one visited step or a last step
    that stops at ab_0 instead of 1 moves the states by >= 1e-2."""
    from scale.engine import Slice, step_generator

    task = _task(parts, "reverse_kl")
    x, t, emb, _, _, _ = _trained_forward(task, lambda: task.step(0, Slice(0, 1), _dual("reverse_kl", 0.3), False))
    gen = step_generator(0, 0)
    z = torch.randn((4, *SHAPE), generator=gen)
    stop = torch.randint(0, 5, (4,), generator=gen)
    noises = [torch.randn((4, *SHAPE), generator=gen) for _ in range(4)]
    want, end, ts = _chain(parts, 1, z, noises, stop)
    assert t.tolist() == ts[stop].tolist()
    torch.testing.assert_close(x.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb, parts["keys"][1:2].expand_as(emb))
    # LU: the same draws, the chains finished
    lu = _task(parts, "likelihood")
    x_stop, stop_lu, _, _, _, x_end = lu._draw_states(step_generator(0, 0), 4, Slice(0, 1), finish=True)
    assert stop_lu.tolist() == stop.tolist()
    torch.testing.assert_close(x_stop.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_end.double(), end, rtol=1e-4, atol=1e-4)


def test_two_concepts_alternate_prompts_and_pair_each_multiplier_with_its_own_concept(parts):
    """Two concepts (c_1 = CONCEPT -> reference q_1, c_2 = RETAIN's prompt used as a concept -> q_2),
    lam = (0.2, 0.35): sample b is drawn and trained under concept b mod 2, the target is
    ``eps_q - sum_i eta_i (eps_{c_i} - eps_q)`` with ``eta_i = lam_i / (1 - 0.55)``, and constraint i's
    estimate is ``sum_b S w_{s_b} ||eps_theta_b - eps_{c_i}(x_b)||^2`` (``w_s`` the strided chain's
    ``beta / (2 alpha (1 - ab_t))``, written out), i.e. KL(p || q_i) against q_i's own reference."""
    from scale.engine import Slice
    from toy.core.dual import DualState

    lam = torch.tensor([0.2, 0.35], dtype=torch.float64)
    task = _task(parts, "reverse_kl", concepts=(CONCEPT, RETAIN))
    dual = DualState("reverse_kl", [1.0, 1.0], 0.0, lam_init=lam)
    x, t, emb, eps, grad, out = _trained_forward(task, lambda: task.step(0, Slice(0, 1), dual, False))
    torch.testing.assert_close(emb, parts["keys"][[1, 2, 1, 2]])
    e_q, e_1, e_2 = (_ref_eps(parts, x, t, i) for i in range(3))
    eta = lam / (1 - lam.sum())
    want = e_q - eta[0] * (e_1 - e_q) - eta[1] * (e_2 - e_q)
    torch.testing.assert_close(_implied_target(eps, grad, 4), want, rtol=1e-4, atol=1e-4)
    ab = parts["sch"].alphas_cumprod.double()
    ts = torch.linspace(999, 0, 5, dtype=torch.float64).round().long().tolist()
    w = []
    for tb in t.tolist():
        s = ts.index(tb)
        a, a_prev = ab[ts[s]], (ab[ts[s + 1]] if s + 1 < 5 else torch.tensor(1.0, dtype=torch.float64))
        alpha = a / a_prev
        w.append(5 * (1 - alpha) / (2 * alpha * (1 - a)))
    w = torch.stack(w)
    kl = torch.stack([(w * (eps.double() - e).pow(2).flatten(1).sum(1)).sum() for e in (e_1, e_2)])
    torch.testing.assert_close(out.measured_sum, kl, rtol=1e-4, atol=1e-6)
    assert out.measured_count.tolist() == [4.0, 4.0]


@pytest.mark.parametrize("antithetic", [True, False])
def test_likelihood_constraint_estimate_is_the_stratified_elbo_difference_written_out(parts, antithetic):
    """LU's estimate of g = log r at each chain end point x_0, written out from docs/math.md (eq. 31,
    "diffusion classifier") on a 10-step schedule with K = 3 strata of sizes 3, 3, 4 (unequal: each
    term must carry its own stratum's size): per sample, ``sum_j size_j w_t d mean_sign (l_base -
    l_c)`` with ``t = edge_j + floor(u_j size_j)``, ``w_t = beta_t / (2 alpha_t (1 - ab_t))``, ``l`` the
    per-dimension denoising loss at ``x_t = sqrt(ab) x_0 + sign sqrt(1 - ab) n`` against target
    ``sign n`` (sign = +-1 with antithetic pairs, +1 without). The draws are re-made in the documented
    order (chain: z, stop, 4 noises; then u (K, B) and noise (K, B, ...)). The step's slice holds all 4
    samples, so its constraint sum is the sum of the 4 values (count 4).
    Tolerance: float32 chain and losses against float64 here; relative 1e-4 is ~10^3 roundings, while
    a timestep one off inside a stratum changes a term by >= 5% on this schedule."""
    from scale import builders
    from scale.engine import Slice, step_generator

    sch = builders.build_scheduler(10, beta_start=0.02, beta_end=0.4)
    K, B = 3, 4
    task = _task(parts, "likelihood", sch_override=sch, classifier_draws=K, likelihood_antithetic=antithetic)
    out = task.step(0, Slice(0, 1), _dual("likelihood", 0.5), False)
    gen = step_generator(0, 0)
    z = torch.randn((B, *SHAPE), generator=gen)
    stop = torch.randint(0, 5, (B,), generator=gen)
    noises = [torch.randn((B, *SHAPE), generator=gen) for _ in range(4)]
    _, x0, _ = _chain(parts, 1, z, noises, stop, sch=sch)
    u = torch.rand((K, B), generator=gen, dtype=torch.float64)
    noise = torch.randn((K, B, *SHAPE), generator=gen).double()
    ab = sch.alphas_cumprod.double()
    edges, sizes = [0, 3, 6], [3, 3, 4]
    signs = (1.0, -1.0) if antithetic else (1.0,)
    want = torch.zeros(B, dtype=torch.float64)
    for j in range(K):
        for b in range(B):
            t = edges[j] + int(math.floor(float(u[j, b]) * sizes[j]))
            a = ab[t]
            alpha = a / (ab[t - 1] if t > 0 else 1.0)
            w = (1 - alpha) / (2 * alpha * (1 - a))
            diff = 0.0
            for sg in signs:
                n = sg * noise[j, b].reshape(1, -1)
                x_t = a.sqrt() * x0[b].reshape(1, -1) + (1 - a).sqrt() * n
                l_base = (parts["ref_mix"][0].eps(x_t, a.reshape(1)) - n).pow(2).mean()
                l_c = (parts["ref_mix"][1].eps(x_t, a.reshape(1)) - n).pow(2).mean()
                diff = diff + (l_base - l_c) / len(signs)
            want[b] += sizes[j] * w * D * diff
    assert out.measured_count.tolist() == [float(B)]
    torch.testing.assert_close(out.measured_sum[0], want.sum(), rtol=1e-4, atol=1e-6)
