"""Live processes by their /proc/<pid>/stat fields (Linux), for tests that kill or interrupt a
command and check that none of its worker processes is left running."""

from __future__ import annotations

from pathlib import Path


def _stat(pid_dir: Path) -> list[str] | None:
    """The fields after the command name: state, ppid, pgrp, ... (None when the process is gone)."""
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def live(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    f = _stat(Path("/proc") / str(pid))
    return f is not None and f[0] != "Z"


def live_where(field: str, value: int) -> list[int]:
    """Live processes whose ``field`` (``"ppid"``: parent, ``"pgrp"``: process group) is ``value``."""
    k = {"ppid": 1, "pgrp": 2}[field]
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat(d)
            if f is not None and f[0] != "Z" and int(f[k]) == value:
                out.append(int(d.name))
    return out
