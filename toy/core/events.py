"""What the run-directory machinery reports: the error a command gets when it cannot use a run
directory as asked (``RunDirError``), the announcements a user always sees (resumed, refused,
recovered), and the test hook that parks a process at a named point so a test's kill lands there.

Every run-directory module logs on one logger, ``RUN_LOGGER`` (``toy.core.runs``), whichever module
the event comes from: the CLI raises it to INFO and docs/runs.md quotes its lines.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

#: the logger of every run-directory event (the name predates the split of ``toy.core.runs``)
RUN_LOGGER = "toy.core.runs"

log = logging.getLogger(RUN_LOGGER)


class RunDirError(ValueError):
    """A command cannot use this run directory as asked (another config, a live holder, ...)."""


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
