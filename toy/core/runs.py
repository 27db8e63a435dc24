"""Run directories shared by toy and scale runs (docs/runs.md).

A run directory holds ``run.json`` (the resolved config, its fingerprint, seed, git SHA and package
versions), ``metrics.jsonl`` (one JSON line per step), ``summary.json`` (at the end) and
checkpoints (``checkpoint/`` the newest, ``checkpoint.prev/`` the one before, each with a
``manifest.json`` of checksums). One implementation serves both tiers:

- identity: a directory already holding a run is continued only when the new config has the same
  fingerprint; otherwise ``RunDirError`` names the keys that differ;
- one process per directory: a lock file (``.lock``, holding the pid) taken with ``flock``, so a
  lock left by a killed process is recovered;
- every file is written atomically (temporary file + ``os.replace``) with the mode the umask gives
  any new file;
- a checkpoint that fails its checksums is skipped with a warning for the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_PACKAGES = ("dualunlearn", "numpy", "scipy", "cvxpy", "torch", "diffusers", "peft", "accelerate",
             "transformers", "torchmetrics")

#: config keys that cannot change a run's result: left out of the fingerprint (docs/runs.md)
EXCLUDED_KEYS = ("out", "checkpoint_every", "train.checkpoint_every", "local_files_only", "figure")
#: config keys naming a file or folder the run reads: their content identity joins the fingerprint
INPUT_KEYS = ("model", "pretrained", "train_dir", "forget_list")

CHECKPOINT = "checkpoint"
LOCK = ".lock"


class RunDirError(ValueError):
    """A command cannot use this run directory as asked (another config, a live holder, ...)."""


class CheckpointError(RuntimeError):
    """A run directory's checkpoints exist but none of them can be read."""


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


def jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return [jsonable(x) for x in v.tolist()] if v.ndim else jsonable(v.item())
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


# ---------------------------------------------------------------- test hooks and announcements

_PAUSE_COUNTS: dict[str, int] = {}


