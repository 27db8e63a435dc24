"""Run directories shared by toy and scale runs (STYLE.md): resolved config, seed, git SHA and
package versions in ``run.json``; per-step metrics in ``metrics.jsonl``; the final ``summary.json``;
checkpoints written atomically so a killed run loses at most the steps since its last one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_PACKAGES = ("dualunlearn", "numpy", "scipy", "cvxpy", "torch", "diffusers", "peft", "accelerate",
             "transformers", "torchmetrics")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temporary file, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunDir:
    """One run's directory: ``run.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``.

    ``RunDir(out, config_dict, seed)`` records the provenance; ``log_metrics(step, **values)``
    appends one JSON line (raising ``FloatingPointError`` with the step number on NaN/Inf);
    ``truncate_metrics(step)`` drops lines after ``step`` when a run resumes from a checkpoint.
    """

    def __init__(self, out: str | Path, config: dict, seed: int, write_provenance: bool = True):
        self.path = Path(out)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.checkpoint_path = self.path / "checkpoint.pt"
        if write_provenance:
            atomic_write_json(self.path / "run.json", {
                "config": config, "seed": seed, "git_sha": git_sha(), "packages": package_versions(),
            })

    def log_metrics(self, step: int, check_finite: bool = True, **values: Any) -> None:
        row = {"step": int(step), **_jsonable(values)}
        if check_finite:
            for k, v in values.items():
                arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                    raise FloatingPointError(f"non-finite {k}={arr.tolist()} at step {step}")
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only metric rows with ``step <= last_step`` (used on resume)."""
        rows = [r for r in self.read_metrics() if r["step"] <= last_step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    def save_checkpoint(self, state: dict) -> None:
        atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
