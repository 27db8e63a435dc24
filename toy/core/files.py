"""Writing a run's files so that a kill never leaves half of one: every file goes to a temporary
file in the same folder, is flushed and fsynced, and is renamed over its target (``os.replace``);
it gets the mode the umask gives any new file (``mkstemp`` alone would give 0600). Also the two
helpers every writer needs: ``jsonable`` (tensors, arrays and numpy scalars to JSON values,
non-finite floats as strings) and ``sha256_file`` (the checksum of checkpoints and inputs).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toy.core.events import pause_point


def jsonable(v: Any) -> Any:
    """``v`` with tensors, arrays, numpy scalars and paths turned into JSON values (recursively
    through dicts, lists and tuples); a non-finite float becomes its string (``"nan"``, ``"inf"``)."""
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a newly created folder gets under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that renames inside it are durable; best effort (some filesystems refuse)."""
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


def sha256_file(path: Path, limit: int | None = None) -> str:
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
    """``obj`` (through ``jsonable``) as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write_bytes``, so a crash never leaves a half-written file
    (for the small objects of the toy tier; scale checkpoints go through ``CheckpointStore``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
