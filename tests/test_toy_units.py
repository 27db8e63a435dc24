"""Toy-tier building blocks against independent computations: exact torch mixture eps vs theory's
numpy eps, target adapters vs theory's targets, toy quadrature lam* vs ``theory.gmm.solve``,
samplers with exact scores vs the mixture, and the run machinery (resume, refusal, divergence, CLI).
"""

import json

import numpy as np
import pytest
import torch

import theory.gmm as gmm
from theory.diffusion import alphas_cumprod_for_schedule
from toy.distances import energy_distance
from toy.models import ComposedEps, EpsMLP, GibbsTiltEps, MixtureEps, SignedMixtureEps
from toy.core.objectives import eta_from_lam
from toy.problems import check_budgets, default_instance
from toy.reference import Quadrature
from toy.sampling import ddim_sample, ddpm_sample

torch.set_num_threads(1)
AB = alphas_cumprod_for_schedule(100, 1e-3, 0.2)


@pytest.fixture(scope="module")
def inst():
    return default_instance()


def _points(seed, n=64):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(0, 1.5, (n, 2)))
    t = torch.as_tensor(rng.integers(0, 100, n))
    return x, t


def test_mixture_eps_equals_theory_eps_at_every_timestep(inst):
    x, t = _points(0)
    ex = MixtureEps.from_mixture(inst.q, AB)
    ref = np.stack([inst.q.eps(x[i:i + 1].numpy(), AB[t[i]])[0] for i in range(len(t))])
    np.testing.assert_allclose(ex(x, t).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(ex.log_prob(x).numpy(), inst.q.log_prob(x.numpy()), atol=1e-10)


def test_eps_of_a_single_training_point_is_the_noise():
    a = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    ex = MixtureEps.from_points(a, AB)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.arange(0, 96, 6)
    ab = torch.as_tensor(AB)[t].unsqueeze(1)
    x_t = ab.sqrt() * a + (1 - ab).sqrt() * z
    np.testing.assert_allclose(ex(x_t, t).numpy(), z.numpy(), atol=1e-9)


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
def test_target_adapters_equal_theory_targets_eps(inst, problem):
    q, forget = inst.q, list(inst.forget)
    qe, fe = MixtureEps.from_mixture(q, AB), [MixtureEps.from_mixture(f, AB) for f in forget]
    lam = {"reverse_kl": [0.2], "forward_kl": [0.2], "likelihood": [15.0]}[problem]
    if problem == "reverse_kl":
        ours, th = ComposedEps(qe, fe, eta_from_lam(torch.tensor(lam, dtype=torch.float64))), gmm.reverse_kl_target(q, forget, lam)
    elif problem == "forward_kl":
        ours, th = SignedMixtureEps(qe, fe, lam), gmm.forward_kl_target(q, forget, lam)
    else:
        ours, th = GibbsTiltEps(qe, fe, lam, "likelihood", qe), gmm.likelihood_target(q, forget, lam)
    x, t = _points(1, 32)
    eps = getattr(th, "surrogate_eps", th.eps)  # ours are the plug-in formulas at t > 0 (FU: exact)
    ref = np.stack([eps(x[i:i + 1].numpy(), AB[t[i]])[0] for i in range(len(t))])
    np.testing.assert_allclose(ours(x, t).numpy(), ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
def test_toy_quadrature_lam_star_agrees_with_theory_solve(inst, problem):
    b = inst.budgets[problem]
    ours = Quadrature(problem, inst.q, list(inst.forget)).solve(float(b[0]))
    theirs = gmm.solve(problem, inst.q, list(inst.forget), b).lam[0]
    assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (ours, theirs)


def test_exact_score_samplers_reproduce_the_mixture(inst):
    """DDPM (T = 100) and DDIM (100 steps) with exact eps: energy distance to fresh mixture samples
    within the T = 100 discretisation bias plus 4.25 noise floors (docs/toy.md)."""
    n = 2000
    rng = np.random.default_rng(0)
    ref = inst.q.sample(n, rng)
    floor = energy_distance(inst.q.sample(n, rng), inst.q.sample(n, rng))
    ex = MixtureEps.from_mixture(inst.q, AB)
    for x in (ddpm_sample(ex, n, AB, torch.Generator().manual_seed(1)),
              ddim_sample(ex, n, AB, torch.Generator().manual_seed(2), num_steps=100)):
        assert energy_distance(x, ref) <= 4.25 * floor + 2e-3


def test_unachievable_budgets_are_refused_with_the_range(inst):
    """The refusal names theory's answer, not the toy grid's: beyond the achievable range (FU: the
    constraint at the dual domain's edge lam_max = 0.3 is 11.17 < 50), or achievable by theory with a
    KKT certificate but not representable on the toy's fixed grid (RU 1000: lam* = 0.916)."""
    with pytest.raises(ValueError, match=r"beyond the achievable range of forward_kl .*KL\(q_1\|\|p\) = 11\.17"):
        check_budgets("forward_kl", inst.q, list(inst.forget), [50.0])
    with pytest.raises(ValueError, match=r"achievable \(theory.gmm.solve: lam\* = 0\.916.*kkt\), but the toy cannot"):
        check_budgets("reverse_kl", inst.q, list(inst.forget), [1000.0])
    with pytest.raises(ValueError, match=r"likelihood: budgets\[0\] = 0 cannot be met"):
        check_budgets("likelihood", inst.q, list(inst.forget), [0.0])


def test_pretrained_model_saves_and_reloads(tmp_path):
    from toy.pretrain import load_model, save_model
    net = EpsMLP(2, 16, 2, 8, 100)
    save_model(tmp_path / "m.pt", net, {"k": 1})
    net2, meta = load_model(tmp_path / "m.pt")
    x, t = torch.randn(5, 2), torch.arange(5)
    assert torch.equal(net(x, t), net2(x, t)) and meta == {"k": 1}


# ---------------------------------------------------------------- run machinery on a tiny config

TINY = {"model.hidden": 16, "model.layers": 2, "model.time_dim": 8, "pretrain.steps": 150, "pretrain.batch": 128,
        "train.steps": 40, "train.batch": 64, "train.forget_batch": 32, "train.dual_every": 6, "train.pool_every": 2,
        "train.dual_batch": 16, "train.checkpoint_every": 10, "evaluation.n_eval": 200, "evaluation.n_constraint": 400,
        "evaluation.n_reference": 200, "figure": False}


def tiny(**values):
    """The tiny config with ``values`` (dotted keys as ``toy.config.override``'s, or top-level ones)."""
    from toy.config import ToyConfig, override
    return override(ToyConfig(), {**TINY, **values})


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    from toy.run import pretrain_on_mixture
    path = tmp_path_factory.mktemp("tiny") / "pretrained.pt"
    pretrain_on_mixture(default_instance().q, tiny(), "pretrain", path)
    return path


@pytest.mark.parametrize("problem, estimate", [("forward_kl", None), ("likelihood", None), ("likelihood", "fresh"),
                                               ("reverse_kl", None), ("reverse_kl", "fresh")])
def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_pretrained, problem, estimate):
    """Every estimator's state resumes exactly: RU and LU's trajectory pool (positions, partial sums,
    end points) as well as fresh trajectories."""
    from toy.run import run
    kw = {"problem": problem, "pretrained": str(tiny_pretrained), "evaluation.surrogate_reference": False,
          "train.estimate": estimate}
    full = run(tiny(out=str(tmp_path / "full"), **kw))
    part = run(tiny(out=str(tmp_path / "part"), **kw), stop_after=25)
    assert part == {"interrupted_at": 20}
    # and once more inside the settling phase (steps 40..43 at the reported lam): checkpoint at 40
    assert run(tiny(out=str(tmp_path / "part"), **kw), stop_after=22) == {"interrupted_at": 40}
    resumed = run(tiny(out=str(tmp_path / "part"), **kw))
    assert resumed["lam"] == pytest.approx(full["lam"], abs=0) or np.array_equal(resumed["lam"], full["lam"])
    np.testing.assert_array_equal(np.load(tmp_path / "part" / "samples.npy"), np.load(tmp_path / "full" / "samples.npy"))
    rows = [json.loads(line) for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(44))  # 40 steps with dual steps, 4 settling
    assert [r.get("phase") for r in rows[40:]] == ["settle"] * 4
    assert all(r["lam"] == rows[40]["lam"] for r in rows[40:])
    np.testing.assert_allclose(rows[40]["lam"], full["lam"], rtol=1e-12)  # settled at the reported lam


@pytest.mark.parametrize("bad_value, message", [(float("nan"), "non-finite constraint estimate"),
                                                 (1.0, "multipliers diverged")])
def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_pretrained, monkeypatch,
                                                                   bad_value, message):
    """A non-finite constraint estimate, or multipliers driven past lam_max, stop the run at the
    dual step where it happens; the checkpoint of step 10 (the last before) stays as it was."""
    import toy.algorithms as alg
    from toy.run import run
    real = alg.lu_constraint_exact
    calls = {"n": 0}

    def estimate(*a, **k):  # the genuine estimate for the first two dual steps, then bad values
        calls["n"] += 1
        m, se = real(*a, **k)
        return (m, se) if calls["n"] <= 2 else (torch.full_like(m, bad_value), se)

    monkeypatch.setattr(alg, "lu_constraint_exact", estimate)
    cfg = tiny(out=str(tmp_path / "div"), problem="likelihood", pretrained=str(tiny_pretrained),
               **{"dual.lr": 400.0, "dual.lam_max": 300.0})
    with pytest.raises(FloatingPointError, match=message + r".*dual step 2.*last good checkpoint"):
        run(cfg)
    from toy.core.runs import CheckpointStore
    ckpt, _ = CheckpointStore(tmp_path / "div" / "checkpoint").load()
    assert ckpt["step"] == 10 and torch.all(torch.isfinite(ckpt["dual"]["lam"]))
    assert float(ckpt["dual"]["lam"].max()) <= 300.0
    assert not (tmp_path / "div" / "summary.json").exists()


