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
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from theory.config import config_to_dict, load_config
from theory.report import Check, Section, render_markdown, render_table
from toy.core.runs import jsonable

log = logging.getLogger(__name__)

KINDS = ("concept", "data")
#: standard errors: the calibration samples are split into this many equal groups (at most)
GROUPS = 8
#: constraint-estimate agreement of a resumed run with the uninterrupted one: CPU kernels are
#: deterministic (exact equality); CUDA kernels may reorder float sums
RESUME_RTOL = {"cpu": 0.0, "cuda": 1e-3}


# ---------------------------------------------------------------- config


def detect_kind(config_file: str | None, overrides: list[str] | None = None) -> str:
    """``concept`` for a config with ``concepts``, ``data`` for one with ``train_dir``/``forget``."""
    from theory.config import tomllib

    keys: set[str] = set()
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        with open(p, "rb") as fh:
            keys |= set(tomllib.load(fh))
    keys |= {ov.split("=", 1)[0].strip().split(".")[0] for ov in overrides or [] if "=" in ov}
    if "concepts" in keys:
        return "concept"
    if keys & {"train_dir", "forget", "forget_list"}:
        return "data"
    raise ValueError(f"cannot tell a concept config (with 'concepts') from a data config (with 'train_dir'); "
                     f"keys found: {sorted(keys)}; pass --kind concept|data")


def load_run_config(config_file: str | None, overrides: list[str] | None = None, kind: str | None = None,
                    placeholder_budgets: bool = False):
    """``(kind, cfg)``: the run's frozen config. ``placeholder_budgets`` (calibration for writing a
    config) fills in a budget where the config has none yet; it is never used."""
    from scale.concept import ConceptConfig
    from scale.data import DataConfig

    kind = kind or detect_kind(config_file, overrides)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cls = ConceptConfig if kind == "concept" else DataConfig
    ov = list(overrides or [])
    try:
        return kind, load_config(cls, config_file, ov)
    except ValueError as exc:
        if not placeholder_budgets or "budget" not in str(exc):
            raise
        extra = ["budgets=[1.0]"] if kind == "concept" else ["budget_factor=1.0"]
        return kind, load_config(cls, config_file, ov + extra)


# ---------------------------------------------------------------- statistics


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


# ---------------------------------------------------------------- projection


def unet_evals_per_step(kind: str, cfg, m_forget: int = 1) -> float:
    """UNet image-evaluations of one optimizer step over all processes (a backward counted as two
    forwards). Concept: per image the on-policy chain (counted as ``S - 1`` steps: a micro-batch runs to
    its latest stop), ``1 + m`` reference evaluations and one trained forward + backward, the same again
    for the retain states when there are retain prompts, and ``K (1 + m)`` diffusion-classifier
    evaluations for LU. Data: forward + backward of every training image and, for FU/SISS, of the
    ``m K`` forget draws."""
    B = cfg.train.batch_size
    if kind == "concept":
        S, m = cfg.sample_steps, len(cfg.concepts)
        per_image = (S - 1) + (1 + m) + 3
        if cfg.retain_prompts:
            per_image += (S - 1) + 1 + 3
        if cfg.method == "lu":
            per_image += cfg.classifier_draws * (1 + m)
        return float(B * per_image)
    m = m_forget
    if cfg.method == "siss_is":
        return 3.0 * B
    return 3.0 * (B + m * cfg.forget_draws)


@dataclass(frozen=True)
class Projection:
    step_seconds: float
    wall_seconds: float
    memory_mib: float
    assumption: str


