"""The run config a pre-flight checks: its kind (concept or data) and the frozen config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from theory.config import load_config

if TYPE_CHECKING:
    from scale.concept import ConceptConfig
    from scale.data import DataConfig

KINDS = ("concept", "data")


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
                    placeholder_budgets: bool = False) -> tuple[str, ConceptConfig | DataConfig]:
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
