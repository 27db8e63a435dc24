"""One process per run directory: ``RunLock`` holds ``<out>/.lock`` with ``flock`` and writes the
holder's pid into it. The kernel drops a ``flock`` when its process dies, so the lock of a killed run
is recovered by the next command (with a warning naming the dead pid); a live holder makes
``acquire`` raise ``RunDirError`` naming its pid. Re-entrant within one process.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import TracebackType

from toy.core.events import RUN_LOGGER, RunDirError

log = logging.getLogger(RUN_LOGGER)

#: the lock file's name inside a run directory
LOCK = ".lock"

_HELD: dict[str, list] = {}  # realpath -> [fd, count]: locks this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``out/.lock`` held with ``flock`` and holding the holder's pid. The kernel drops a ``flock``
    when its process dies, so the lock of a killed run is recovered by the next command (which
    says so); a live holder makes ``acquire`` raise ``RunDirError`` with its pid. Re-entrant within
    one process."""

    def __init__(self, out: str | Path):
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

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
