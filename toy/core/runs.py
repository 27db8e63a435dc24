"""Run directories shared by toy and scale runs (docs/runs.md): ``RunDir``, one run's directory,
and ``clear_run_dir`` (``--overwrite``), composed from one module per concern, whose public names
this module re-exports (importers use ``toy.core.runs`` as the one face of run directories):

- ``toy.core.events``: ``RunDirError``, announcements on the ``toy.core.runs`` logger, and the
  ``pause_point`` test hook;
- ``toy.core.files``: atomic writes (temporary file + ``os.replace``) with the mode the umask gives
  any new file, ``jsonable``, ``sha256_file``;
- ``toy.core.identity``: a run's identity and fingerprint, ``run.json`` and ``check_run_dir`` (a
  directory already holding a run is continued only when the new config has the same fingerprint;
  otherwise ``RunDirError`` names the keys that differ);
- ``toy.core.lock``: one process per directory (``.lock``, holding the pid, taken with ``flock``, so
  a lock left by a killed process is recovered);
- ``toy.core.checkpoints``: ``CheckpointStore`` (a checkpoint that fails its checksums is skipped
  with a warning for the previous one).

A run directory holds ``run.json`` (the resolved config, its fingerprint, seed, git SHA and package
versions), ``metrics.jsonl`` (one JSON line per step), ``summary.json`` (at the end) and
checkpoints (``checkpoint/`` the newest, ``checkpoint.prev/`` the one before, each with a
``manifest.json`` of checksums).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from toy.core.checkpoints import CheckpointError, CheckpointStore
from toy.core.events import RUN_LOGGER, RunDirError, announce, pause_point
from toy.core.files import (atomic_torch_save, atomic_write_bytes, atomic_write_json, dir_mode, file_mode, jsonable,
                            sha256_file)
from toy.core.identity import (EXCLUDED_KEYS, INPUT_KEYS, check_run_dir, fingerprint, git_sha, identity_differences,
                               input_identity, package_versions, read_run_json, run_identity)
from toy.core.lock import LOCK, RunLock

__all__ = [
    "CHECKPOINT", "EXCLUDED_KEYS", "INPUT_KEYS", "LOCK", "RUN_LOGGER", "CheckpointError", "CheckpointStore", "RunDir",
    "RunDirError", "RunLock", "announce", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json",
    "check_run_dir", "clear_run_dir", "dir_mode", "file_mode", "fingerprint", "git_sha", "identity_differences",
    "input_identity", "jsonable", "package_versions", "pause_point", "read_run_json", "run_identity", "sha256_file",
]

#: the newest checkpoint's folder inside a run directory (the one before: ``checkpoint.prev``)
CHECKPOINT = "checkpoint"


def clear_run_dir(out: str | Path, keep: tuple[str | Path, ...] = ()) -> None:
    """Empty a run directory for a fresh start (``--overwrite``): every entry except the lock and the
    paths in ``keep`` (a config file or model inside it). Refuses while another process holds it,
    and does nothing to a directory that holds no run (no ``run.json``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file, not a directory")
    if not (out / "run.json").exists():
        return
    keep_resolved = {Path(k).resolve() for k in keep if k}
    with RunLock(out):
        for entry in out.iterdir():
            if entry.name == LOCK:
                continue
            r = entry.resolve()
            if r in keep_resolved or any(r in k.parents for k in keep_resolved):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    announce("overwrote the run in %s", out)


# ---------------------------------------------------------------- the run directory

class RunDir:
    """One run's directory (see the module docstring).

    ``RunDir(out, config_dict, seed)`` takes the directory's lock, compares the config's fingerprint
    with a run already there (``resume=None``: continue an identical one, refuse another;
    ``resume=False``: refuse any existing run; ``resume=True``: as ``None``) and records the
    provenance of a new run. ``begin(start, total)`` drops metric rows from ``start`` on (rows
    of a killed attempt) and announces where a continued run resumes; ``log_metrics(step, **values)``
    appends one JSON line (``FloatingPointError`` with the step number on NaN/Inf);
    ``save_checkpoint``/``load_checkpoint`` go through ``CheckpointStore``. ``close()`` (or
    garbage collection) releases the lock.
    """

    def __init__(self, out: str | Path, config: dict, seed: int, write_provenance: bool = True,
                 resume: bool | None = None):
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {str(self.path)!r} is a file, not a directory")
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.checkpoint_path = self.path / CHECKPOINT
        self.checkpoints = CheckpointStore(self.checkpoint_path)
        self._lock = RunLock(self.path)
        self.continued = False
        if not write_provenance:  # a non-main process of a distributed run: the main one does the rest
            return
        self._lock.acquire()
        try:
            for stale in self.path.glob(".*.tmp"):  # temporary files of writes killed before their rename
                stale.unlink(missing_ok=True)
            self.continued = check_run_dir(self.path, config, resume) == "resume"
            if not self.continued:
                identity = run_identity(config)
                atomic_write_json(self.path / "run.json", {
                    "config": config, "seed": seed, "fingerprint": fingerprint(identity), "identity": identity,
                    "git_sha": git_sha(), "packages": package_versions(),
                })
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Release the directory's lock (idempotent)."""
        self._lock.release()

    def __del__(self) -> None:
        try:
            self._lock.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def begin(self, start: int, total: int, what: str = "run", restart: bool = False) -> None:
        """Start (or continue) the step loop at ``start`` of ``total``: metric rows of steps
        ``>= start`` (a killed attempt's, also before any checkpoint) are dropped, and a continued
        run says where it resumes (``restart``: that it starts again from step 0 on purpose)."""
        self.truncate_metrics(start - 1)
        if restart and self.continued:
            announce("restarting %s in %s from step 0 of %d (not resuming)", what, self.path, total)
        elif self.continued or start > 0:
            if start >= total:
                announce("%s in %s: all %d steps done already; recomputing the results", what, self.path, total)
            else:
                announce("resuming %s in %s at step %d of %d", what, self.path, start, total)

    def log_metrics(self, step: int, check_finite: bool = True, **values: Any) -> None:
        row = {"step": int(step), **jsonable(values)}
        if check_finite:
            for k, v in values.items():
                arr = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                    raise FloatingPointError(f"non-finite {k}={arr.tolist()} at step {step}")
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        pause_point("step")

    def read_metrics(self) -> list[dict]:
        """The metric rows; a last line cut off by a kill is ignored."""
        if not self.metrics_path.exists():
            return []
        rows = []
        with open(self.metrics_path) as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # partial last line of a killed write
                if line.strip():
                    rows.append(json.loads(line))
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only metric rows with ``step <= last_step`` (used on resume)."""
        if not self.metrics_path.exists():
            return
        rows = [r for r in self.read_metrics() if r["step"] <= last_step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (atomically)."""
        atomic_write_json(self.summary_path, summary)

    def save_checkpoint(self, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.checkpoints.save(state, tensors)

    def load_checkpoint(self) -> dict | None:
        """The newest good checkpoint's state (its saved tensors, if any, under ``"tensors"``)."""
        loaded = self.checkpoints.load()
        if loaded is None:
            return None
        state, tensors = loaded
        if tensors is not None:
            state = {**state, "tensors": tensors}
        return state
