"""Choosing torch's intra-op thread count by measurement, for work whose best count depends on the
machine's load: a stacked ensemble's batched matmuls (15 members x 512 rows) run ~1.7x faster on two
threads than on one on a quiet 2-core machine, but slower when another process keeps a core busy,
where one thread is best (docs/toy.md, "Threads"). Results do not depend on the count: torch's CPU
matmuls split rows and columns across threads, not the summed dimension, so forward and backward
are bitwise equal at 1 and 2 threads (tested); only the wall time changes.
"""

from __future__ import annotations

import os
import time

import torch


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class ThreadTuner:
    """Call ``tick()`` once per step of a loop with steps of similar cost. Every ``every`` steps (and
    at the start) it probes each candidate thread count for ``probe`` steps (after one step to settle)
    and keeps the fastest by median step time, so it follows the machine's load as it changes.
    ``max_threads = 1`` fixes one thread (no probing). ``history`` records ``(phase, step, threads,
    {count: median seconds})`` per decision; ``restart(phase)`` begins a loop of another step cost;
    ``close()`` restores the count found at construction."""

    def __init__(self, max_threads: int | None = None, probe: int = 4, every: int = 300):
        if max_threads is None:
            max_threads = available_cores()
        if int(max_threads) != max_threads or max_threads < 1:
            raise ValueError(f"max_threads must be a positive integer, got {max_threads}")
        if probe < 1 or every < 1:
            raise ValueError(f"probe and every must be >= 1, got {probe}, {every}")
        self.candidates = sorted({1, int(max_threads)} | ({2} if max_threads > 2 else set()))
        self.probe, self.every = int(probe), int(every)
        self.previous = torch.get_num_threads()
        self.history: list[tuple[str, int, int, dict]] = []
        self.chosen = 1
        self._current: int | None = None
        self.restart()
        if len(self.candidates) == 1:
            self._set(1)

    def restart(self, phase: str = "") -> None:
        """Start a new loop (``phase`` labels its decisions): probe again at its first tick."""
        self.phase = phase
        self._step = 0
        self._plan: list[int | None] = []  # thread counts of the coming probe steps (None: settling)
        self._times: dict[int, list[float]] = {}
        self._last: float | None = None

    def _set(self, n: int) -> None:
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None and self._plan and self._plan[0] is not None:
            self._times.setdefault(self._current, []).append(now - self._last)
        if self._plan:
            self._plan.pop(0)
        if len(self.candidates) > 1:
            if not self._plan and self._times:  # a probe just ended: decide
                med = {n: sorted(v)[len(v) // 2] for n, v in self._times.items()}
                self.chosen = min(med, key=med.get)
                self.history.append((self.phase, self._step, self.chosen, med))
                self._times = {}
            if self._step % self.every == 0:
                # settle one step at each count (marked None: not timed), then time ``probe`` steps
                self._plan = [p for n in self.candidates for p in [None] + [n] * self.probe]
            if self._plan:
                nxt = self._plan[0]
                self._set(nxt if nxt is not None else self._next_timed())
            else:
                self._set(self.chosen)
        self._step += 1
        self._last = time.perf_counter()

    def _next_timed(self) -> int:
        return next(p for p in self._plan if p is not None)

    def close(self) -> None:
        torch.set_num_threads(self.previous)
        self._current = None
