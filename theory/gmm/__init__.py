"""Gaussian mixtures under the diffusion process (``docs/math.md``): exact densities, scores and
noise predictions at every noise level, and the unlearning theory on them.

Public API (import everything from ``theory.gmm``; decisions in ``docs/theory-gmm.md``):

- ``GaussianMixture(weights, means, covs)``: ``log_prob(x, alpha_bar=1)``, ``score(x, alpha_bar=1)``,
  ``eps(x_t, alpha_bar)`` (exact at every noise level), ``noised(alpha_bar)``, ``sample(n, rng)``.
- ``SignedMixture(weights, means, covs)``: weights of either sign, non-negativity checked
  (``ValueError`` if the density goes negative); same methods, exact at every noise level.
- ``default_instance() -> (q, forget, budgets)``: the 2-D three-mode mixture, forget = its third
  mode, ``budgets[problem]`` (m,) for ``problem in theory.PROBLEMS``.
- Targets (Lagrangian minimisers at fixed lam (m,)), each with ``.log_prob(x)`` (x_0),
  ``.score(x, alpha_bar=1)``, ``.sample(n, rng)``, ``.eps(x_t, alpha_bar)``:
    ``forward_kl_target(q, forget, lam)`` -> ``SignedMixture`` (eps exact at every t);
    ``reverse_kl_target(q, forget, lam)`` -> ``TiltedMixture``; ``.eps`` is the composed-score
    surrogate ``eps_q - sum eta_i (eps_{q_i} - eps_q)`` (ESD form, exact only at t = 0),
    ``.exact_eps(x_t, alpha_bar)`` the exact noised tilt's (quadrature, d <= 2);
    ``likelihood_target(q, forget, lam, variant="likelihood")`` -> ``TiltedMixture`` (variants
    ``"likelihood"`` g = q_i, ``"log_likelihood"`` g = log q_i, ``"likelihood_ratio"`` g = q_i/q);
    ``.eps`` is the EXACT noised Gibbs tilt's (through q's posterior, Gauss-Hermite, ~1e-5; scalar
    or per-sample alpha_bar), ``.surrogate_eps`` the tilt formula on the noised mixtures
    (pathological for "likelihood": do not train on it).
    Every target has ``eps_is_exact``; ``.score(x, alpha_bar)`` of a tilt is its formula (exact at
    alpha_bar = 1); ``.log_weight(x)`` = log(p_lam/q) at x_0, the weight of reweighted DSM (exact
    target at every t; bounded for LU likelihood/likelihood_ratio). ``target(problem, ...)``
    dispatches on the problem.
- ``constraint_value(problem, p, forget_i, variant="likelihood", q=None)``: RU ``KL(p||q_i)``,
  FU ``KL(q_i||p)``, LU ``E_p[g_i]`` (q needed for ``likelihood_ratio``);
  ``objective_value(problem, p, q)``.
- ``dual_function(problem, q, forget, lam, budgets, variant=...) -> (D, grad)``.
- ``solve(problem, q, forget, budgets, variant="likelihood") -> theory.solution.Solution`` with
  lam*, P*, D*, gap and a KKT certificate (d <= 2, quadrature).
- Closed forms for single Gaussians (the tests' oracles): ``gaussian_kl``, ``gaussian_power_tilt``,
  ``gaussian_reverse_kl_solution``.
- Sampling: ``probability_flow_sample`` (probability-flow ODE with exact log-densities),
  ``ddpm_sample``, ``surrogate_gap`` (surrogate vs exact tilt) and ``forget_mode_mass_fn``.
- Analysis along the dual path: ``mode_masses``, ``retained_mode_shift``, ``lam_for_forget_mass``,
  ``esd_lam``, ``sweep``.

Modules, lowest first: ``mixture`` (the mixture classes, the default instance, instance
validation), ``quadrature`` (grids, integrals, importance sampling), ``targets``, ``dual``,
``sampling``, ``analysis``, ``verify`` (the ``dualunlearn verify`` section; matplotlib, not
imported here). The budget and variant rules are ``theory.validation``'s, shared with
``theory.discrete`` and the toy tier.
"""

from theory.gmm.analysis import esd_lam, lam_for_forget_mass, mode_masses, retained_mode_shift, sweep
from theory.gmm.dual import (dual_function, gaussian_kl, gaussian_power_tilt, gaussian_reverse_kl_solution,
                             solve)
from theory.gmm.mixture import GaussianMixture, SignedMixture, default_instance, min_log_ratio
from theory.gmm.sampling import ddpm_sample, forget_mode_mass_fn, probability_flow_sample, surrogate_gap
from theory.gmm.targets import (TiltedMixture, constraint_value, forward_kl_target, likelihood_target,
                                objective_value, reverse_kl_eta_max, reverse_kl_target, target)
from theory.validation import DEFAULT_VARIANT, VARIANTS

__all__ = [
    "GaussianMixture", "SignedMixture", "min_log_ratio", "default_instance", "VARIANTS", "DEFAULT_VARIANT",
    "TiltedMixture", "reverse_kl_target", "forward_kl_target", "likelihood_target", "target", "reverse_kl_eta_max",
    "constraint_value", "objective_value", "dual_function", "solve", "gaussian_kl", "gaussian_power_tilt",
    "gaussian_reverse_kl_solution", "probability_flow_sample", "ddpm_sample", "surrogate_gap",
    "forget_mode_mass_fn", "mode_masses", "retained_mode_shift", "lam_for_forget_mass", "esd_lam", "sweep",
]