def test_cli_runs_a_case_and_writes_summary_and_figure(tmp_path, tiny_pretrained):
    from dualunlearn.cli import main
    over = [f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in TINY.items() if k != "figure"]
    args = ["toy", "--problem", "forward_kl", "--out", str(tmp_path / "cli"), "--no-progress",
            "--set", f'pretrained="{tiny_pretrained}"'] + sum((["--set", o] for o in over), [])
    assert main(args) == 0
    s = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for key in ("problem", "budgets", "lam", "lam_star", "constraint_values", "distance_to_target", "distance_noise_floor"):
        assert key in s
    assert (tmp_path / "cli" / "toy.png").stat().st_size > 0
    assert main(["toy", "--problem", "forward_kl", "--budget", "99", "--out", str(tmp_path / "bad")]) == 2


def test_verify_section_quick_passes_with_its_figure(tmp_path):
    from toy.verify import verify_section
    sec = verify_section(tmp_path, quick=True, seed=0)
    assert sec.checks and sec.passed, [c for c in sec.checks if not c.passed]
    assert all((tmp_path / f).stat().st_size > 0 for f in sec.figures)


def test_mode_switch_is_skipped_only_for_networks_without_mode_dependent_layers():
    from toy.loop import has_mode_dependent_layers
    from toy.models import EpsMLP
    assert not has_mode_dependent_layers(EpsMLP())
    assert has_mode_dependent_layers(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Dropout(0.1)))
    assert has_mode_dependent_layers(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    assert not has_mode_dependent_layers(lambda x, t: x)  # exact models are plain callables


def test_pool_layout_is_a_function_of_its_phase_and_rejects_a_foreign_state():
    """The pool tabulates each phase's timesteps; a state whose timesteps are not one of them
    (another pool's, or edited) is refused rather than silently re-laid out."""
    from toy.sampling import TrajectoryPool
    ab = torch.linspace(0.999, 0.01, 10)
    pool = TrajectoryPool(ab, 20, 4)
    exact = lambda x, t: torch.zeros_like(x)
    g = torch.Generator().manual_seed(0)
    pool.fill(exact, g)
    for _ in range(13):
        t_before = pool.t.clone()
        pool.advance(exact, g)
        assert torch.equal(pool.t, torch.where(t_before == 0, 9, t_before - 1))
        assert torch.equal(torch.bincount(pool.t, minlength=10), torch.full((10,), 2))
    state = pool.state_dict()
    other = TrajectoryPool(ab, 20, 4)
    other.load_state_dict(state)
    assert torch.equal(other.t, pool.t) and other._phase == pool._phase
    state["t"] = state["t"].flip(0)
    with pytest.raises(ValueError, match="staggered layout"):
        other.load_state_dict(state)


def test_eps_mlp_looks_up_the_same_time_embedding_and_refuses_timesteps_outside_the_schedule():
    from toy.models import timestep_embedding
    net = EpsMLP(num_timesteps=50)
    t = torch.tensor([0, 7, 49])
    x = torch.randn(3, 2)
    direct = net.net(torch.cat([x, timestep_embedding(t, 32, 50)], 1))
    assert torch.equal(net(x, t), direct)
    for bad in (torch.tensor([50]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="timesteps must lie in"):
            net(x[:1], bad)
    assert "_emb" not in net.state_dict()  # saved models do not carry the table


def test_lu_network_estimator_runs_on_the_pool_end_points_with_the_log_scale_step(tmp_path, tiny_pretrained):
    """The diffusion-classifier estimate of the ratio variant (forget network against the
    pretrained one) at the pool's end points: at p = q the ratio's mean is above the budget, so the
    log-scale dual step must raise lam from 0 (the path otherwise only runs in docs/toy.md's study)."""
    from toy.run import run
    s = run(tiny(out=str(tmp_path / "net"), problem="likelihood", variant="likelihood_ratio",
                 pretrained=str(tiny_pretrained), **{"dual.lu_estimator": "network", "evaluation.surrogate_reference": False}))
    assert s["constraint_estimator"] == "pool" and s["violation_scale"] == "log"
    assert np.all(np.isfinite(s["lam"])) and s["lam"][0] > 0


@pytest.mark.parametrize("variant", ["likelihood", "likelihood_ratio", "log_likelihood"])
def test_gibbs_tilt_eps_target_is_minus_sigma_times_the_tilts_score_by_finite_differences(variant):
    """The LU target's noise prediction is -sigma * grad log(q exp(-lam g)) with g = q_1, q_1/q or
    log q_1 (docs/math.md eq. 29). Here q = N(0, I), q_1 = N((1.5, -0.5), 0.5^2 I) in 2-D, written out
    in numpy; the expected score is a central difference of log q - lam g (step 1e-5: truncation
    ~1e-10, rounding ~1e-11), the inputs are the closed-form Gaussian scores. The sum is only
    checked in float64, so 1e-7 is far above both errors and far below the size of a wrong sign."""
    from toy.models import gibbs_tilt_eps_target

    mu1, s1 = np.array([1.5, -0.5]), 0.5
    sigma, lam = 0.6, 0.8

    def log_q(x):
        return -0.5 * np.sum(x * x, -1) - np.log(2 * np.pi)

    def log_q1(x):
        return -0.5 * np.sum((x - mu1) ** 2, -1) / s1**2 - np.log(2 * np.pi * s1**2)

    g_of = {"likelihood": lambda x: np.exp(log_q1(x)), "likelihood_ratio": lambda x: np.exp(log_q1(x) - log_q(x)),
            "log_likelihood": log_q1}[variant]
    x = np.random.default_rng(3).normal(size=(16, 2)) + np.array([0.7, -0.2])
    h = 1e-5
    score = np.stack([((log_q(x + h * e) - lam * g_of(x + h * e)) - (log_q(x - h * e) - lam * g_of(x - h * e))) / (2 * h)
                      for e in np.eye(2)], axis=1)
    eps_q = -sigma * (-x)
    eps_1 = -sigma * (-(x - mu1) / s1**2)
    got = gibbs_tilt_eps_target(torch.tensor(eps_q), torch.tensor(eps_1)[None], torch.tensor(g_of(x))[None],
                                torch.tensor([lam], dtype=torch.float64), variant)
    np.testing.assert_allclose(got.numpy(), -sigma * score, atol=1e-7)
