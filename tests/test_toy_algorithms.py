"""The algorithm table as code (``toy.algorithms``) and the one loop (``toy.loop``): every row maps
to the primal step and estimator the table names, fixed-multiplier rows read their multiplier from
the dual state only, each primal step's objective is its formula written out, and a row that is
not in the table is refused."""

import numpy as np
import pytest
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from toy import algorithms as alg
from toy.algorithms import Context, LoopConfig, Models, algorithm
from toy.core.diffusion import reverse_step_kl_weights
from toy.models import EpsMLP, MixtureEps
from toy.pretrain import MixtureData
from toy.problems import default_instance

AB = torch.tensor(alphas_cumprod_for_schedule(100, 1e-3, 0.2), dtype=torch.float32)


@pytest.mark.parametrize("problem, name, target, estimate, primal, estimator, pool, others", [
    ("reverse_kl", "primal_dual", "composed", "pool", "composed_step", "path_kl_pool", True, True),
    ("reverse_kl", "primal_dual", "composed", "fresh", "composed_step", "path_kl_fresh", True, False),
    ("reverse_kl", "primal_dual", "reweighted", "pool", "reweighted_step", "path_kl_pool", True, True),
    ("reverse_kl", "esd", "composed", "pool", "composed_step", None, True, False),
    ("reverse_kl", "dual_only", "reweighted", "pool", "reweighted_step", None, False, False),
    ("forward_kl", "primal_dual", "composed", "pool", "signed_step", "elbo_estimate", False, False),
    ("forward_kl", "siss", "composed", "pool", "signed_step", None, False, False),
    ("likelihood", "primal_dual", "reweighted", "pool", "reweighted_step", "g_exact", True, False),
    ("likelihood", "primal_dual", "composed", "fresh", "gibbs_step", "g_exact", False, False),
])
def test_each_row_of_the_table_is_its_primal_step_and_estimator(problem, name, target, estimate, primal, estimator,
                                                                pool, others):
    loop = LoopConfig(target=target, estimate=estimate, pool_frac=0.5 if target == "composed" else 0.0, dual_every=10)
    row = algorithm(problem, name, loop)
    assert row.primal is getattr(alg, primal)
    assert (row.estimate is None) if estimator is None else (row.estimate is getattr(alg, estimator))
    assert (row.pool, row.pool_others) == (pool, others)
    assert row.every == (0 if estimator is None else (1 if problem == "forward_kl" else 10))


def test_rows_outside_the_table_are_refused():
    with pytest.raises(ValueError, match=r"'esd' is not defined for forward_kl; choose from \('primal_dual', 'siss'\)"):
        algorithm("forward_kl", "esd", LoopConfig())
    with pytest.raises(ValueError, match="problem must be one of"):
        algorithm("kl", "primal_dual", LoopConfig())
    with pytest.raises(ValueError, match="target must be composed or reweighted"):
        algorithm("reverse_kl", "primal_dual", LoopConfig(target="exact"))
    with pytest.raises(ValueError, match="lu_estimator"):
        algorithm("likelihood", "primal_dual", LoopConfig(target="reweighted", estimate="pool"), lu_estimator="classifier")


def _ctx(problem, batch=64, forget_batch=32, seed=0):
    inst = default_instance()
    f = [MixtureEps.from_mixture(g, AB) for g in inst.forget]
    torch.manual_seed(seed)
    net = EpsMLP(2, 16, 2, 8, 100)
    models = Models(net=net, frozen=EpsMLP(2, 16, 2, 8, 100), forget=f, retain_data=MixtureData(inst.q, 1),
                    forget_data=[MixtureData(g, 2) for g in inst.forget], alphas_cumprod=AB, forget_exact=f,
                    q_exact=MixtureEps.from_mixture(inst.q, AB))
    loop = LoopConfig(batch=batch, forget_batch=forget_batch, target="reweighted")
    return Context(problem, models, AB, reverse_step_kl_weights(AB), loop, torch.Generator().manual_seed(seed), net)


