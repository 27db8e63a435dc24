"""``dualunlearn verify``: the pre-flight check a researcher runs before spending GPU hours.

Runs every tier's checks on built-in instances, prints a table, and writes ``report.md`` with PNG
figures into ``--out``. Each tier contributes sections through a function
``verify_section(out_dir: Path, quick: bool, seed: int) -> theory.report.Section`` listed in
``SECTIONS``; the report fails (exit status 1) when any check fails. With ``--config`` (a concept or
data run's TOML) the report gains the pre-flight of that run (``scale.preflight``) as a section.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from theory.config import config_to_dict
from theory.report import Check, Section, render_markdown, render_table

log = logging.getLogger(__name__)

#: (tier, module, function) of every report section, in report order.
SECTIONS = (
    ("theory", "theory.discrete.verify", "verify_section"),
    ("theory", "theory.gmm.verify", "verify_section"),
    ("toy", "toy.verify", "verify_section"),
)
TIERS = ("theory", "toy")


@dataclass(frozen=True)
class VerifyConfig:
    out: str = "runs/verify"
    quick: bool = False
    seed: int = 0
    tiers: tuple[str, ...] = TIERS
    config: str = ""
    overrides: tuple[str, ...] = ()


def run(cfg: VerifyConfig) -> tuple[list[Section], Path]:
    """Run the selected tiers' sections; write ``report.md`` into ``cfg.out``; return both."""
    unknown = sorted(set(cfg.tiers) - set(TIERS))
    if unknown:
        raise ValueError(f"unknown tier(s) {unknown}; choose from {list(TIERS)}")
    if cfg.overrides and not cfg.config:
        raise ValueError("--set overrides a key of --config: pass the scale run's config with --config")
    if cfg.config:  # a missing or bad run config is refused before the other tiers' minutes, not after
        from scale.preflight.config import load_run_config

        load_run_config(cfg.config, list(cfg.overrides))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SECTIONS if s[0] in cfg.tiers]
    sections: list[Section] = []
    for tier, module, func in tqdm(chosen, desc="verify", unit="section"):
        t0 = time.perf_counter()
        fn = getattr(importlib.import_module(module), func)
        try:
            sec = fn(out, cfg.quick, cfg.seed)
        except Exception as exc:  # a crashing section is a failed check, reported, not hidden
            log.exception("section %s failed", module)
            sec = Section(title=module, checks=(Check("section ran", f"{type(exc).__name__}: {exc}",
                                                      "no exception", False),))
        sections.append(Section(sec.title, sec.checks, sec.figures, sec.text,
                                seconds=time.perf_counter() - t0))
    if cfg.config:
        from scale.preflight import verify_section

        t0 = time.perf_counter()
        sec = verify_section(cfg.config, list(cfg.overrides), out)
        sections.append(Section(sec.title, sec.checks, tuple(f"preflight/{f}" for f in sec.figures), sec.text,
                                seconds=time.perf_counter() - t0))
    header = f"config: `{config_to_dict(cfg)}`"
    report = out / "report.md"
    report.write_text(render_markdown(sections, header=header))
    return sections, report


def main_verify(args: argparse.Namespace) -> int:
    cfg = VerifyConfig(out=args.out, quick=args.quick, seed=args.seed,
                       tiers=tuple(t.strip() for t in args.tiers.split(",") if t.strip()),
                       config=getattr(args, "config", None) or "", overrides=tuple(getattr(args, "set", None) or ()))
    sections, report = run(cfg)
    print(render_table(sections))
    ok = all(s.passed for s in sections)
    print(f"\n{'PASS' if ok else 'FAIL'}: report written to {report}")
    return 0 if ok else 1
