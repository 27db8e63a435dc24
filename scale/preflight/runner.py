"""``preflight``: calibrate, refuse unreachable budgets, run a few steps through the run's own
``run(cfg)``, check them, project the full run and write ``preflight.md`` / ``preflight.json``."""

from __future__ import annotations

import importlib

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scale.preflight.calibration import budget_checks, calibrate, config_budgets, on_gpu, refusal_message, suggest_budgets
from scale.preflight.checks import direction_check, initial_multipliers, metrics_rows, resume_check, run_method
from scale.preflight.config import load_run_config
from scale.preflight.projection import PeakMemory, project_run, unet_evals_per_step
from theory.config import config_to_dict
from theory.report import Check, Section, render_markdown
from toy.core.runs import jsonable

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


def _preflight_config(kind: str, cfg, opts: PreflightOptions, out: Path, gpu: bool):
    B = opts.batch or (cfg.train.batch_size if gpu else min(cfg.train.batch_size, 2))
    train = replace(cfg.train, steps=opts.steps, batch_size=B, micro_batch=min(cfg.train.micro_batch, B) if gpu else B,
                    checkpoint_every=10 ** 9, log_with="")
    kw = {"out": str(out), "train": train}
    if kind == "concept":
        kw["sample_steps"] = opts.sample_steps or (cfg.sample_steps if gpu else min(cfg.sample_steps, 4))
        if cfg.method == "reverse_kl_dual_only":
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


def preflight(config_file: str | None, overrides: list[str] | None = None, opts: PreflightOptions = PreflightOptions(),
              kind: str | None = None) -> tuple[Section, dict]:
    """Run the pre-flight; write ``preflight.md`` and ``preflight.json`` into ``opts.out``; return the
    section (its checks) and the JSON record."""
    from scale.models import sample_size_override

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("accelerate", "diffusers", "matplotlib.pyplot", "peft", "transformers",
                 "scale.concept", "scale.data", "scale.figures"):
        importlib.import_module(name)  # loaded before the base memory is read: they are not a step's cost
    mem_base = PeakMemory.current(device)
    kind, cfg = load_run_config(config_file, overrides, kind)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = on_gpu(cfg)
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
    suggestions = suggest_budgets(cal, getattr(cfg, "likelihood_constraint", ""))
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
                    summary = run_method(kind, pcfg)
                rows = metrics_rows(out / "run")
                losses = [r["loss"] for r in rows if r.get("loss") is not None]
                checks.append(Check("losses finite", f"{len(losses)} steps, last {losses[-1]:.4g}" if losses else "none",
                                    "all finite", bool(losses) and all(math.isfinite(x) for x in losses)))
            except (FloatingPointError, ValueError, RuntimeError) as exc:
                rows, summary, pm = [], {}, None
                checks.append(Check("losses finite", f"{type(exc).__name__}: {exc}", "all finite", False))
            if rows:
                m = len(rows[0]["lam"])
                n = summary.get("n_train", 1)
                lam0, lr, upper, smax = initial_multipliers(kind, pcfg, m, n)
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
            steps_full = cfg.train.steps + (cfg.dual_only_steps if kind == "concept" and cfg.method == "reverse_kl_dual_only" else 0)
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