def test_signed_step_objective_is_retain_loss_minus_lam_times_forget_loss_written_out():
    """FU (eq. 27) and its ELBO estimate (eq. 31) from the step's own forget rows, recomputed here
    from the same draws: x0 retain, x0 forget, then (t, z) retain, then (t, z) forget."""
    ctx = _ctx("forward_kl")
    lam = torch.tensor([0.2], dtype=torch.float64)
    b = alg.signed_step(ctx, lam)
    # the same draws by hand
    ref = _ctx("forward_kl")
    x0r, x0f = ref.models.retain_data(64), ref.models.forget_data[0](32)
    g = ref.gen
    tr = torch.randint(0, 100, (64,), generator=g)
    zr = torch.randn(64, 2, generator=g)
    tf = torch.randint(0, 100, (32,), generator=g)
    zf = torch.randn(32, 2, generator=g)
    net = ctx.models.net
    x_r = AB[tr].sqrt()[:, None] * x0r + (1 - AB[tr]).sqrt()[:, None] * zr
    x_f = AB[tf].sqrt()[:, None] * x0f + (1 - AB[tf]).sqrt()[:, None] * zf
    l_r = ((net(x_r, tr) - zr) ** 2).mean(1)
    l_f = ((net(x_f, tf) - zf) ** 2).mean(1)
    want = l_r.mean() - 0.2 * l_f.mean()
    got = alg.batch_loss(net, ctx.models.frozen, b)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-6
    losses = [((net(x, t) - z) ** 2).mean(1) for x, t, z in b.segments]
    measured, se = alg.elbo_estimate(ctx, b, losses)
    w = reverse_step_kl_weights(AB)
    l_star = ((ctx.models.forget_exact[0](x_f, tf) - zf) ** 2).mean(1)
    np.testing.assert_allclose(float(measured[0]), float((100 * w[tf] * 2 * (l_f - l_star)).mean().detach()), rtol=1e-5)
    assert se is None


def test_reweighted_step_weights_rows_by_the_softmax_of_the_x0_tilt_written_out():
    """RU: w proportional to (q/q_1)^eta at x_0 (eta = lam/(1-lam)); LU: exp(-lam g)."""
    for problem, lam in (("reverse_kl", 0.2), ("likelihood", 30.0)):
        ctx = _ctx(problem)
        b = alg.reweighted_step(ctx, torch.tensor([lam], dtype=torch.float64))
        ref = _ctx(problem)
        x0 = ref.models.retain_data(64)
        log_q = ref.models.q_exact.log_prob(x0)
        log_q1 = ref.models.forget_exact[0].log_prob(x0)
        log_w = (lam / (1 - lam)) * (log_q - log_q1) if problem == "reverse_kl" else -lam * log_q1.exp()
        w = torch.softmax(log_w, 0).float()
        x_t, t, z = b.segments[0]
        l = ((ctx.models.net(x_t, t) - z) ** 2).mean(1)
        np.testing.assert_allclose(float(alg.batch_loss(ctx.models.net, None, b).detach()), float((w * l).sum().detach()),
                                   rtol=1e-5)


def test_fixed_multiplier_rows_take_lam_from_the_dual_state_only(tmp_path):
    """ESD's eta enters once, as the dual state's initial lam = eta/(1+eta) with step size 0; the
    composed step turns it back into eta (written out: eta = 1.5 at lam = 0.6)."""
    ctx = _ctx("reverse_kl")
    ctx.loop = LoopConfig(batch=64, target="composed", pool_frac=0.0)
    b = alg.composed_step(ctx, torch.tensor([0.6], dtype=torch.float64))
    assert abs(float(b.segments[0][2].eta[0]) - 1.5) < 1e-6
    import inspect
    from toy import loop
    assert "eta" not in inspect.signature(loop.unlearn).parameters