def project_run(*, step_seconds: float, evals_measured: float, evals_full: float, pixels_measured: int,
                pixels_full: int, processes: int, steps_full: int, mem_base_mib: float, mem_fixed_mib: float,
                mem_peak_mib: float, micro_measured: int, micro_full: int) -> Projection:
    """The full run's step time, wall time and peak memory per process from one measured configuration.

    Assumptions (stated in the report): a step's time is proportional to the UNet image-evaluations
    each process does (``evals / processes``) times the pixels per image, so
    ``t_full = t * (evals_full / processes * pixels_full) / (evals_measured * pixels_measured)`` and the
    wall time is ``steps_full * t_full`` (no data-parallel overhead); peak memory is a fixed part
    (``mem_base``: the process before loading; ``mem_fixed``: parameters, gradients and optimizer state)
    plus activations proportional to the micro-batch times the pixels, measured as
    ``max(0, peak - base - fixed)``.
    """
    if min(step_seconds, evals_measured, evals_full, pixels_measured, pixels_full, processes,
           micro_measured, micro_full) <= 0:
        raise ValueError(f"projection inputs must be positive, got step_seconds={step_seconds}, "
                         f"evals={evals_measured}/{evals_full}, pixels={pixels_measured}/{pixels_full}, "
                         f"processes={processes}, micro-batch={micro_measured}/{micro_full}")
    t_full = step_seconds * (evals_full / processes * pixels_full) / (evals_measured * pixels_measured)
    act = max(0.0, mem_peak_mib - mem_base_mib - mem_fixed_mib)
    mem = mem_base_mib + mem_fixed_mib + act * (micro_full * pixels_full) / (micro_measured * pixels_measured)
    text = ("step time proportional to UNet image-evaluations per process x pixels per image; wall time = "
            "steps x step time (no data-parallel overhead); memory = fixed (process, parameters, gradients, "
            "optimizer state) + activations proportional to micro-batch x pixels")
    return Projection(t_full, t_full * steps_full, mem, text)


