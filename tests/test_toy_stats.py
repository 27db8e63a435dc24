"""Statistical checks of the toy tier on the default 2-D three-mode mixture (docs/toy.md derives
every tolerance). One pretrained model per session; each test runs one full unlearning run.

For each run (``toy.verify.checks_for``):
- lam lies in ``{lam : |C_ref(lam) - b| <= delta}``, ``delta = |C_pre - C_q| + 3 sqrt(se_end^2 + se_pre^2)``:
  the multipliers whose reference target meets the budget as accurately as the network's own
  constraint estimate can (the pretrained model's error on the same functional at p = q, plus
  three standard errors). C_ref is the exact x_0 target's constraint (theory) for targets exact at
  every t, and the exact-score surrogate's for the composed-score target.
- the constraint violation is <= 3 standard errors of its end-of-run estimate;
- the energy distance to the target is <= the pretrained model's distance to q + 3 sqrt(2) noise
  floors (noise floor = distance between two independent target samples of the same size).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from toy.config import ToyConfig, override
from toy.run import dual_only_lam, pretrain_on_mixture, run
from toy.problems import default_instance, dual_slope, lam_star
from toy.reference import Quadrature
from toy.verify import DISTANCE_FLOOR_MULTIPLE, checks_for

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pretrained_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-pretrained") / "pretrained.pt"
    pretrain_on_mixture(default_instance().q, ToyConfig(), "pretrain", path)
    return str(path)


def _run(tmp_path, pretrained_path, **kw):
    """One run of the default config with ``kw`` (dotted keys as ``toy.config.override``'s)."""
    return run(override(ToyConfig(out=str(tmp_path / "run"), pretrained=pretrained_path, figure=False), kw))


def _assert_checks(summary):
    failed = [f"{c.name}: {c.measured} vs {c.expected}" for c in checks_for(summary, summary["problem"]) if not c.passed]
    assert not failed, failed


def test_fu_primal_dual_converges_to_lam_star_meets_budget_and_matches_target(tmp_path, pretrained_path):
    s = _run(tmp_path, pretrained_path, problem="forward_kl")
    assert s["lam_reference_source"] == "lam_star" and s["lam_star_source"] == "theory.gmm.solve"
    _assert_checks(s)


@pytest.mark.slow  # seed 0 of test_lu_primal_dual_meets_its_checks_at_five_seeds (default suite), run alone
def test_lu_primal_dual_converges_to_lam_star_meets_budget_and_matches_target(tmp_path, pretrained_path):
    s = _run(tmp_path, pretrained_path, problem="likelihood")
    assert s["target"] == "reweighted" and s["lam_reference_source"] == "lam_star"
    _assert_checks(s)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_lu_pool_estimate_meets_the_checks_at_other_seeds(tmp_path, seed):
    """LU's default (delayed) pool estimate with the log-scale, delay-limited dual step: the same
    checks at two more seeds, each with its own pretrained model (docs/toy.md's seed table)."""
    s = run(ToyConfig(out=str(tmp_path / "run"), problem="likelihood", seed=seed, figure=False))
    assert s["constraint_estimator"] == "pool"
    _assert_checks(s)


def test_ru_dual_only_ascent_finds_theory_lam_star():
    """Dual-only RU optimises lam alone on the explicit x_0 tilt: it must reach theory's lam*
    to the dual ascent's convergence (400 steps of gain 0.3: contraction 0.7^400 ~ 0), i.e. to the
    quadrature's accuracy, 1e-6 relative."""
    inst = default_instance()
    b = inst.budgets["reverse_kl"]
    quad = Quadrature("reverse_kl", inst.q, list(inst.forget))
    ls, _ = lam_star("reverse_kl", inst.q, inst.forget, b)
    lam = dual_only_lam([quad], b, 0.3 / abs(dual_slope(quad, float(ls[0]))), 0.95)
    assert abs(lam[0] - ls[0]) <= 1e-6 * ls[0]


@pytest.mark.slow
def test_ru_primal_dual_reaches_the_surrogate_fixed_point(tmp_path, pretrained_path):
    """Composed-score (ESD-form) target: the learned lam converges to the exact-score surrogate's
    fixed point, not to lam* of the x_0 problem (the surrogate bias is reported in the summary)."""
    s = _run(tmp_path, pretrained_path, problem="reverse_kl")
    assert s["lam_reference_source"] == "exact-score surrogate fixed point"
    _assert_checks({**s, "distance_to_target": s["distance_to_surrogate"]})


@pytest.mark.slow
def test_ru_primal_dual_with_reweighted_target_reaches_lam_star(tmp_path, pretrained_path):
    s = _run(tmp_path, pretrained_path, problem="reverse_kl", **{"train.target": "reweighted"})
    _assert_checks(s)


@pytest.mark.slow
def test_ru_dual_only_fitted_network_matches_the_surrogate_at_lam_star(tmp_path, pretrained_path):
    s = _run(tmp_path, pretrained_path, problem="reverse_kl", algorithm="dual_only")
    assert abs(s["lam"][0] - s["lam_star"][0]) <= 1e-6 * s["lam_star"][0]
    assert s["distance_to_surrogate"] <= s["pretrained_distance_to_q"] + DISTANCE_FLOOR_MULTIPLE * s["distance_noise_floor"]


@pytest.mark.slow
@pytest.mark.parametrize("problem, algorithm, kw", [("reverse_kl", "esd", {"eta": 1.0}),
                                                    ("forward_kl", "siss", {"siss_lam": 0.15})])
def test_fixed_multiplier_baselines_land_on_the_law_their_target_defines(tmp_path, pretrained_path,
                                                                         problem, algorithm, kw):
    """SISS (signed loss, exact at every t): the signed mixture at its lam. ESD: the composed chain
    of the frozen network's eps (its target); at eta = 1 that chain is far from the exact-score
    surrogate (the tilt sits in q's tails, where the pretrained network extrapolates, and the
    composed target amplifies its error by 1 + eta) — reported in the summary, see docs/toy.md."""
    s = _run(tmp_path, pretrained_path, problem=problem, algorithm=algorithm, **kw)
    d = s["distance_to_frozen_composed"] if problem == "reverse_kl" else s["distance_to_target"]
    assert d <= s["pretrained_distance_to_q"] + DISTANCE_FLOOR_MULTIPLE * s["distance_noise_floor"]


def test_fu_on_a_finite_set_at_lam_one_over_n_reproduces_retraining(tmp_path):
    """n = 8 training points, the isolated one forgotten, lam = 1/n (SISS without importance
    sampling). The unlearned model must be as close to a retrained one (same init, optimiser,
    steps) as twice the distance of a retraining with another seed, plus 3 sqrt(2) noise floors
    (docs/toy.md: the signed objective's stochastic gradient carries the forget term's noise on top
    of the retain term's, at most doubling the optimisation noise); its mass near the
    forgotten point must equal the retrained model's within 3 binomial standard errors; and the
    pretrained model must fail the first criterion (the test has power)."""
    from theory.diffusion import alphas_cumprod_for_schedule
    from toy.data_unlearning import compare_to_retraining, finite_set_experiment
    ab = torch.tensor(alphas_cumprod_for_schedule(100, 1e-3, 0.2), dtype=torch.float32)
    pts = default_instance().q.sample(8, np.random.default_rng(3))
    res = finite_set_experiment(pts, [0], ab, tmp_path / "fs", seed=0, pretrain_steps=3000, steps=2500, batch=128, lr=3e-4)
    assert res.lam[0] == pytest.approx(1 / 8)
    n = 2000
    c = compare_to_retraining(res, pts, [0], ab, n, 0, 0.3)
    bound = 2 * c["d_seed_retrained"] + DISTANCE_FLOOR_MULTIPLE * c["floor"]
    assert c["d_unlearned_retrained"] <= bound, c
    assert c["d_pretrained_retrained"] > bound
    m = c["mass_near_forgotten"]
    p = max(m["retrained"], 1.0 / n)
    assert abs(m["unlearned"] - m["retrained"]) <= 3 * np.sqrt(2 * p * (1 - p) / n), m


def test_fu_primal_dual_on_a_finite_set_respects_lam_le_one_over_n(tmp_path):
    """A budget no target in the dual domain reaches drives lam to the boundary 1/n, never past it."""
    from theory.diffusion import alphas_cumprod_for_schedule
    from toy.data_unlearning import finite_set_experiment
    from toy.models import EpsMLP
    ab = torch.tensor(alphas_cumprod_for_schedule(100, 1e-3, 0.2), dtype=torch.float32)
    pts = default_instance().q.sample(8, np.random.default_rng(3))
    res = finite_set_experiment(pts, [0], ab, tmp_path / "fs", seed=0, steps=60, batch=64, algorithm="primal_dual",
                                budgets=[1e6], lr_dual=1e-3, pretrained=EpsMLP(2, 16, 2, 8, 100))
    assert res.lam[0] == pytest.approx(1 / 8, abs=1e-12) and res.upper[0] == 1 / 8


# ---------------------------------------------------------------- fast, default-suite checks

def _ar1(rng, n, tau, sd, reps):
    """AR(1) noise of correlation time tau (phi = 1 - 1/tau) and stationary sd, (reps, n)."""
    phi = 1.0 - 1.0 / tau
    e = rng.normal(0.0, sd * np.sqrt(1 - phi ** 2), (reps, n))
    x = np.empty((reps, n))
    x[:, 0] = rng.normal(0.0, sd, reps)
    for i in range(1, n):
        x[:, i] = phi * x[:, i - 1] + e[:, i]
    return x


def test_lam_window_is_derived_from_the_gain_and_its_drift_error_matches_monte_carlo():
    """The window after 3 tau (tau = 1/gain), and the drift's standard error ``sd sqrt(8 tau / W)``
    against the spread of the drift over 400 independent AR(1) trajectories of correlation time tau
    (the dual iterates' noise model): ratio within [0.7, 1.4] (400 replications: the sample sd's
    relative error is 1/sqrt(800) = 3.5%, the formula's approximation of finite-W AR(1) sums the rest);
    at most 3% of stationary trajectories flagged unsettled (nominal 0.3% at 3 se); an expected
    drift of 6 se always flagged. (With the default LU loop, tau = 31 and W = 57 dual steps, so
    se = 2.1 sd: the check only sees drifts of several sd; the window is short against tau.)"""
    from toy.algorithms import lam_window
    rng = np.random.default_rng(0)
    n, gain, sd = 150, 0.032, 1.5
    tau = 1 / gain
    x = 20.0 + _ar1(rng, n, tau, sd, 400)
    wins = [lam_window(xi[:, None], gain) for xi in x]
    assert wins[0]["length"] == n - int(np.ceil(3 * tau)) and wins[0]["start"] == int(np.ceil(3 * tau))
    drifts = np.array([w["drift"][0] for w in wins])
    ses = np.array([w["drift_se"][0] for w in wins])
    assert 0.7 <= drifts.std() / ses.mean() <= 1.4, (drifts.std(), ses.mean())
    assert np.mean([not w["settled"] for w in wins]) <= 0.03
    # a linear rise of 12 se across the window: expected drift (half-mean difference) 6 se, 3 se above
    # the threshold, itself noisy with sd 1 se -> flagged but for a 3-sigma fluke (none in 50)
    start, W = wins[0]["start"], wins[0]["length"]
    se = sd * np.sqrt(8 * tau / W)
    ramp = x[:50] + np.clip(np.arange(n) - start, 0, None)[None, :] * (12 * se / W)
    assert all(not lam_window(r[:, None], gain)["settled"] for r in ramp)
    np.testing.assert_allclose(wins[0]["mean"], x[0, wins[0]["start"]:].mean())
    with pytest.raises(ValueError, match="gain must be > 0, got 0"):
        lam_window(x[0][:, None], 0)


def test_reported_lam_stderr_matches_monte_carlo_over_ar1_trajectories():
    """``lam_stderr``: the standard error of the window mean ``sd sqrt(2 tau / W)`` against the spread
    of the mean over 400 AR(1) trajectories of correlation time tau (RU's loop: tau = 1/0.3, the last
    25% of 150 dual steps; FU's: tau = 50, the last 25% of 3000): ratio within [0.7, 1.4]; a window
    shorter than 2 tau gives sd; fixed multipliers give 0. (LU's window is 1.8 tau long: there the
    residual sd about the fitted line underestimates the noise and the se comes out 1.6x small, a
    stricter constraint check; docs/toy.md.)"""
    from toy.algorithms import lam_stderr
    rng = np.random.default_rng(1)
    for gain, n, start in ((0.3, 150, 150 - 38), (0.02, 3000, 2250)):
        tau = 1 / gain
        x = 0.13 + _ar1(rng, n, tau, 0.006, 400)
        means = x[:, start:].mean(1)
        ses = np.array([lam_stderr(xi[:, None], gain, start)[0] for xi in x])
        assert 0.7 <= means.std() / ses.mean() <= 1.4, (gain, means.std(), ses.mean())
    short = lam_stderr(x[0][:, None], 0.01, x.shape[1] - 10)  # W = 10 < 2 tau = 200: the residual sd itself
    tail = x[0, -10:]
    resid = tail - np.polyval(np.polyfit(np.arange(10), tail, 1), np.arange(10))
    np.testing.assert_allclose(short[0], np.sqrt((resid ** 2).sum() / 8), rtol=1e-9)
    assert lam_stderr(x[0][:, None], 0.0, 100)[0] == 0.0 and lam_stderr(x[0][:2, None], 0.3, 0)[0] == 0.0


def test_ru_primal_targets_are_the_composed_surrogate_at_eta_of_lam():
    """The regression target the RU primal step trains towards (single run and ensemble), checked
    against theory's surrogate eps at lam (``reverse_kl_target(...).surrogate_eps``, the composed
    score with eta = lam / (1 - lam)): with exact mixture scores in place of the frozen network, a
    network equal to theory's surrogate has loss 0 (to float32), one at another multiplier does not.
    Training towards lam instead of eta (lam = 0.2: eta = 0.25) fails this."""
    from theory.diffusion import alphas_cumprod_for_schedule
    from theory.gmm import reverse_kl_target
    from toy.algorithms import ru_primal_loss
    from toy.models import MixtureEps
    from toy.core.objectives import eta_from_lam
    inst = default_instance()
    ab = torch.tensor(alphas_cumprod_for_schedule(100, 1e-3, 0.2), dtype=torch.float32)
    qe = MixtureEps.from_mixture(inst.q, ab)
    fe = [MixtureEps.from_mixture(f, ab) for f in inst.forget]
    lam = 0.2

    def theory_net(lam_net):
        th = reverse_kl_target(inst.q, list(inst.forget), [lam_net])

        def f(x, t):
            return torch.as_tensor(np.stack([th.surrogate_eps(x[i:i + 1].double().numpy(), float(ab[t[i]]))[0]
                                             for i in range(len(t))]), dtype=torch.float32)
        return f

    x0 = torch.as_tensor(inst.q.sample(64, np.random.default_rng(1)), dtype=torch.float32)
    eta = eta_from_lam(torch.tensor([lam], dtype=torch.float64)).float()
    exact = ru_primal_loss(theory_net(lam), qe, fe, x0, ab, torch.Generator().manual_seed(0), eta)
    other = ru_primal_loss(theory_net(0.25), qe, fe, x0, ab, torch.Generator().manual_seed(0), eta)
    assert float(exact) <= 1e-10 and float(other) > 1e-4, (float(exact), float(other))


@pytest.mark.parametrize("how", ["single", "ensemble"])
def test_ru_training_loops_pass_eta_of_lam_to_the_composed_target(tmp_path, monkeypatch, how):
    """The callers of ``composed_eps_target`` (the single-run loop and the ensemble) hand it
    eta = lam / (1 - lam) of the current multiplier (0.25 at lam = 0.2, written out here), and ESD's
    fixed eta unchanged; a loop that passes lam itself trains towards the wrong surrogate."""
    import toy.algorithms as alg
    from toy.ensemble import run_ensemble
    tiny = {"model.hidden": 8, "model.layers": 1, "model.time_dim": 4, "pretrain.steps": 5, "pretrain.batch": 16,
            "train.steps": 2, "train.batch": 16, "train.dual_every": 20, "train.pool_every": 2, "train.dual_batch": 8,
            "train.checkpoint_every": 10, "evaluation.n_eval": 50, "evaluation.n_constraint": 50,
            "evaluation.n_reference": 50, "figure": False, "evaluation.surrogate_reference": False}
    seen = []

    def spy(eps_q, eps_forget, eta):
        seen.append(float(eta.reshape(-1)[0]))
        return alg.__dict__["_real_composed"](eps_q, eps_forget, eta)

    alg.__dict__.setdefault("_real_composed", alg.composed_eps_target)
    monkeypatch.setattr(alg, "composed_eps_target", spy)
    cfgs = [override(ToyConfig(), {**tiny, "problem": "reverse_kl", "dual.lam_init": (0.2,), "dual.lr": 0.0,
                                   "out": str(tmp_path / "pd")}),
            override(ToyConfig(), {**tiny, "problem": "reverse_kl", "algorithm": "esd", "eta": 1.5,
                                   "out": str(tmp_path / "esd")})]
    if how == "single":
        for c in cfgs:
            run(c)
    else:
        run_ensemble(cfgs, tmp_path / "ens", workers=1)  # the spy lives in this process
    assert 0.25 in [round(v, 6) for v in seen] and 1.5 in [round(v, 6) for v in seen]
    assert 0.2 not in [round(v, 6) for v in seen]


# ---------------------------------------------------------------- seed ensembles

#: the default suite's ensemble: a smaller network and schedule (hidden 64, 1000 steps). Every
#: tolerance is derived from the run's own estimates (the network's error at p = q, standard
#: errors, noise floors), so the checks keep their meaning at this size. FU passes them at five
#: seeds; LU and RU do not at 1000 steps (measured: LU misses the constraint at 3 of 5 seeds — its
#: dual loop needs 3 tau ~ 1900 steps to settle; RU one seed each), so LU and RU run at the default
#: size below (five seeds, one ensemble of 15 members).
SMALL = {"model.hidden": 64, "pretrain.steps": 1500, "train.steps": 1000, "evaluation.n_eval": 1000,
         "evaluation.n_constraint": 4000, "evaluation.n_reference": 1000, "train.checkpoint_every": 1000}
SEEDS = (0, 1, 2, 3, 4)


def _default_budgets(problems):
    inst = default_instance()
    return {p: [float(inst.budgets[p][0])] for p in problems}


@pytest.fixture(scope="module")
def small_ensemble(tmp_path_factory):
    """FU primal-dual at the default budget over five seeds, plus ESD, SISS and RU dual-only at
    seed 0 (sharing its pretraining), trained as one ensemble each."""
    from toy.sweep import run_sweep
    out = tmp_path_factory.mktemp("seed-ensemble")
    base = override(ToyConfig(), SMALL)
    res = run_sweep(out / "fu", base, problems=("forward_kl",), budgets=_default_budgets(["forward_kl"]), seeds=SEEDS,
                    baselines=False, figure=False)
    bl = run_sweep(out / "bl", replace(base, pretrained=str(out / "fu" / "pretrained-seed0.pt")),
                   problems=("reverse_kl", "forward_kl"), budgets=_default_budgets(["reverse_kl", "forward_kl"]),
                   seeds=(0,), baselines=True, figure=False)
    return res["records"] + [r for r in bl["records"] if r["algorithm"] != "primal_dual"]


def test_fu_primal_dual_meets_its_checks_at_five_seeds(small_ensemble):
    """lam within its derived tolerance of lam*, the constraint within 3 se, the distance within
    the noise bound, at every one of five seeds (each with its own pretrained network)."""
    rs = [r for r in small_ensemble if r["problem"] == "forward_kl" and r["algorithm"] == "primal_dual"]
    assert sorted(r["seed"] for r in rs) == list(SEEDS)
    failed = {r["seed"]: r["verdict"]["failed"] for r in rs if not r["verdict"]["passed"]}
    assert not failed, failed


@pytest.mark.parametrize("algorithm", ["esd", "siss", "dual_only"])
def test_baselines_land_on_the_law_their_target_defines(small_ensemble, algorithm):
    """ESD: the frozen network's composed chain at eta = 1; SISS: the signed mixture at lam = 0.30;
    dual-only: lam = lam* (1e-6) and the exact-score surrogate's law at lam*."""
    (r,) = [r for r in small_ensemble if r["algorithm"] == algorithm]
    assert r["verdict"]["passed"], r["verdict"]["failed"]


@pytest.fixture(scope="module")
def default_size_ensemble(tmp_path_factory):
    """LU and RU (both primal targets) primal-dual at the default configuration and budget over five
    seeds, one ensemble of 15 members (each seed its own pretrained network, shared by its three)."""
    from toy.sweep import run_sweep
    res = run_sweep(tmp_path_factory.mktemp("seeds-default"), ToyConfig(), problems=("reverse_kl", "likelihood"),
                    budgets=_default_budgets(["reverse_kl", "likelihood"]), seeds=SEEDS, baselines=False,
                    figure=False)
    return res["records"]


def test_lu_primal_dual_meets_its_checks_at_five_seeds(default_size_ensemble):
    """LU at the default configuration over five seeds: lam within its derived tolerance and settled
    over its window, the constraint within 3 se, the distance within the noise bound, at every seed."""
    rs = [r for r in default_size_ensemble if r["problem"] == "likelihood"]
    assert sorted(r["seed"] for r in rs) == list(SEEDS)
    failed = {r["seed"]: r["verdict"]["failed"] for r in rs if not r["verdict"]["passed"]}
    assert not failed, failed


@pytest.mark.parametrize("target", ["reweighted", "composed"])
def test_ru_primal_dual_meets_its_checks_at_five_seeds(default_size_ensemble, target):
    """RU at the default configuration over five seeds, both targets. Two things made it pass (it
    failed at seeds 3 and 4 before, docs/toy.md): the final network is settled at the reported
    multiplier (the constraint had tracked the last, noisy dual iterate: off by 0.5-0.8 nats), and
    the constraint's tolerance carries the reported multiplier's own standard error through the
    constraint's slope (``lam_stderr``; measured spread of the end-of-run constraint across the ten
    members 0.18 nats against estimate errors of 0.06-0.11)."""
    rs = [r for r in default_size_ensemble if r["problem"] == "reverse_kl" and r["target"] == target]
    assert sorted(r["seed"] for r in rs) == list(SEEDS)
    failed = {r["seed"]: r["verdict"]["failed"] for r in rs if not r["verdict"]["passed"]}
    assert not failed, failed
