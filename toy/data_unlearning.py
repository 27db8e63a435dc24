"""FU on a finite training set (eq. 14): q is the empirical law of n points,
the forget distributions are single points ``delta(a_i)``, the dual domain is ``lam_i <= 1/n``,
and at ``lam_i = 1/n`` the signed objective is exactly ``(n-k)/n`` times the retain-set loss, so
unlearning there must reproduce retraining without the forgotten points.

``finite_set_experiment`` pretrains on all n points, then from the same pretrained weights runs
(a) the signed loss (SISS without importance sampling, or primal-dual) and (b) retraining on the
retained points by plain denoising score matching, with the same optimiser, steps and seed; and a
second retraining with another seed, whose distance to the first is the training-noise floor.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from toy.algorithms import LoopConfig, Models
from toy.loop import unlearn
from toy.distances import energy_distance
from toy.core.dual import DualState, dual_domain
from toy.core.hints import Floats
from toy.models import EpsMLP, MixtureEps
from toy.pretrain import PointData, train_denoiser
from toy.core.runs import RunDir
from toy.core.seeding import derive_seed, seeded_generator
from toy.sampling import ddpm_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FiniteSetResult:
    pretrained: EpsMLP
    unlearned: EpsMLP
    retrained: EpsMLP
    retrained_other_seed: EpsMLP
    lam: np.ndarray
    upper: np.ndarray


def retrain(net: EpsMLP, points: Floats, ab: torch.Tensor, steps: int, batch: int, lr: float, seed: int, lr_final_frac: float) -> EpsMLP:
    """Plain DSM on ``points`` from ``net``'s weights, with ``unlearn``'s optimiser and lr schedule."""
    net = copy.deepcopy(net).train().requires_grad_(True)
    data = PointData(points, derive_seed(seed, "retrain:data"))
    gen = seeded_generator(seed, "retrain:noise")
    from toy.core.objectives import denoising_loss
    from toy.core.diffusion import noised
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        frac = lr_final_frac + (1 - lr_final_frac) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        x_t, t, z = noised(data(batch), ab, gen)
        loss = denoising_loss(net(x_t, t), z).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite retraining loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def finite_set_experiment(points: npt.ArrayLike, forget_idx: list[int], ab: torch.Tensor, out: Path, seed: int = 0, pretrain_steps: int = 3000,
                          steps: int = 2000, batch: int = 256, lr: float = 1e-3, hidden: int = 128,
                          algorithm: str = "siss", budgets: Floats | None = None, lr_dual: float = 0.0, forget_batch: int | None = None,
                          pretrained: EpsMLP | None = None) -> FiniteSetResult:
    """See the module docstring. ``algorithm="siss"``: lam fixed at 1/n for every forget point;
    ``"primal_dual"``: lam from 0 by dual ascent on the ELBO constraint with the given budgets,
    projected onto ``lam_i <= 1/n``."""
    points = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    n = points.shape[0]
    keep = [i for i in range(n) if i not in set(forget_idx)]
    ab = torch.as_tensor(ab, dtype=torch.float32)
    if pretrained is None:
        torch.manual_seed(derive_seed(seed, "pretrain:init"))
        pretrained = EpsMLP(points.shape[1], hidden, 3, 32, ab.shape[0])
        train_denoiser(pretrained, PointData(points, derive_seed(seed, "pretrain:data")), ab, pretrain_steps, batch, 2e-3,
                       seeded_generator(seed, "pretrain:noise"))
    pretrained.eval().requires_grad_(False)
    net = copy.deepcopy(pretrained).train().requires_grad_(True)
    upper = np.asarray(dual_domain("forward_kl", len(forget_idx), n_train=n).upper)
    fixed = algorithm == "siss"
    b = np.zeros(len(forget_idx)) if budgets is None else np.asarray(budgets, dtype=np.float64)
    dual = DualState("forward_kl", b, 0.0 if fixed else lr_dual, upper if fixed else None, upper)
    models = Models(net=net, frozen=pretrained, forget=[], retain_data=PointData(points, derive_seed(seed, "retain")),
                    forget_data=[PointData(points[i:i + 1], derive_seed(seed, f"forget{k}"))
                                 for k, i in enumerate(forget_idx)],
                    alphas_cumprod=ab, forget_exact=[MixtureEps.from_points(points[i:i + 1], ab) for i in forget_idx])
    loop = LoopConfig(steps=steps, batch=batch, forget_batch=forget_batch or batch, lr=lr, checkpoint_every=steps,
                      dual_every=10, lr_final_frac=0.1, pool_frac=0.0, target="composed", estimate="pool", pool_every=1,
                      settle_frac=0.0)  # SISS is fixed, and primal-dual here rides the domain edge lam = 1/n
    unlearn("forward_kl", "primal_dual" if not fixed else "siss", models, dual, loop, RunDir(out, {"n": n}, seed),
            seeded_generator(seed, "unlearn"))
    r1 = retrain(pretrained, points[keep], ab, steps, batch, lr, derive_seed(seed, "retrain"), 0.1)
    r2 = retrain(pretrained, points[keep], ab, steps, batch, lr, derive_seed(seed, "retrain:other-seed"), 0.1)
    return FiniteSetResult(pretrained, net.eval(), r1, r2, dual.lam.numpy().copy(), upper)


def mass_near(x: torch.Tensor, point: Floats, radius: float) -> float:
    """Fraction of samples within ``radius`` of ``point``."""
    return float(((x - torch.as_tensor(point, dtype=x.dtype)).norm(dim=1) < radius).double().mean())


def compare_to_retraining(res: FiniteSetResult, points: torch.Tensor, forget_idx: list[int], ab: torch.Tensor,
                          n_samples: int, seed: int, radius: float) -> dict:
    """Samples of every model; distances of the unlearned and of the other-seed retrained model to
    the retrained one; mass near the forgotten points."""
    g = lambda k: seeded_generator(seed, f"compare:{k}")  # noqa: E731
    xs = {name: ddpm_sample(m, n_samples, ab, g(i)) for i, (name, m) in enumerate(
        [("pretrained", res.pretrained), ("unlearned", res.unlearned), ("retrained", res.retrained),
         ("retrained_other_seed", res.retrained_other_seed)])}
    xr2 = ddpm_sample(res.retrained, n_samples, ab, g(10))
    pts = torch.as_tensor(np.asarray(points), dtype=torch.float32)
    return {
        "d_unlearned_retrained": energy_distance(xs["unlearned"], xs["retrained"]),
        "d_seed_retrained": energy_distance(xs["retrained_other_seed"], xs["retrained"]),
        "d_pretrained_retrained": energy_distance(xs["pretrained"], xs["retrained"]),
        "floor": energy_distance(xr2, xs["retrained"]),
        "mass_near_forgotten": {name: sum(mass_near(x, pts[i], radius) for i in forget_idx) for name, x in xs.items()},
        "samples": xs,
    }