class PeakMemory:
    """Peak memory (MiB) of the code inside the context: CUDA max allocated on a GPU, else the process's
    resident set size sampled every 20 ms."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def current(device: str) -> float:
        if device == "cuda":
            return torch.cuda.memory_allocated() / 2 ** 20
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current("cpu"))
            self._stop.wait(0.02)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._t = threading.Thread(target=self._watch, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self.current("cpu"))
        return False


# ---------------------------------------------------------------- loading and counts


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


def load_like_run(kind: str, cfg):
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


# ---------------------------------------------------------------- calibration


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


def calibrate_concept(cfg, models, trainable, acc, draws: int = 1) -> dict:
    """Budget calibration of a concept config at the pretrained model (see the module docstring)."""
    from scale.concept import ConceptTask, initial_dual
    from toy.core.dual import DualState

    task = ConceptTask(cfg, models, trainable, acc, models.unet)
    m, B = len(cfg.concepts), cfg.train.batch_size
    dual = initial_dual(cfg) if cfg.method != "esd" else DualState("reverse_kl", torch.zeros(m), 0.0)
    out: dict = {"kind": "concept", "method": cfg.method, "concepts": list(cfg.concepts),
                 "sample_steps": cfg.sample_steps, "batch": B, "draws": draws}
    if cfg.method == "lu":
        step0 = _concept_estimates(task, dual, draws, B, dual_only=False)
        out["step0"], out["step0_se"] = grouped_mean_se(step0, step0.shape[1])
    else:  # every trainable mode starts at the pretrained weights: p = q_i under c_i, KL = 0 exactly
        out["step0"], out["step0_se"] = np.zeros(m), np.zeros(m)
    if cfg.method == "lu":
        from scale.diffusion import lu_weight

        out["quantity"] = f"E_p[g] ({cfg.lu_constraint}) at the pretrained model"
        out["scale"], out["scale_se"] = out["step0"], out["step0_se"]
        # g = r is clamped below at exp(-lu_log_ratio_max); g = log r is unclamped and unbounded below
        lo = (float(lu_weight(torch.tensor([-1e9]), cfg.lu_constraint, cfg.lu_log_ratio_max)[0][0])
              if cfg.lu_constraint == "likelihood_ratio" else -math.inf)
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


def calibrate_data(cfg, models, draws: int = 16) -> dict:
    """Each forget image's denoising loss at the pretrained model over ``draws`` seeded (timestep,
    noise) draws, with its standard error over the draws.

    The top of the achievable range is 1, the loss ``E||eps||^2 / d`` of predicting zero noise: at the
    end of the dual domain (``n lam_i = 1``) the Lagrangian's minimiser is the model retrained without
    the forget images, an estimate of the denoiser of the remaining data, whose expected loss on a
    fresh image of that distribution is at most the zero predictor's. An image on which the
    pretrained model is already worse than that (loss >= 1, e.g. a random initialisation) has no
    known top (``inf``)."""
    from scale.data import denoising_losses, list_images, load_images, resolve_forget

    files = list_images(cfg.train_dir)
    idx = resolve_forget(cfg, files)
    imgs = load_images([files[i] for i in idx], models.sample_shape)
    ab = models.alphas_cumprod
    g = torch.Generator().manual_seed(cfg.train.seed + 12345)
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


def config_budgets(kind: str, cfg, cal: dict) -> np.ndarray | None:
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


def suggest_budgets(cal: dict, lu_constraint: str = "") -> list[list[float]]:
    """Budgets as multiples of the measured scale, inside the achievable range, per constraint."""
    out = []
    for k, (s, (lo, hi)) in enumerate(zip(np.asarray(cal["scale"], dtype=float), cal["achievable"])):
        if cal["kind"] == "concept" and cal["method"] == "lu":
            if lu_constraint == "log_likelihood_ratio":
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


def refusal_message(cal: dict, budgets, checks: list[Check], suggestions) -> str:
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


# ---------------------------------------------------------------- the pre-flight


@dataclass(frozen=True)
class PreflightOptions:
    out: str = "runs/preflight"
    steps: int = 5
    resolution: int = 0          # 0: the smallest the UNet accepts on CPU, the full one on a GPU
    batch: int = 0               # 0: min(config, 2) on CPU, the config's on a GPU
    sample_steps: int = 0        # 0: min(config, 4) on CPU, the config's on a GPU
    processes: int = 1           # processes of the real run (projection)
    calibration_draws: int = 0   # 0: 1 on CPU, 4 on a GPU (global batches per calibration estimate)
    calibration_batch: int = 0   # 0: min(config, 4) on CPU, the config's on a GPU
    resume_check: bool = True

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the resume check stops after one step), got {self.steps}")
        if min(self.resolution, self.batch, self.sample_steps, self.calibration_draws) < 0 or self.processes < 1:
            raise ValueError("resolution, batch, sample_steps, calibration_draws must be >= 0 and processes >= 1")


def _on_gpu(cfg) -> bool:
    return torch.cuda.is_available() and not cfg.train.cpu


def calibrate(kind: str, cfg, draws: int = 0, batch: int = 0) -> tuple[dict, dict]:
    """Load like the run and calibrate: ``(calibration, counts)`` (full resolution, config's sampler
    steps; concept estimates from ``draws`` global batches of ``batch`` samples, by default 1 x min(config, 4)
    on CPU and 4 x the config's batch on a GPU)."""
    models, trainable, acc, counts = load_like_run(kind, cfg)
    draws = draws or (4 if _on_gpu(cfg) else 1)
    B = batch or (cfg.train.batch_size if _on_gpu(cfg) else min(cfg.train.batch_size, 4))
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


def _preflight_config(kind: str, cfg, opts: PreflightOptions, out: Path, gpu: bool):
    B = opts.batch or (cfg.train.batch_size if gpu else min(cfg.train.batch_size, 2))
    train = replace(cfg.train, steps=opts.steps, batch_size=B, micro_batch=min(cfg.train.micro_batch, B) if gpu else B,
                    checkpoint_every=10 ** 9, log_with="")
    kw = {"out": str(out), "train": train}
    if kind == "concept":
        kw["sample_steps"] = opts.sample_steps or (cfg.sample_steps if gpu else min(cfg.sample_steps, 4))
        if cfg.method == "ru_dual_only":
            kw["dual_only_steps"] = 1
    return replace(cfg, **kw)


def _data_subset(cfg, out: Path, size: int, native: int, cap: int = 32):
    """The forget images and the first retained ones (at most ``cap`` in all) at spatial size ``size``,
    in a fresh folder (a copy when neither subsetting nor resizing is needed is avoided)."""
    from PIL import Image

    from scale.data import list_images, resolve_forget

    files = list_images(cfg.train_dir)
    idx = resolve_forget(cfg, files)
    if size == native and len(files) <= cap:
        return cfg
    keep = [files[i] for i in idx] + [f for i, f in enumerate(files) if i not in set(idx)][:max(0, cap - len(idx))]
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for f in keep:
        with Image.open(f) as im:
            (im if size == native else im.resize((size, size), Image.BICUBIC)).save(folder / (f.stem + ".png"))
    names = tuple(Path(files[i].name).stem + ".png" for i in idx)
    return replace(cfg, train_dir=str(folder), forget=names, forget_list="")


def _run(kind: str, cfg, **kw) -> dict:
    from scale import concept, data

    return (concept if kind == "concept" else data).run(cfg, **kw)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def direction_check(rows: list[dict], lam0, lr_dual: float, upper=None, sum_max: float | None = None) -> Check:
    """Every dual step moves each multiplier in the direction of its violation (``violation > 0``:
    up), except where the projection holds it on the boundary of the dual domain; with ``lr_dual = 0``
    the multipliers stay fixed."""
    prev = np.asarray(lam0, dtype=float).reshape(-1)
    bad = []
    for r in rows:
        lam, v = np.asarray(r["lam"], dtype=float), np.asarray(r["violation"], dtype=float)
        d = lam - prev
        for i in range(lam.size):
            if lr_dual == 0:
                ok = d[i] == 0
            elif v[i] > 0:  # up, unless held by the box's top or the sum bound
                held = (upper is not None and lam[i] >= upper[i] - 1e-12) or \
                       (sum_max is not None and lam.sum() >= sum_max - 1e-9)
                ok = d[i] > 0 or held
            elif v[i] < 0:  # down, unless held at zero
                ok = d[i] < 0 or lam[i] == 0
            else:
                ok = True
            if not ok:
                bad.append(f"step {r['step']} lam[{i}] {prev[i]:.4g}->{lam[i]:.4g} at violation {v[i]:.4g}")
        prev = lam
    steps = len(rows)
    return Check("multipliers move as the violation says", f"{steps} dual steps" + (f"; {bad[0]}" if bad else ""),
                 "fixed" if lr_dual == 0 else "up when violated, down when slack (or on the boundary)", not bad)


def _initial_lam(kind: str, cfg, m: int, n: int) -> tuple[np.ndarray, float, np.ndarray | None, float | None]:
    if kind == "concept":
        from scale.concept import initial_dual

        d = initial_dual(cfg)
        return d.lam.numpy(), d.lr_dual, None, d.sum_max
    if cfg.method == "fu":
        from toy.core.dual import dual_domain

        return np.zeros(m), cfg.lr_dual / n, np.asarray(dual_domain("forward_kl", m, n_train=n).upper), None
    return np.full(m, cfg.siss_weight / n), 0.0, None, None


def resume_check(kind: str, pcfg, out: Path, reference_rows: list[dict], device: str) -> Check:
    """A run stopped after one step and resumed for two more reproduces the uninterrupted run's
    first three rows (loss, multipliers, constraint estimates)."""
    k = min(3, len(reference_rows))
    rcfg = replace(pcfg, out=str(out), train=replace(pcfg.train, steps=k, checkpoint_every=1))
    shutil.rmtree(out, ignore_errors=True)
    from scale import figures

    with figures.disabled():
        _run(kind, rcfg, stop_after=1)
    # mark the first row: a run that resumes at step 1 keeps it, one that starts over rewrites it
    first = _rows(out)[:1]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r | {"before_resume": True}) + "\n" for r in first))
    with figures.disabled():
        _run(kind, rcfg, resume=True)
    got = _rows(out)
    if not got or not got[0].get("before_resume"):
        return Check("checkpoint + resume reproduces the run", "the second run started over at step 0",
                     "it resumes at step 1", False)
    rtol = RESUME_RTOL["cuda" if device == "cuda" else "cpu"]
    worst = 0.0
    for a, b in zip(reference_rows[:k], got[:k]):
        for key in ("loss", "lam", "measured"):
            if a.get(key) is None and b.get(key) is None:
                continue
            x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-30))))
    ok = len(got) == k and worst <= rtol
    return Check("checkpoint + resume reproduces the run", f"{len(got)} rows, max rel. diff {worst:.2g}",
                 f"{k} rows, rel. diff <= {rtol:g}", ok)


