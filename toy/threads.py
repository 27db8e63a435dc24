"""Choosing torch's intra-op thread count by measurement, for work whose best count depends on the
machine's load: a stacked ensemble's batched matmuls (15 members x 512 rows) run ~1.7x faster on two
threads than on one on a quiet 2-core machine, but when another process keeps a core busy two
threads are far slower (measured beside two other busy processes: 0.04 s per ensemble step on one
thread, 0.1-1.3 s on two), and one thread is best (docs/toy.md, "Threads"). Results do not depend on
the count: torch's CPU matmuls split rows and columns across threads, not the summed dimension, so
forward and backward are bitwise equal at 1 and 2 threads (tested); only the wall time changes.
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
    """Call ``tick()`` once per step of a loop whose steps cost about the same.

    At the loop's first tick and every ``every`` steps after, it *probes*: the current count first,
    then each other candidate (1, 2 and the available cores), one step to settle and ``probe`` timed
    steps each; it keeps the count with the smallest median step time, so it follows the machine's
    load as it changes. A probe is cut short when its first timed step takes more than twice the
    best median so far (a count that loses that badly costs a lot per step: under load, two threads
    can be 10-30x slower), and a count that lost by more than 2x is probed half as often each time
    (up to 16x less), so a busy machine pays little for the probes. ``max_threads = 1`` never probes.

    ``history``: ``(phase, step, chosen, {count: median seconds})`` per decision; ``restart(phase)``
    begins a loop of another step cost (probing at its first tick); ``close()`` restores the count
    found at construction."""

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
        self._losses = {n: 0 for n in self.candidates}  # consecutive probes lost by more than 2x
        self._probes = 0
        self.restart()
        if len(self.candidates) == 1:
            self._set(1)

    def restart(self, phase: str = "") -> None:
        """Start a new loop (``phase`` labels its decisions): probe again at its first tick."""
        self.phase = phase
        self._step = 0
        self._plan: list[tuple[int, bool]] = []  # (count, timed) of the coming probe steps
        self._times: dict[int, list[float]] = {}
        self._last: float | None = None

    def _set(self, n: int) -> None:
        if n != self._current:
            torch.set_num_threads(n)
            self._current = n

    def _start_probe(self) -> None:
        self._probes += 1
        order = [self.chosen] + [n for n in self.candidates if n != self.chosen]
        # a count that lost badly k probes in a row is probed every 2^k-th probe only (k <= 4)
        order = [n for n in order if n == self.chosen or self._probes % (2 ** min(self._losses[n], 4)) == 0]
        self._plan = [p for n in order for p in [(n, False)] + [(n, True)] * self.probe]

    def _decide(self) -> None:
        med = {n: sorted(v)[len(v) // 2] for n, v in self._times.items()}
        self.chosen = min(med, key=med.get)
        for n, v in med.items():
            self._losses[n] = self._losses[n] + 1 if v > 2 * med[self.chosen] else 0
        self.history.append((self.phase, self._step, self.chosen, med))
        self._times = {}

    def tick(self) -> None:
        now = time.perf_counter()
        if len(self.candidates) > 1:
            if self._plan:  # the step just ended ran at self._plan[0]
                n, timed = self._plan.pop(0)
                if timed and self._last is not None:
                    took = now - self._last
                    self._times.setdefault(n, []).append(took)
                    best = min((sorted(v)[len(v) // 2] for m, v in self._times.items() if m != n), default=None)
                    if best is not None and took > 2 * best:  # losing badly: stop probing this count
                        while self._plan and self._plan[0][0] == n:
                            self._plan.pop(0)
                if not self._plan:
                    self._decide()
            if self._step % self.every == 0 and not self._plan:
                self._start_probe()
            self._set(self._plan[0][0] if self._plan else self.chosen)
        self._step += 1
        self._last = time.perf_counter()

    def close(self) -> None:
        torch.set_num_threads(self.previous)
        self._current = None
