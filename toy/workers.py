"""An ensemble's members split across worker processes, one per core (docs/toy.md, "Workers").

A stacked ensemble step is compute-bound (``benchmarks/bench_toy.py --sweep`` prints the roofline):
two intra-op threads speed its batched matmuls up ~1.7x on a quiet 2-core machine but leave the rest
of the step (the primal steps' draws and targets, the optimiser, Python) on one core, and beside a
busy process the two threads wait on each other (``toy.threads``). Independent processes scale the
whole step and never wait on each other: here the members are split into ``k`` parts of about equal
cost (``partition``), each part trains as its own stacked ensemble in a spawned process with one
thread (``toy.ensemble.train_part``, passed in: this module does not import the ensemble), and the parent only aggregates progress and results.

A member's arithmetic does not depend on which other members share its stacked matmuls (every
member's product, gradient and Adam update is its own), so the split changes no result: tested
bitwise against one process. The split is recorded in ``out_dir/workers.json`` and reused on a rerun,
so an interrupted run resumes from the same checkpoints (``ensemble-checkpoint-<j>of<k>``) whatever
the core count then.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import queue as queue_mod
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from toy.core.files import atomic_write_json
from toy.threads import available_cores

if TYPE_CHECKING:
    from tqdm import tqdm

    from toy.config import ToyConfig

WORKERS_FILE = "workers.json"


def step_cost(cfg: ToyConfig) -> float:
    """Relative cost of one training step of a member, in rows of network evaluation: the rows it is
    trained on (forward and backward, 3 units a row), one forward each of the pretrained and forget
    networks at a composed target's rows, and a fixed share of 5 x batch for the rest of its step
    (the primal step's draws and exact targets, pools, dual, loop). Fitted to one-member steps at
    the default size, one thread: RU composed 2.98 ms, ESD 2.91, dual-only 2.89, FU 2.90, SISS 2.80,
    RU reweighted 2.57, LU 2.40 (this model: 3.0, 3.0, 3.0, 2.85, 2.85, 2.4, 2.4 on the same scale;
    a unit is ~0.6 us on that core)."""
    tr = cfg.train
    rows = 5.0 * tr.batch + 3.0 * tr.batch
    if cfg.problem == "forward_kl":
        rows += 3.0 * tr.forget_batch
    target = tr.target or ("reweighted" if cfg.problem == "likelihood" else "composed")
    if cfg.problem != "forward_kl" and (target == "composed" or cfg.algorithm in ("esd", "dual_only")):
        rows += 2.0 * tr.batch
    return rows


def _constraint_rows(cfg: ToyConfig) -> float:
    """Rows of the end-of-run constraint estimate (``toy.evaluation.final_constraints``): LU samples
    ``n_constraint`` chains of T steps, RU runs ``n_constraint / 5`` with the forget network beside
    the model, FU evaluates ``n_constraint`` forget draws once."""
    T, n = cfg.diffusion.num_timesteps, cfg.evaluation.n_constraint
    return {"likelihood": T * n, "reverse_kl": 2.0 * T * (n // 5)}.get(cfg.problem, float(n))


def member_cost(cfg: ToyConfig) -> float:
    """A member's whole cost in ``step_cost``'s units: its training steps, its end-of-run constraint
    estimate and its evaluation samples (``n_eval`` chains of T steps: the model's, and the reference
    law's, and for a composed RU target the frozen network's composed chain)."""
    T, n_eval = cfg.diffusion.num_timesteps, cfg.evaluation.n_eval
    chains = 3 if cfg.problem == "reverse_kl" and (cfg.train.target or "composed") == "composed" else 2
    return cfg.train.total_steps * step_cost(cfg) + _constraint_rows(cfg) + chains * T * n_eval


def reference_cost(cfg: ToyConfig) -> tuple[tuple, float]:
    """The reference estimates an ensemble computes once per (problem, seed) and shares among the
    members of a part (``toy.evaluation.evaluate``'s cache: the constraint estimator on the
    pretrained network and on exact scores, 4x the samples each; measured 5x the member's own
    estimate): ``(key, cost)``."""
    return (cfg.problem, cfg.seed, cfg.variant), 5.0 * _constraint_rows(cfg)


def partition(costs: list[float], k: int, shared: list[tuple[tuple, float]] | None = None) -> list[list[int]]:
    """Indices ``0..len(costs)-1`` in ``k`` parts of about equal cost, each part in index order, no
    part empty. A part's cost is its members' ``costs`` plus, once per key, the ``shared[i] = (key,
    cost)`` of its members (work its members share, such as reference estimates). Longest first,
    each to the part it makes least costly (ties by index); then moves and swaps between two parts
    while one lowers the larger of their costs."""
    if k < 1 or int(k) != k:
        raise ValueError(f"the number of parts must be a positive integer, got {k}")
    if k > len(costs):
        raise ValueError(f"cannot split {len(costs)} members into {k} non-empty parts")
    if shared is None:
        shared = [((i,), 0.0) for i in range(len(costs))]

    def cost(part: list[int]) -> float:
        return sum(costs[i] for i in part) + sum(dict(shared[i] for i in part).values())

    parts: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(costs)), key=lambda i: (-(costs[i] + shared[i][1]), i)):
        j = min(range(k), key=lambda j: (cost(parts[j] + [i]), j))
        parts[j].append(i)
    improved = True
    while improved:
        improved = False
        load = [cost(p) for p in parts]
        for a in sorted(range(k), key=lambda j: -load[j]):
            for b in range(k):
                if b == a or load[b] > load[a]:
                    continue
                best, pick = load[a], None
                for x in parts[a]:
                    for y in [None] + parts[b]:
                        if y is None and len(parts[a]) == 1:
                            continue
                        pa = [i for i in parts[a] if i != x] + ([y] if y is not None else [])
                        pb = [i for i in parts[b] if i != y] + [x]
                        worst = max(cost(pa), cost(pb))
                        if worst < best - 1e-9:
                            best, pick = worst, (pa, pb)
                if pick is not None:
                    parts[a], parts[b] = pick
                    improved = True
                    break
            if improved:
                break
    return [sorted(p) for p in parts]


def resolve_parts(cfgs: list[ToyConfig], out_dir: Path, workers: int | str) -> list[list[int]]:
    """The split of ``cfgs`` for ``workers`` (``"auto"``: one part per available core, at most one per
    member): the one recorded in ``out_dir/workers.json`` when that covers these members (a rerun
    resumes the same parts), else a new ``partition``, recorded."""
    if workers == "auto":
        k = min(available_cores(), len(cfgs))
    elif isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1:
        k = min(workers, len(cfgs))
    else:
        raise ValueError(f"workers must be 'auto' or a positive integer, got {workers!r}")
    path = Path(out_dir) / WORKERS_FILE
    if path.exists():
        rec = json.loads(path.read_text())
        if sorted(i for p in rec["parts"] for i in p) == list(range(len(cfgs))):
            return [list(p) for p in rec["parts"]]
    parts = partition([member_cost(c) for c in cfgs], k, [reference_cost(c) for c in cfgs])
    atomic_write_json(path, {"workers": len(parts), "parts": parts})
    return parts


class _QueueProgress:
    """The loop's progress contract (``update``, ``set_postfix``) sent to the parent's bar."""

    def __init__(self, q: Any, part: int):
        self.q, self.part = q, part

    def update(self, n: int = 1) -> None:
        self.q.put(("progress", self.part, n))

    def set_postfix(self, *args: Any, **kw: Any) -> None:
        pass


def _exit_with_parent(poll: float = 1.0) -> None:
    """A daemon thread that ends this worker when its parent is gone (killed with SIGKILL, it cannot
    stop its workers): an orphan would go on training into the run directory and hold its locks."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _part_main(q: Any, part: int, nparts: int, train: Callable, items: list, out_dir: str, paths: dict) -> None:
    """A worker process: one thread, its part of the members trained and evaluated as one ensemble."""
    import torch

    torch.set_num_threads(1)
    _exit_with_parent()
    try:
        t0 = time.perf_counter()
        res = train(items, Path(out_dir), paths, f"ensemble-checkpoint-{part + 1}of{nparts}", _QueueProgress(q, part), None)
        took = time.perf_counter() - t0
        for r in res:  # which part trained the member, and how long the part took (training and evaluation)
            r["worker"] = {"part": part + 1, "of": nparts, "members": len(items), "seconds": took}
        q.put(("done", part, res))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 -- an exception that cannot travel: its text does
            e = None
        q.put(("error", part, (e, text)))


def run_parts(train: Callable, cfgs: list[ToyConfig], parts: list[list[int]], out_dir: Path, paths: dict,
              bar: tqdm | None = None) -> list[dict]:
    """Train and evaluate every part in its own spawned process with ``train(items, out_dir, paths,
    checkpoint_name, progress, tuner)`` (``toy.ensemble.train_part``: a module-level function, sent by
    reference); returns the summaries in member order. A worker's exception is raised here as
    itself (its traceback attached as a note; one that cannot be pickled as a ``RuntimeError`` with
    its text); on any exception (or Ctrl-C) the workers are terminated (their checkpoints are atomic: a rerun resumes)."""
    ctx = mp.get_context("spawn")  # no fork of a process holding torch's thread pools
    q = ctx.Queue()
    procs = [ctx.Process(target=_part_main, args=(q, j, len(parts), train, [(i, cfgs[i]) for i in part], str(out_dir), paths),
                         name=f"toy-worker-{j + 1}of{len(parts)}", daemon=True) for j, part in enumerate(parts)]
    results: dict[int, list[dict]] = {}
    try:
        for p in procs:
            p.start()
        while len(results) < len(procs):
            try:
                kind, j, payload = q.get(timeout=0.5)
            except queue_mod.Empty:
                for j, p in enumerate(procs):
                    if j not in results and not p.is_alive() and q.empty():
                        raise RuntimeError(f"toy worker {j + 1} of {len(procs)} exited with code {p.exitcode} "
                                           f"before reporting (killed? out of memory?)")
                continue
            if kind == "progress":
                if bar is not None:
                    bar.update(payload)
            elif kind == "done":
                results[j] = payload
            else:
                exc, text = payload
                if exc is None:
                    raise RuntimeError(f"toy worker {j + 1} of {len(procs)} failed: {text}")
                # the worker's own exception (a refused budget stays a ValueError, Ctrl-C a
                # KeyboardInterrupt: the CLI's exit codes hold), its traceback as a note
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(f"in toy worker {j + 1} of {len(procs)}:\n{text}")
                raise exc
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    out: list[dict | None] = [None] * len(cfgs)
    for j, part in enumerate(parts):
        for i, s in zip(part, results[j]):
            out[i] = s
    return out  # type: ignore[return-value]