def preflight(config_file: str | None, overrides: list[str] | None = None, opts: PreflightOptions = PreflightOptions(),
              kind: str | None = None) -> tuple[Section, dict]:
    """Run the pre-flight; write ``preflight.md`` and ``preflight.json`` into ``opts.out``; return the
    section (its checks) and the JSON record."""
    from scale.models import sample_size_override

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import accelerate, diffusers, matplotlib.pyplot, peft, transformers  # noqa: F401,E401 -- in the base memory
    from scale import concept, data, figures  # noqa: F401
    mem_base = PeakMemory.current(device)
    kind, cfg = load_run_config(config_file, overrides, kind)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = _on_gpu(cfg)
    device = "cuda" if gpu else "cpu"
    checks: list[Check] = []
    record: dict = {"kind": kind, "method": cfg.method, "config": config_to_dict(cfg), "device": device,
                    "options": config_to_dict(opts)}
    cal, counts = calibrate(kind, cfg, opts.calibration_draws, opts.calibration_batch)
    record["parameters"] = counts
    checks.append(Check("model loads as the run loads it",
                        f"{counts['total'] / 1e6:.1f}M parameters, {counts['trainable'] / 1e6:.3f}M trainable "
                        f"({counts['trainable_modules']})", f"dtype {'/'.join(counts['dtypes'])}, "
                        f"mixed precision {counts['mixed_precision']}", counts["trainable"] > 0))
    budgets = config_budgets(kind, cfg, cal)
    suggestions = suggest_budgets(cal, getattr(cfg, "lu_constraint", ""))
    record["calibration"] = cal | {"budgets": budgets, "suggested_budgets": suggestions}
    bchecks = budget_checks(cal, budgets)
    checks += bchecks
    message = refusal_message(cal, budgets, bchecks, suggestions)
    picture_paths: list[str] = []
    if not message:
        native = cal["sample_size"]
        R = opts.resolution or (native if gpu else cal["min_sample_size"])
        if R % cal["min_sample_size"] or R > native:
            raise ValueError(f"resolution must be a multiple of {cal['min_sample_size']} and at most {native}, got {R}")
        pcfg = _preflight_config(kind, cfg, opts, out / "run", gpu)
        if kind == "data":
            pcfg = _data_subset(pcfg, out, R, native)
        record["preflight_config"] = config_to_dict(pcfg) | {"resolution": R}
        shutil.rmtree(out / "run", ignore_errors=True)
        with sample_size_override(R if R != native else None):
            try:
                with PeakMemory(device) as pm:
                    summary = _run(kind, pcfg)
                rows = _rows(out / "run")
                losses = [r["loss"] for r in rows if r.get("loss") is not None]
                checks.append(Check("losses finite", f"{len(losses)} steps, last {losses[-1]:.4g}" if losses else "none",
                                    "all finite", bool(losses) and all(math.isfinite(x) for x in losses)))
            except (FloatingPointError, ValueError, RuntimeError) as exc:
                rows, summary, pm = [], {}, None
                checks.append(Check("losses finite", f"{type(exc).__name__}: {exc}", "all finite", False))
            if rows:
                m = len(rows[0]["lam"])
                n = summary.get("n_train", 1)
                lam0, lr, upper, smax = _initial_lam(kind, pcfg, m, n)
                checks.append(direction_check(rows, lam0, lr, upper, smax))
                if opts.resume_check:
                    try:
                        checks.append(resume_check(kind, pcfg, out / "resume_check", rows, device))
                    except Exception as exc:  # noqa: BLE001 -- a failing resume is a failed check
                        checks.append(Check("checkpoint + resume reproduces the run", f"{type(exc).__name__}: {exc}",
                                            "no exception", False))
        if rows:
            fig_dir = out / "run" / "figures"
            grids = sorted(fig_dir.glob("grid_step*.png"))
            pics = [p for p in grids[-1:] + [fig_dir / "curves.png"] if p.is_file()]
            picture_paths = [str(p.relative_to(out)) for p in pics]
            checks.append(Check("pictures written", ", ".join(p.name for p in pics), "sample grid and curves.png",
                                len(pics) == 2))
            times = [r["step_seconds"] for r in rows]
            t_step = statistics.median(times[1:] if len(times) > 2 else times)
            evals_pre = unet_evals_per_step(kind, pcfg, len(cal["step0"]))
            evals_full = unet_evals_per_step(kind, cfg, len(cal["step0"]))
            mem_fixed = (counts["param_bytes"] + counts["optimizer_bytes"]) / 2 ** 20
            steps_full = cfg.train.steps + (cfg.dual_only_steps if kind == "concept" and cfg.method == "ru_dual_only" else 0)
            proj = project_run(step_seconds=t_step, evals_measured=evals_pre, evals_full=evals_full,
                               pixels_measured=R * R, pixels_full=native * native, processes=opts.processes,
                               steps_full=steps_full, mem_base_mib=mem_base, mem_fixed_mib=mem_fixed,
                               mem_peak_mib=pm.peak, micro_measured=pcfg.train.micro_batch,
                               micro_full=cfg.train.micro_batch)
            limit = (torch.cuda.get_device_properties(0).total_memory if gpu else
                     __import__("psutil").virtual_memory().total) / 2 ** 20
            record["measured"] = {"step_seconds": t_step, "peak_mib": pm.peak, "base_mib": mem_base,
                                  "fixed_mib": mem_fixed, "evals_per_step": evals_pre, "resolution": R}
            record["projection"] = {"step_seconds": proj.step_seconds, "wall_hours": proj.wall_seconds / 3600,
                                    "memory_mib": proj.memory_mib, "device_memory_mib": limit,
                                    "assumption": proj.assumption, "processes": opts.processes,
                                    "evals_per_step": evals_full, "resolution": native, "steps": steps_full}
            checks.append(Check("projected memory fits the device",
                                f"{proj.memory_mib:.0f} MiB per process (measured peak {pm.peak:.0f} MiB)",
                                f"<= {limit:.0f} MiB", proj.memory_mib <= limit))
    record["refusal"] = message
    record["seconds"] = time.perf_counter() - t_start
    section = Section(f"pre-flight: {kind}/{cfg.method} on {cfg.model}", tuple(checks), tuple(picture_paths),
                      _text(record), seconds=record["seconds"])
    record["passed"] = section.passed
    record["checks"] = [config_to_dict(c) for c in checks]
    (out / "preflight.json").write_text(json.dumps(jsonable(record), indent=2, sort_keys=True))
    md = render_markdown([section], header=f"config: `{config_file}`").replace("# dualunlearn verify",
                                                                                "# dualunlearn scale preflight", 1)
    (out / "preflight.md").write_text(md)
    return section, record



