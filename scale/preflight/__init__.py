"""``dualunlearn scale preflight`` and ``dualunlearn scale calibrate``: check the run a researcher is
about to launch -- their model folder, their config, their budgets -- before spending GPU hours.

The pre-flight

1. loads the model with the run's own loader and trainable-parameter set (LoRA targets, rank, mode)
   and reports parameter counts;
2. calibrates the budgets at the pretrained model, at the model's full resolution and with the
   config's sampler steps (the quantities the constraints bound depend on both):
   RU/ESD: the path KL of the reference composed at the largest allowed multiplier
   (``eta_max = lam_sum_max / (1 - lam_sum_max)``) to each concept (the top of the achievable range;
   the bottom is the step-0 value, 0 for a model equal to its reference) and the scale
   ``K_i = KL(q_base || q_i)`` along the strided chain (``lam = 0``); LU: ``E_p[g_i]`` at the pretrained
   model; FU: each forget image's denoising loss. Standard errors come from ``G`` equal groups of
   the estimate's independent samples (``se = sd(group means) / sqrt(G)``). Budgets already met at
   step 0 or outside the achievable range are refused (exit status 1) with suggested budgets
   (multiples of the measured scale);
3. runs ``--steps`` optimiser steps of the configured method through the run's own ``run(cfg)``
   (on CPU at a reduced resolution, by default the smallest the UNet accepts, with a small batch and
   few sampler steps; on a GPU as configured), checks finite losses, that every multiplier moves in
   the direction its violation says (or sits on the boundary of the dual domain), and that a run
   stopped after one step and resumed reproduces the uninterrupted run's losses, multipliers and
   constraint estimates;
4. measures seconds per step and peak memory and projects the full run (``project_run``);
5. writes ``preflight.md``, ``preflight.json`` and the run's pictures (``scale.figures``).

Modules: ``config`` (the run's kind and config), ``calibration`` (step 2 and the budget checks),
``checks`` (step 3's direction and resume checks), ``projection`` (step 4), ``runner``
(``preflight``: the whole sequence, step 5), ``cli`` (the commands and the ``verify`` section).
"""

from scale.preflight.calibration import (GROUPS, budget_checks, calibrate, calibrate_concept, calibrate_data,
                                         config_budgets, grouped_mean_se, load_like_run, on_gpu, refusal_message,
                                         suggest_budgets)
from scale.preflight.checks import RESUME_RTOL, direction_check, initial_multipliers, resume_check
from scale.preflight.cli import calibration_table, main_calibrate, main_preflight, register, verify_section
from scale.preflight.config import KINDS, detect_kind, load_run_config
from scale.preflight.projection import PeakMemory, Projection, project_run, unet_evals_per_step
from scale.preflight.runner import PreflightOptions, preflight

__all__ = ["GROUPS", "budget_checks", "calibrate", "calibrate_concept", "calibrate_data", "config_budgets",
           "grouped_mean_se", "load_like_run", "on_gpu", "refusal_message", "suggest_budgets", "RESUME_RTOL",
           "direction_check", "initial_multipliers", "resume_check", "calibration_table", "main_calibrate",
           "main_preflight", "register", "verify_section", "KINDS", "detect_kind", "load_run_config", "PeakMemory",
           "Projection", "project_run", "unet_evals_per_step", "PreflightOptions", "preflight"]