def pause_point(point: str) -> None:
    """Test hook: with ``DUALUNLEARN_TEST_PAUSE="<point>@<n>"`` in the environment, the ``n``-th
    time this process reaches ``point`` it writes the file ``$DUALUNLEARN_TEST_PAUSE_MARKER`` and
    sleeps until killed, so a test's signal lands exactly there. Points: ``step`` (after a step's
    metrics row), ``checkpoint-files`` (checkpoint files written, manifest not yet),
    ``checkpoint-manifest`` (complete, not yet swapped in), ``checkpoint-rotate`` (newest moved to
    ``checkpoint.prev``, the new one not yet in place), ``atomic-write`` (a temporary file written,
    not yet renamed). Without the variable this does nothing."""
    spec = os.environ.get("DUALUNLEARN_TEST_PAUSE")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _PAUSE_COUNTS[point] = _PAUSE_COUNTS.get(point, 0) + 1
    if _PAUSE_COUNTS[point] != int(nth or 1):
        return
    marker = os.environ.get("DUALUNLEARN_TEST_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(point)
    while True:
        time.sleep(0.05)


def announce(message: str, *args: Any) -> None:
    """Log a run-directory event (resumed, refused, recovered) on ``toy.core.runs``; the CLI shows these
    at any verbosity."""
    log.info(message, *args)


# ---------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``; the
    file gets the mode the umask gives new files (``mkstemp`` alone would give 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        pause_point("atomic-write")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write_bytes``, so a crash never leaves a half-written file
    (for the small objects of the toy tier; scale checkpoints go through ``CheckpointStore``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- identity

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of a file; beyond ``limit`` bytes only of its first and last ``limit // 2`` bytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if limit is None or size <= limit:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(fh.read(limit // 2))
            fh.seek(size - limit // 2)
            h.update(fh.read(limit // 2))
    return h.hexdigest()


def _sampled_sha256(path: Path, chunk: int = 4096) -> str:
    """sha256 of four ``chunk``-byte samples of a file (its start, a third, two thirds, its end): a
    cheap content check for folders of many images or of large weights (a safetensors file's
    header alone is the same for every model of one architecture)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        for at in sorted({0, size // 3, 2 * size // 3, max(size - chunk, 0)}):
            fh.seek(at)
            h.update(fh.read(chunk))
    return h.hexdigest()


_IDENTITY_CACHE: dict[tuple, dict] = {}


def input_identity(path: str | Path) -> dict | None:
    """What a run read from ``path``: a file's size and sha256 (of its first and last 128 MiB when
    larger); a folder's file names and sizes and a sha256 of four 4 KiB samples of each file.
    ``None`` when ``path`` does not exist (a hub id: the id itself is in the config)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _IDENTITY_CACHE:
            _IDENTITY_CACHE[key] = {"kind": "file", "bytes": st.st_size, "sha256": _sha256_file(p, 256 << 20)}
        return _IDENTITY_CACHE[key]
    if p.is_dir():
        h = hashlib.sha256()
        n = 0
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
            st = f.stat()
            key = (str(f.resolve()), st.st_size, st.st_mtime_ns, "sampled")
            if key not in _IDENTITY_CACHE:
                _IDENTITY_CACHE[key] = {"sha256": _sampled_sha256(f)}
            h.update(f"{f.relative_to(p).as_posix()}\0{st.st_size}\0{_IDENTITY_CACHE[key]['sha256']}\n".encode())
            n += 1
        return {"kind": "dir", "files": n, "sha256": h.hexdigest()}
    return None


def run_identity(config: dict) -> dict:
    """The part of a resolved config that determines the result (``EXCLUDED_KEYS`` removed), and
    the content identity of every input file or folder it names (``INPUT_KEYS``)."""
    flat = jsonable(_flatten(config))
    kept = {k: v for k, v in flat.items() if k not in EXCLUDED_KEYS}
    inputs = {}
    for k, v in kept.items():
        if k.rsplit(".", 1)[-1] in INPUT_KEYS and isinstance(v, str) and v:
            ident = input_identity(v)
            if ident is not None:
                inputs[k] = ident
    return {"config": kept, "inputs": inputs}


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two ``run_identity`` results, one per key."""
    diffs = []
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k, "<unset>") != nc.get(k, "<unset>"):
            diffs.append(f"{k}: {json.dumps(oc.get(k, '<unset>'))} there, {json.dumps(nc.get(k, '<unset>'))} now")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(oi):  # an input missing when the run began may be the run's own product
        if k in oc and k in nc and oc[k] != nc[k]:
            continue  # the path itself differs: already named
        if oi.get(k) != ni.get(k):
            diffs.append(f"the content of {k} ({nc.get(k, oc.get(k))}) changed since the run started")
    return diffs


def read_run_json(path: str | Path) -> dict | None:
    f = Path(path) / "run.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{f} is unreadable ({exc}); start afresh with --overwrite or choose another --out") from exc


def _stored_identity(meta: dict) -> dict:
    if "identity" in meta:
        return meta["identity"]
    # written before fingerprints existed: compare the config alone
    ident = run_identity(meta.get("config", {}))
    ident["inputs"] = {}
    return ident


def check_run_dir(out: str | Path, config: dict, resume: bool | None = None) -> str:
    """Decide what a command may do with ``out``: ``"new"`` (no run there yet) or ``"resume"``
    (a run with the same fingerprint). Raises ``RunDirError`` when ``out`` is a file, when it holds
    a run of another config, or when it holds a run and ``resume`` is ``False`` (the scale
    commands' default: continuing needs ``--resume``). ``resume=None`` continues an identical run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file, not a directory")
    meta = read_run_json(out)
    if meta is None:
        return "new"
    new = run_identity(config)
    old = _stored_identity(meta)
    if "identity" not in meta:
        new = {"config": new["config"], "inputs": {}}
    diffs = identity_differences(old, new)
    if diffs:
        raise RunDirError(
            f"run directory {str(out)!r} holds a run of another config ({'; '.join(diffs)}); "
            "--resume only continues an identical config: pass --overwrite to start afresh there, "
            "or choose another --out")
    if resume is False:
        raise RunDirError(f"run directory {str(out)!r} already holds a run; pass --resume to continue it "
                          "or --overwrite to start afresh there (or choose another --out)")
    return "resume"


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
    with _RunLock(out):
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


# ---------------------------------------------------------------- one process per run directory

_HELD: dict[str, list] = {}  # realpath -> [fd, count]: locks this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _RunLock:
    """``out/.lock`` held with ``flock`` and holding the holder's pid. The kernel drops a ``flock``
    when its process dies, so the lock of a killed run is recovered by the next command (which
    says so); a live holder makes ``acquire`` raise ``RunDirError`` with its pid. Re-entrant within
    one process."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.key = os.path.realpath(self.out)
        self.held = False

    def acquire(self) -> None:
        import fcntl

        if self.key in _HELD:
            _HELD[self.key][1] += 1
            self.held = True
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"run directory {str(self.out)!r} is in use by process {holder} "
                                  f"(lock file {path}); wait for it to finish or stop it") from None
            raise
        old = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if old and old.isdigit() and int(old) != os.getpid():
            why = "no longer running" if not _pid_alive(int(old)) else "it no longer holds the lock"
            log.warning("recovered the lock of process %s in %s (%s)", old, self.out, why)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[self.key] = [fd, 1]
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD[self.key]
            try:
                os.ftruncate(entry[0], 0)
            except OSError:
                pass
            os.close(entry[0])  # closing the descriptor releases the flock

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- checkpoints

def _verify(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when every file matches its checksum, else (None, the reason)."""
    mf = folder / "manifest.json"
    if not mf.is_file():
        return None, "no manifest.json (incomplete)"
    try:
        manifest = json.loads(mf.read_text())
    except ValueError:
        return None, "manifest.json is corrupt"
    for name, rec in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            return None, f"{name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return None, f"{name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}"
        if _sha256_file(f) != rec["sha256"]:
            return None, f"{name} fails its sha256 checksum"
    return manifest, None


class CheckpointStore:
    """Checkpoints in ``<path>/`` (newest) and ``<path>.prev/`` (the one before). ``save`` writes a
    fresh folder (``state.pt``, optional ``trainable.safetensors``, then ``manifest.json`` with
    sizes and sha256) and swaps it in by renames, so a kill at any point leaves a complete one.
    ``load`` verifies the checksums and falls back, with a warning, to the previous checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.prev = self.path.with_name(self.path.name + ".prev")

    def exists(self) -> bool:
        return self.path.exists() or self.prev.exists() or self.path.with_suffix(".pt").is_file()

    def remove(self) -> None:
        """Delete every checkpoint of this store (once what they lead to is saved)."""
        for folder in (self.path, self.prev, self.path.with_name(self.path.name + ".corrupt")):
            shutil.rmtree(folder, ignore_errors=True)

    def save(self, state: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.path.name}.tmp."))
        try:
            os.chmod(tmp, dir_mode())
            names = []
            if tensors is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
                names.append("trainable.safetensors")
            torch.save(state, tmp / "state.pt")
            names.append("state.pt")
            files = {}
            for name in names:
                f = tmp / name
                os.chmod(f, file_mode())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                files[name] = {"bytes": f.stat().st_size, "sha256": _sha256_file(f)}
            pause_point("checkpoint-files")
            manifest = {"format": 1, "step": state.get("step"), "files": files}
            with open(tmp / "manifest.json", "w") as fh:
                json.dump(manifest, fh, indent=1)
                fh.flush()
                os.fchmod(fh.fileno(), file_mode())
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            pause_point("checkpoint-manifest")
            if self.path.exists():
                if self.prev.exists():
                    shutil.rmtree(self.prev)
                os.replace(self.path, self.prev)
            pause_point("checkpoint-rotate")
            os.replace(tmp, self.path)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _read(self, folder: Path, manifest: dict | None) -> tuple[dict, dict | None]:
        tensors = None
        if (folder / "trainable.safetensors").is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        return state, tensors

    def load(self, repair: bool = True) -> tuple[dict, dict | None] | None:
        """``(state, tensors)`` of the newest checkpoint that passes its checksums (``tensors`` is
        ``None`` when none were saved); ``None`` when there is none; ``CheckpointError`` when there
        are checkpoints but none is readable. ``repair`` (the one process that writes): remove
        folders of killed writes and set a damaged newest checkpoint aside."""
        for stale in self.path.parent.glob(f".{self.path.name}.tmp.*") if repair else ():
            shutil.rmtree(stale, ignore_errors=True)  # a write killed before its swap
        problems = []
        for folder in (self.path, self.prev):
            if not folder.exists():
                continue
            manifest, why = _verify(folder)
            if manifest is None and why.startswith("no manifest") and (folder / "state.pt").is_file():
                manifest, why = {}, None  # written before manifests existed: read unverified
            if manifest is not None:
                try:
                    state, tensors = self._read(folder, manifest)
                except Exception as exc:  # noqa: BLE001 - any unreadable file means: try the previous one
                    why = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                else:
                    if problems:
                        log.warning("checkpoint %s is unusable (%s; set aside as %s.corrupt); resuming from "
                                    "the previous one, %s", problems[-1][0], problems[-1][1], self.path.name, folder)
                    return state, tensors
            problems.append((folder, why))
            if repair and folder == self.path and self.prev.exists():
                # set the damaged newest aside, so that the next save does not rotate it over the
                # previous, good one
                bad = self.path.with_name(self.path.name + ".corrupt")
                shutil.rmtree(bad, ignore_errors=True)
                os.replace(self.path, bad)
        legacy = self.path.with_suffix(".pt")
        if not problems and legacy.is_file():  # a single-file toy checkpoint of an older version
            return torch.load(legacy, map_location="cpu", weights_only=False), None
        if problems:
            detail = "; ".join(f"{f.name}: {why}" for f, why in problems)
            raise CheckpointError(f"no usable checkpoint in {self.path.parent} ({detail}); "
                                  "start afresh with --overwrite")
        return None


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
        self._lock = _RunLock(self.path)
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

    def __del__(self):
        try:
            self._lock.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
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