def _text(record: dict) -> str:
    cal = record["calibration"]
    lines = [f"Calibration ({cal['quantity']}, full resolution, {cal.get('sample_steps', '-')} sampler steps): "
             + ", ".join(f"{s:.4g} +- {e:.2g}" for s, e in zip(cal["scale"], cal["scale_se"]))
             + "; achievable " + ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in cal["achievable"])
             + "; budgets " + ("n/a" if cal["budgets"] is None else str([float(f"{b:.4g}") for b in cal["budgets"]]))
             + "; suggested " + str([[float(f"{x:.4g}") for x in s] for s in cal["suggested_budgets"]]) + "."]
    if "projection" in record:
        p, m = record["projection"], record["measured"]
        lines.append(f"Measured {m['step_seconds']:.3g} s/step at resolution {m['resolution']} "
                     f"({m['evals_per_step']:.0f} UNet image-evaluations per step), peak {m['peak_mib']:.0f} MiB. "
                     f"Projected full run ({p['steps']} steps, {p['processes']} process(es), resolution {p['resolution']}, "
                     f"{p['evals_per_step']:.0f} evaluations per step): {p['step_seconds']:.3g} s/step, "
                     f"{p['wall_hours']:.3g} h, {p['memory_mib']:.0f} MiB per process. Assumption: {p['assumption']}.")
    if record.get("refusal"):
        lines.append(record["refusal"].replace("\n", "; "))
    return "\n\n".join(lines)


