"""Conditional spread of the LU log-ratio estimator (``ConceptTask.likelihood_log_ratio``) at fixed end points,
at Stable Diffusion's latent size 4x64x64 and schedule, on the exact harness of
``tests/test_scale_exact.py`` (docs/scale.md, "LU (likelihood)"). Prints the markdown table.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/likelihood_estimator_variance.py
"""
import math

import torch

from tests.test_scale_exact import _concept_task, _instance, _chain_laws, SHAPE, D
from scale.engine import Slice
from toy.core.diffusion import strided_timesteps, add_noise
from scale.exact import sd_scheduler
from toy.core.objectives import denoising_loss
torch.set_num_threads(1)
(mu_b, var_b), (mu_c, var_c), (mu_p, var_p) = _instance()
ab = sd_scheduler().alphas_cumprod.double()
_, (m0, v0) = _chain_laws(ab, strided_timesteps(1000, 20).tolist(), mu_p, var_p)
g = torch.Generator().manual_seed(11)
X = 4
x0 = (m0 + v0.sqrt() * torch.randn(X, D, generator=g, dtype=torch.float64)).float().reshape(X, *SHAPE)
true = ((-0.5*torch.log(var_c/var_b)) - (x0.reshape(X,-1).double()-mu_c)**2/(2*var_c) + (x0.reshape(X,-1).double()-mu_b)**2/(2*var_b)).sum(1)
R = 48
print("true log ratio at the 4 end points:", [round(float(v),1) for v in true])
print("| estimator | K | ref. forwards per end point | mean - true (avg over 4 points) | conditional sd (nats) | sd x sqrt(forwards) |")
print("|---|---|---|---|---|---|")
for K in (1, 4, 16, 64):
    for strata, anti in (("uniform", False), ("uniform", True)):
        task = _concept_task("likelihood", 20, X, classifier_draws=K, likelihood_antithetic=anti)
        est = torch.stack([task.likelihood_log_ratio(x0, torch.Generator().manual_seed(100 + r), X, Slice(0, 1))[0] for r in range(R)])
        sd = est.std(0).mean().item(); bias = (est.mean(0) - true).mean().item()
        f = K * (2 if anti else 1) * 2
        print(f"| equal strata{' + antithetic' if anti else ''} | {K} | {f} | {bias:+.2f} | {sd:.2f} | {sd*math.sqrt(f):.1f} |")
    # the old scheme: K iid uniform t, one noise draw each (no stratification, no antithetic pair)
    task = _concept_task("likelihood", 20, X, classifier_draws=K, likelihood_antithetic=False)
    w = task.w_full; vals = []
    for r in range(R):
        gg = torch.Generator().manual_seed(500 + r); tot = torch.zeros(X, dtype=torch.float64)
        ts = torch.randint(0, 1000, (K, X), generator=gg); nz = torch.randn((K, X, *SHAPE), generator=gg)
        for j in range(K):
            xt = add_noise(x0, nz[j], ab[ts[j]].float())
            eb, ec = task._ref_eps(xt, ts[j])
            tot += (1000 * w[ts[j]] * D * (denoising_loss(eb, nz[j]).double() - denoising_loss(ec[0], nz[j]).double())) / K
        vals.append(tot)
    est = torch.stack(vals)
    print(f"| iid uniform t (previous) | {K} | {2*K} | {(est.mean(0)-true).mean().item():+.2f} | {est.std(0).mean().item():.2f} | {est.std(0).mean().item()*math.sqrt(2*K):.1f} |")
