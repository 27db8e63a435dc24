"""Budget calibration at the pretrained model (loaded as the run loads it), suggested budgets and
the checks that refuse budgets already met at step 0 or out of reach."""

from __future__ import annotations

import gc
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from theory.report import Check

if TYPE_CHECKING:
    from accelerate import Accelerator

    from scale.concept import ConceptConfig
    from scale.data import DataConfig
    from scale.models import ConceptModels, DDPMModels, Trainable

GROUPS = 8
#: constraint-estimate agreement of a resumed run with the uninterrupted one: CPU kernels are


def grouped_mean_se(values: torch.Tensor, groups: int = GROUPS) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the last axis of ``values`` (..., n) and its standard error from ``g = min(groups, n)``
    equal contiguous groups: ``se = sd(group means, ddof=1) / sqrt(g)`` (``nan`` for one group)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.shape[-1]
    g = max(1, min(groups, n))
    bounds = [(n * k // g, n * (k + 1) // g) for k in range(g)]
    means = torch.stack([v[..., lo:hi].mean(-1) for lo, hi in bounds], -1)
    mean = v.mean(-1)
    se = means.std(-1, unbiased=True) / math.sqrt(g) if g > 1 else torch.full_like(mean, float("nan"))
    return mean.numpy(), se.numpy()


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _describe_trainable(trainable) -> str:
    if trainable.mode == "lora":
        mods = sorted({n.split(".lora_")[0] for n in trainable.names if ".lora_" in n})
        return f"LoRA on {len(mods)} modules (e.g. {', '.join(mods[:2])})"
    if trainable.mode == "attn2":
        mods = sorted({n.split(".attn2.")[0] + ".attn2" for n in trainable.names})
        return f"full fine-tuning of {len(mods)} cross-attention (attn2) modules"
    return "every UNet parameter"


def load_like_run(kind: str, cfg: ConceptConfig | DataConfig
                  ) -> tuple[ConceptModels | DDPMModels, Trainable, Accelerator, dict]:
    """The run's own loading: loader, accelerator, trainable set. Returns ``(models, trainable,
    accelerator, counts)``; ``counts`` reports parameters, trainable parameters, modules and dtypes."""
    from scale.engine import make_accelerator
    from scale.models import Trainable, load_concept_models, load_ddpm_models

    acc = make_accelerator(cfg.train)
    if kind == "concept":
        models = load_concept_models(cfg.model, cfg.local_files_only)
        trainable = Trainable(models.unet, cfg.trainable, cfg.lora_rank, cfg.lora_alpha or None,
                              cfg.lora_targets, seed=cfg.train.seed)
        parts = {"unet": models.unet, "text_encoder": models.text_encoder, "vae": models.vae}
    else:
        models = load_ddpm_models(cfg.model, cfg.local_files_only)
        trainable = Trainable(models.unet, cfg.trainable, seed=cfg.train.seed)
        parts = {"unet": models.unet}
    models.unet.to(acc.device)
    if kind == "concept":
        models.text_encoder.to(acc.device)
    n_train = sum(p.numel() for p in trainable.parameters())
    counts = {name: _count(m) for name, m in parts.items() if m is not None}
    counts |= {"total": sum(counts.values()), "trainable": n_train, "trainable_fraction": n_train / max(1, counts["unet"]),
               "trainable_modules": _describe_trainable(trainable),
               "dtypes": sorted({str(p.dtype).replace("torch.", "") for m in parts.values() if m is not None
                                 for p in m.parameters()}),
               "mixed_precision": cfg.train.mixed_precision, "device": str(acc.device),
               "param_bytes": sum(p.numel() * p.element_size() for m in parts.values() if m is not None
                                  for p in m.parameters()),
               "optimizer_bytes": n_train * 4 * (3 if cfg.train.optimizer == "adam" else 1)}
    return models, trainable, acc, counts


def _concept_estimates(task, dual, steps: int, B: int, dual_only: bool) -> torch.Tensor:
    """(m, G * steps) group means of the step function's constraint estimate at the current multipliers."""
    from scale.engine import Slice

    g = max(d for d in range(1, min(GROUPS, B) + 1) if B % d == 0)  # equal groups
    cols = []
    with torch.no_grad():
        for s in range(steps):
            for k in range(g):
                out = task.step(s, Slice(k, g), dual, dual_only=dual_only)
                cols.append((out.measured_sum / out.measured_count).double())
    return torch.stack(cols, 1)


def calibrate_concept(cfg: ConceptConfig, models: ConceptModels, trainable: Trainable, acc: Accelerator, draws: int = 1) -> dict:
    """Budget calibration of a concept config at the pretrained model (see the module docstring)."""
    from scale.concept import ConceptTask, initial_dual
    from toy.core.dual import DualState

    task = ConceptTask(cfg, models, trainable, acc, models.unet)
    m, B = len(cfg.concepts), cfg.train.batch_size
    dual = initial_dual(cfg) if cfg.method != "esd" else DualState("reverse_kl", torch.zeros(m), 0.0)
    out: dict = {"kind": "concept", "method": cfg.method, "concepts": list(cfg.concepts),
                 "sample_steps": cfg.sample_steps, "batch": B, "draws": draws}
    if cfg.method == "likelihood":
        step0 = _concept_estimates(task, dual, draws, B, dual_only=False)
        out["step0"], out["step0_se"] = grouped_mean_se(step0, step0.shape[1])
    else:  # every trainable mode starts at the pretrained weights: p = q_i under c_i, KL = 0 exactly
        out["step0"], out["step0_se"] = np.zeros(m), np.zeros(m)
    if cfg.method == "likelihood":
        from scale.diffusion import likelihood_weight

        out["quantity"] = f"E_p[g] ({cfg.likelihood_constraint}) at the pretrained model"
        out["scale"], out["scale_se"] = out["step0"], out["step0_se"]
        # g = r is clamped below at exp(-likelihood_log_ratio_max); g = log r is unclamped and unbounded below
        lo = (float(likelihood_weight(torch.tensor([-1e9]), cfg.likelihood_constraint, cfg.likelihood_log_ratio_max)[0][0])
              if cfg.likelihood_constraint == "likelihood_ratio" else -math.inf)
        out["achievable"] = [[lo, float(v)] for v in out["step0"]]
        out["direction"] = "upper"  # E_p[g] <= budget
        return out
    ru = DualState("reverse_kl", torch.zeros(m), 0.0, sum_max=cfg.lam_sum_max)
    base = _concept_estimates(task, ru, draws, B, dual_only=True)
    out["scale"], out["scale_se"] = grouped_mean_se(base, base.shape[1])
    out["quantity"] = "path KL(p || q_i) of the strided chain"
    top, top_se = np.zeros(m), np.zeros(m)
    for i in range(m):
        lam = torch.zeros(m, dtype=torch.float64)
        lam[i] = cfg.lam_sum_max
        ru.lam = lam
        est = _concept_estimates(task, ru, draws, B, dual_only=True)
        mu, se = grouped_mean_se(est, est.shape[1])
        top[i], top_se[i] = mu[i], se[i]
    out["top"], out["top_se"] = top, top_se
    out["achievable"] = [[float(a), float(b)] for a, b in zip(out["step0"], top)]
    out["direction"] = "lower"  # KL >= budget
    out["eta_max"] = cfg.lam_sum_max / (1 - cfg.lam_sum_max)
    return out


def calibrate_data(cfg: DataConfig, models: DDPMModels, draws: int = 16) -> dict:
    """Each forget image's denoising loss at the pretrained model over ``draws`` seeded (timestep,
    noise) draws, with its standard error over the draws.

    The top of the achievable range is 1, the loss ``E||eps||^2 / d`` of predicting zero noise: at the
    end of the dual domain (``n lam_i = 1``) the Lagrangian's minimiser is the model retrained without
    the forget images, an estimate of the denoiser of the remaining data, whose expected loss on a
    fresh image of that distribution is at most the zero predictor's. An image on which the
    pretrained model is already worse than that (loss >= 1, e.g. a random initialisation) has no
    known top (``inf``)."""
    from scale.data import denoising_losses, forget_loss_seed, list_images, load_images, resolve_forget

    files = list_images(cfg.train_dir)
    idx = resolve_forget(cfg, files)
    imgs = load_images([files[i] for i in idx], models.sample_shape)
    ab = models.alphas_cumprod
    g = torch.Generator().manual_seed(forget_loss_seed(cfg.train.seed))
    m = imgs.shape[0]
    t = torch.randint(0, ab.numel(), (draws, m), generator=g)
    noise = torch.randn((draws, *imgs.shape), generator=g)
    rep = imgs.unsqueeze(0).expand(draws, *imgs.shape).reshape(-1, *imgs.shape[1:])
    losses = denoising_losses(models.unet, rep, t.reshape(-1), noise.reshape(-1, *imgs.shape[1:]), ab)
    losses = losses.reshape(draws, m).double().T  # (m, draws)
    mean = losses.mean(1).numpy()
    se = (losses.std(1, unbiased=True) / math.sqrt(draws)).numpy()
    return {"kind": "data", "method": cfg.method, "forget": [files[i].name for i in idx], "draws": draws,
            "quantity": "denoising loss of each forget image (mean over dimensions)",
            "step0": mean, "step0_se": se, "scale": mean, "scale_se": se,
            "achievable": [[float(v), 1.0 if v < 1.0 else float("inf")] for v in mean], "direction": "lower",
            "n_train": len(files)}


def config_budgets(kind: str, cfg: ConceptConfig | DataConfig, cal: dict) -> np.ndarray | None:
    """The budgets the run will use (``None`` for ESD and for SISS without budgets)."""
    m = len(cal["step0"])
    if kind == "concept":
        if cfg.method == "esd":
            return None
        b = list(cfg.budgets)
    else:
        if cfg.budgets:
            b = list(cfg.budgets)
        elif cfg.budget_factor > 0:
            return cfg.budget_factor * np.asarray(cal["step0"], dtype=float)
        else:
            return None
    return np.asarray(b * (m if len(b) == 1 else 1), dtype=float)


def suggest_budgets(cal: dict, likelihood_constraint: str = "") -> list[list[float]]:
    """Budgets as multiples of the measured scale, inside the achievable range, per constraint."""
    out = []
    for k, (s, (lo, hi)) in enumerate(zip(np.asarray(cal["scale"], dtype=float), cal["achievable"])):
        if cal["kind"] == "concept" and cal["method"] == "likelihood":
            if likelihood_constraint == "log_likelihood_ratio":
                cands = [s - f * max(abs(s), 1e-12) for f in (0.5, 1.0, 2.0)]
            else:
                cands = [f * s for f in (0.5, 0.25, 0.1)]
            out.append([float(c) for c in cands if lo < c < s])
        elif cal["kind"] == "concept":
            out.append([float(f * s) for f in (0.5, 1.0, 2.0, 4.0) if cal["step0"][k] < f * s < hi])
        else:
            out.append([float(c) for c in ([s + f * (hi - s) for f in (0.25, 0.5, 0.75)] if math.isfinite(hi)
                                            else [f * s for f in (1.1, 1.25, 1.5)])])
    return out


def budget_checks(cal: dict, budgets: np.ndarray | None) -> list[Check]:
    """Refuse budgets already met at step 0 or outside the achievable range."""
    if budgets is None:
        return [Check("budgets", "n/a (no constraint: fixed multiplier)", "n/a", True)]
    checks = []
    names = cal.get("concepts") or cal.get("forget")
    for i, b in enumerate(budgets):
        v0, se0 = float(cal["step0"][i]), float(cal["step0_se"][i])
        lo, hi = cal["achievable"][i]
        who = f"{names[i]!r}" if names else f"constraint {i}"
        if cal["direction"] == "lower":  # measured >= budget
            met = v0 >= b
            out_of_range = b >= hi if cal["kind"] == "data" else b > hi + 3 * float(cal["top_se"][i])
            range_text = f"< {hi:.4g}" + (" (3 se above the top)" if cal["kind"] == "concept" else "")
        else:  # E_p[g] <= budget
            met = v0 <= b
            out_of_range = b <= lo
            range_text = f"> {lo:.4g}"
        checks.append(Check(f"budget {who} not met at step 0", f"step 0: {v0:.4g} +- {se0:.2g}, budget {b:.4g}",
                            f"budget {'>' if cal['direction'] == 'lower' else '<'} step-0 value", not met))
        checks.append(Check(f"budget {who} achievable", f"budget {b:.4g}", f"budget {range_text}", not out_of_range))
    return checks


def refusal_message(cal: dict, budgets: np.ndarray | None, checks: list[Check], suggestions: list[list[float]]) -> str:
    """The refusal of the failed budget checks, with the suggested budgets (``""`` when none failed)."""
    bad = [c for c in checks if not c.passed and c.name.startswith("budget")]
    if not bad:
        return ""
    lines = ["refused budget(s):"]
    for c in bad:
        kind = "already met at step 0" if "not met" in c.name else "cannot be met"
        lines.append(f"  {c.name.replace(' not met at step 0', '').replace(' achievable', '')}: {kind} ({c.measured}; "
                     f"needs {c.expected})")
    lines.append(f"measured scale ({cal['quantity']}): "
                 + ", ".join(f"{s:.4g} +- {e:.2g}" for s, e in zip(cal["scale"], cal["scale_se"])))
    lines.append("suggested budgets: " + "; ".join(str([float(f'{x:.4g}') for x in s]) for s in suggestions))
    return "\n".join(lines)


def on_gpu(cfg: ConceptConfig | DataConfig) -> bool:
    """Whether the run would train on a GPU (one is there and the config does not ask for the CPU)."""
    return torch.cuda.is_available() and not cfg.train.cpu


def calibrate(kind: str, cfg: ConceptConfig | DataConfig, draws: int = 0, batch: int = 0) -> tuple[dict, dict]:
    """Load like the run and calibrate: ``(calibration, counts)`` (full resolution, config's sampler
    steps; concept estimates from ``draws`` global batches of ``batch`` samples, by default 1 x min(config, 4)
    on CPU and 4 x the config's batch on a GPU)."""
    models, trainable, acc, counts = load_like_run(kind, cfg)
    draws = draws or (4 if on_gpu(cfg) else 1)
    B = batch or (cfg.train.batch_size if on_gpu(cfg) else min(cfg.train.batch_size, 4))
    if kind == "concept":
        cfg = replace(cfg, train=replace(cfg.train, batch_size=B, micro_batch=B))
        cal = calibrate_concept(cfg, models, trainable, acc, draws)
    else:
        cal = calibrate_data(cfg, models, max(8, 8 * draws))
    cal["min_sample_size"] = __import__("scale.models", fromlist=["min_sample_size"]).min_sample_size(models.unet)
    cal["sample_size"] = models.sample_shape[1]
    del models, trainable
    gc.collect()
    return cal, counts