def calibration_table(cal: dict, budgets, suggestions) -> str:
    names = cal.get("concepts") or cal.get("forget") or []
    rows = [f"{cal['quantity']} ({cal['kind']}/{cal['method']})",
            "| constraint | step 0 +- se | scale +- se | achievable | budget | suggested |", "|---|---|---|---|---|---|"]
    for i, name in enumerate(names):
        b = "n/a" if budgets is None else f"{budgets[i]:.4g}"
        lo, hi = cal["achievable"][i]
        rows.append(f"| {name} | {cal['step0'][i]:.4g} +- {cal['step0_se'][i]:.2g} | {cal['scale'][i]:.4g} +- "
                    f"{cal['scale_se'][i]:.2g} | [{lo:.4g}, {hi:.4g}] | {b} | "
                    f"{[float(f'{x:.4g}') for x in suggestions[i]]} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- command line


def main_preflight(args) -> int:
    opts = PreflightOptions(out=args.out or "runs/preflight", steps=args.steps, resolution=args.resolution,
                            batch=args.batch, sample_steps=args.sample_steps, processes=args.processes)
    section, record = preflight(args.config, args.set, opts, kind=args.kind)
    print(render_table([section]))
    print()
    print(section.text)
    if record["refusal"]:
        print(f"\nREFUSED: {record['refusal']}")
    print(f"\n{'PASS' if section.passed else 'FAIL'}: {Path(opts.out) / 'preflight.md'}")
    return 0 if section.passed else 1


def main_calibrate(args) -> int:
    kind, cfg = load_run_config(args.config, args.set, args.kind, placeholder_budgets=True)
    cal, _ = calibrate(kind, cfg, args.draws)
    budgets = config_budgets(kind, cfg, cal) if _has_budgets(args.config, args.set, kind) else None
    suggestions = suggest_budgets(cal, getattr(cfg, "lu_constraint", ""))
    print(calibration_table(cal, budgets, suggestions))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "calibration.json").write_text(json.dumps(
            jsonable(cal | {"budgets": budgets, "suggested_budgets": suggestions}), indent=2, sort_keys=True))
    return 0


