"""What a run is: its identity and ``run.json``. A run's identity is its resolved config less the
keys that cannot change the result (``EXCLUDED_KEYS``), plus the content identity of every input
file or folder the config names (``INPUT_KEYS``); its fingerprint is the sha256 of that. A
directory already holding a run is continued only when the new config has the same identity;
otherwise ``RunDirError`` names the keys that differ (``check_run_dir``). ``run.json`` also records
where the run came from (``git_sha``, ``package_versions``), which the fingerprint leaves out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from toy.core.events import RunDirError
from toy.core.files import jsonable, sha256_file

_PACKAGES = ("dualunlearn", "numpy", "scipy", "cvxpy", "torch", "diffusers", "peft", "accelerate",
             "transformers", "torchmetrics")

#: config keys that cannot change a run's result: left out of the fingerprint (docs/runs.md)
EXCLUDED_KEYS = ("out", "checkpoint_every", "train.checkpoint_every", "local_files_only", "figure")
#: config keys naming a file or folder the run reads: their content identity joins the fingerprint
INPUT_KEYS = ("model", "pretrained", "train_dir", "forget_list")


# ---------------------------------------------------------------- provenance (recorded, not fingerprinted)

def package_versions() -> dict[str, str | None]:
    """The installed version of each package a run's result may depend on (``None``: not installed)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    """The commit of the checkout this code runs from; ``None`` outside a git checkout."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- identity and fingerprint

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


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
            _IDENTITY_CACHE[key] = {"kind": "file", "bytes": st.st_size, "sha256": sha256_file(p, 256 << 20)}
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
    """The sha256 of a ``run_identity`` result (key-sorted JSON)."""
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


# ---------------------------------------------------------------- run.json: same run, or another one

def read_run_json(path: str | Path) -> dict | None:
    """The ``run.json`` of the run directory ``path``; ``None`` when there is none, ``RunDirError``
    when it cannot be read."""
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
