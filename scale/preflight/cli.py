"""``dualunlearn scale preflight|calibrate`` and the pre-flight section of ``dualunlearn verify --config``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scale.preflight.calibration import calibrate, config_budgets, suggest_budgets
from scale.preflight.config import KINDS, load_run_config
from scale.preflight.runner import PreflightOptions, preflight
from theory.report import Section, render_table
from toy.core.runs import jsonable

def calibration_table(cal: dict, budgets: np.ndarray | None, suggestions: list[list[float]]) -> str:
    """The calibration as a markdown table: per constraint its step-0 value, scale, achievable range,
    budget and suggested budgets."""
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


def main_preflight(args: argparse.Namespace) -> int:
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


def main_calibrate(args: argparse.Namespace) -> int:
    kind, cfg = load_run_config(args.config, args.set, args.kind, placeholder_budgets=True)
    cal, _ = calibrate(kind, cfg, args.draws)
    budgets = config_budgets(kind, cfg, cal) if _has_budgets(args.config, args.set, kind) else None
    suggestions = suggest_budgets(cal, getattr(cfg, "likelihood_constraint", ""))
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


def register(sub: argparse._SubParsersAction) -> None:
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