def _has_budgets(config_file, overrides, kind) -> bool:
    try:
        load_run_config(config_file, overrides, kind)
        return True
    except ValueError:
        return False


def register(sub) -> None:
    """Add ``preflight`` and ``calibrate`` to the ``scale`` sub-commands."""
    for name, text in (("preflight", "check your own run before a GPU run: loading, budgets, N steps, resume, "
                                     "time and memory projection, pictures"),
                       ("calibrate", "measure the scale of each constraint at the pretrained model and suggest budgets")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", required=True, help="the run's TOML config (concept or data)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        q.add_argument("--kind", choices=KINDS, help="concept or data (default: detected from the config)")
        q.add_argument("--out", help="output directory (preflight default: runs/preflight)")
        if name == "preflight":
            q.add_argument("--steps", type=int, default=5, help="optimiser steps (default 5)")
            q.add_argument("--resolution", type=int, default=0,
                           help="spatial size of the steps (default: the smallest the UNet accepts on CPU, full on a GPU)")
            q.add_argument("--batch", type=int, default=0, help="batch of the steps (default: 2 on CPU, the config's on a GPU)")
            q.add_argument("--sample-steps", type=int, default=0,
                           help="on-policy sampler steps of concept runs (default: 4 on CPU, the config's on a GPU)")
            q.add_argument("--processes", type=int, default=1, help="processes of the real run (for the projection)")
            q.set_defaults(func=main_preflight)
        else:
            q.add_argument("--draws", type=int, default=0, help="global batches per estimate (default 1 on CPU, 4 on a GPU)")
            q.set_defaults(func=main_calibrate)


def verify_section(config_file: str, overrides: list[str] | None, out_dir: Path) -> Section:
    """The pre-flight as a section of ``dualunlearn verify --config``."""
    section, _ = preflight(config_file, overrides, PreflightOptions(out=str(Path(out_dir) / "preflight")))
    return section
