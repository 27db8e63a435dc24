"""``toy.sampling.TrajectoryPool`` against independent computations: its amortised path-KL estimate
against fresh trajectories (``path_kl_to_models``), its end points against the mixture they should
sample, its stratification invariant, exact resumption, and its refusals."""

import numpy as np
import pytest
import torch

from theory.diffusion import alphas_cumprod_for_schedule
from toy.distances import energy_distance
from toy.models import MixtureEps
from toy.problems import default_instance
from toy.sampling import TrajectoryPool, path_kl_to_models

torch.set_num_threads(1)
AB = alphas_cumprod_for_schedule(100, 1e-3, 0.2)


@pytest.fixture(scope="module")
def exact():
    inst = default_instance()
    return inst, MixtureEps.from_mixture(inst.q, AB), MixtureEps.from_mixture(inst.forget[0], AB)


def test_pool_path_kl_agrees_with_fresh_trajectories(exact):
    """Same functional, two estimators: 4000 fresh ancestral trajectories vs 2000 pool advances
    (20 takes of 100). Their difference must lie within 3 combined standard errors; the pool's
    error is the spread of its 20 takes (independent enough: each take is one chain lifetime)."""
    _, q, f = exact
    g = torch.Generator().manual_seed(0)
    kl, per, _ = path_kl_to_models(q, [f], 4000, AB, g)
    se_fresh = float(per.std(1)[0]) / np.sqrt(4000)
    pool = TrajectoryPool(AB, 100, 16)
    pool.fill(q, g)
    takes, ses = [], []
    for _ in range(20):
        for _ in range(100):
            pool.advance(q, g, (f,))
        est, se = pool.take_path_kl()
        takes.append(float(est[0]))
        ses.append(float(se[0]))
    se_pool = np.std(takes, ddof=1) / np.sqrt(len(takes))
    assert abs(np.mean(takes) - float(kl[0])) <= 3 * np.hypot(se_fresh, se_pool), (np.mean(takes), float(kl[0]))
    # the slot-spread standard error of one take is conservative but of the right size
    assert 0.7 * np.std(takes, ddof=1) <= np.mean(ses) <= 2.0 * np.std(takes, ddof=1)


def test_pool_end_points_sample_the_model_law(exact):
    """With exact eps the pool's end points are DDPM samples of q: the sampler test's bound
    (discretisation bias plus 4.25 noise floors, docs/toy.md)."""
    inst, q, _ = exact
    n = 2000
    g = torch.Generator().manual_seed(1)
    pool = TrajectoryPool(AB, 200, n)
    pool.fill(q, g)
    for _ in range(n // 2):
        pool.advance(q, g)
    x = pool.samples()
    assert x.shape == (n, 2)
    rng = np.random.default_rng(0)
    floor = energy_distance(inst.q.sample(n, rng), inst.q.sample(n, rng))
    assert energy_distance(x, inst.q.sample(n, rng)) <= 4.25 * floor + 2e-3


def test_pool_keeps_equal_chains_per_timestep_and_resumes_exactly(exact):
    _, q, f = exact
    g = torch.Generator().manual_seed(2)
    pool = TrajectoryPool(AB, 200, 8)
    pool.fill(q, g)
    for _ in range(37):
        pool.advance(q, g, (f,))
        assert torch.equal(torch.bincount(pool.t, minlength=100), torch.full((100,), 2))
    state, gstate = pool.state_dict(), g.get_state()
    for _ in range(5):
        pool.advance(q, g, (f,))
    a = pool.take_path_kl()[0], pool.samples().clone(), pool.x.clone()
    other = TrajectoryPool(AB, 200, 8)
    other.load_state_dict(state)
    g.set_state(gstate)
    for _ in range(5):
        other.advance(q, g, (f,))
    b = other.take_path_kl()[0], other.samples(), other.x
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_pool_refuses_bad_sizes_and_misuse(exact):
    _, q, f = exact
    with pytest.raises(ValueError, match="multiple of the number of timesteps T = 100"):
        TrajectoryPool(AB, 150, 8)
    pool = TrajectoryPool(AB, 100, 8)
    with pytest.raises(RuntimeError, match="fill"):
        pool.advance(q, torch.Generator())
    pool.fill(q, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="no path-KL terms"):
        pool.take_path_kl()
    with pytest.raises(ValueError, match="does not fit"):
        TrajectoryPool(AB, 200, 8).load_state_dict(pool.state_dict())
