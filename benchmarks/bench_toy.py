"""Toy-tier timings on the default 2-D instance (run with OMP_NUM_THREADS=1: one thread per process
is fastest for these 128-wide MLPs on a 2-core machine):

- time to pretrain the eps-MLP (default ToyConfig) and to unlearn each problem with primal-dual;
- per-step cost of the dual machinery against the fixed-multiplier baseline step, in the same run.
  Every timing is a *mean* over all steps (the amortised cost; a median would hide periodic work):
  ``primal`` (loss, backward, Adam), ``pool`` (advancing the ``TrajectoryPool`` of the model's own
  chains), ``estimate`` (the constraint estimate: RU evaluates the forget model along the pool,
  LU evaluates g at the pool's end points, FU reuses the forget minibatch's losses) and ``update``
  (projected dual ascent and bookkeeping);
- "dual machinery" is what the primal-dual run computes and its baseline does not: estimate +
  update, plus the pool when the baseline has none (LU: no fixed-multiplier baseline, so it is
  compared with its own primal step; RU: ESD's composed target also draws half its x_0 from the
  pool, so the pool is primal work in both);
- for comparison, the same primal-dual run with ``train.estimate=fresh`` (T sequential network
  evaluations on ``dual_batch`` fresh trajectories every ``dual_every`` steps, the previous design;
  for LU also the previous default), and RU with the pool advanced every step.

Targets: pretrain + unlearn < 60 s per problem; dual overhead < 5% of step time.

``--sweep``: the default sweep (3 problems x 3 budgets primal-dual, RU with both targets, plus ESD,
SISS and RU dual-only; 15 members) trained as one ensemble (``toy.sweep.run_sweep``, including
pretraining) against the same members run one at a time with ``toy.run.run`` (sharing one
pretraining), in one process. The ensemble's members are split across worker processes, one per
core (``toy.workers``; ``--workers 1``: all in this process). Wall time and CPU time (the workers'
included) are both printed. ``--steps`` / ``--pretrain-steps`` shrink both sides alike; a roofline
line closes the output (matmul FLOPs per step against the batched-matmul rate of this core).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_toy.py [--quick]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_toy.py --sweep [--steps 3000] [--pretrain-steps 4000] [--workers auto]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from theory.gmm import default_instance
from toy.config import ToyConfig, override
from toy.run import pretrain_on_mixture, run


def _per_step_ms(out: Path) -> dict:
    from toy.core.runs import CheckpointStore

    hist = CheckpointStore(out / "checkpoint").load()[0]["hist"]
    return {k: 1e3 * float(np.mean(hist[f"{k}_seconds"])) for k in ("step", "pool", "estimate", "dual")}


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the ensemble's workers)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench_sweep(steps: int, pretrain_steps: int, workers: int | str = "auto") -> None:
    """Ensemble vs one-at-a-time for the default sweep (see the module docstring)."""
    from toy.sweep import run_sweep, sweep_configs

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    base = override(ToyConfig(figure=False), {"train.steps": steps, "pretrain.steps": pretrain_steps})
    w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    res = run_sweep(work / "ensemble", base, figure=False, workers=workers)
    w_ens, c_ens = time.perf_counter() - w0, time.process_time() - c0 + _children_cpu() - k0  # with the workers
    q, _, _ = default_instance()
    w0, c0 = time.perf_counter(), time.process_time()
    pretrain_on_mixture(q, base, "pretrain", work / "pretrained.pt")
    seq = replace(base, pretrained=str(work / "pretrained.pt"))
    w_pre, c_pre = time.perf_counter() - w0, time.process_time() - c0
    lams = []
    for i, c in enumerate(sweep_configs(seq)):
        s = run(replace(c, out=str(work / f"seq-{i:02d}")))
        lams.append((c.problem, c.algorithm, s["target"], s["budgets"][0], s["lam"][0]))
    w_seq, c_seq = time.perf_counter() - w0, time.process_time() - c0
    load = os.getloadavg()
    print(f"\ntoy sweep benchmark: {res['members']} members, steps = {steps}, pretrain_steps = {pretrain_steps}, "
          f"torch threads = {torch.get_num_threads()}, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"on {os.cpu_count()} cores\n")
    print("| | ensemble (one run) | sequential (one at a time) | speed-up |\n|---|---|---|---|")
    print(f"| wall s (incl. pretraining) | {w_ens:.1f} | {w_seq:.1f} (pretraining {w_pre:.1f}) | {w_seq / w_ens:.2f}x |")
    print(f"| process CPU s | {c_ens:.1f} | {c_seq:.1f} (pretraining {c_pre:.1f}) | {c_seq / c_ens:.2f}x |")
    print(f"\nverdicts: {sum(r['verdict']['passed'] for r in res['records'])}/{res['members']} members passed")
    # the ensemble's step split (each member's history holds an equal share of every ensemble step)
    from toy.core.runs import CheckpointStore

    # one checkpoint per worker process (toy.workers); each member's history holds its share of its part's steps
    k = res["workers"]
    names = ["ensemble-checkpoint"] if k == 1 else [f"ensemble-checkpoint-{j + 1}of{k}" for j in range(k)]
    cks = [CheckpointStore(work / "ensemble" / n).load()[0] for n in names]
    ck = {"members": [m for c in cks for m in c["members"]]}
    tot = {k: 1e3 * sum(float(np.mean(m["hist"][f"{k}_seconds"])) for m in ck["members"]) for k in ("step", "pool", "dual")}
    parts = {tuple(sorted(r["worker"].items())) for r in res["records"] if r.get("worker")}
    print(f"\nworker processes: {res['workers']} (each its part of the members, one thread; the step times below are "
          f"summed over them)" + "".join(f"; part {dict(p)['part']}: {dict(p)['members']} members, {dict(p)['seconds']:.1f} s"
                                         for p in sorted(parts)))
    print(f"ensemble step (ms, mean per step, all members): primal {tot['step']:.1f}, pool advances {tot['pool']:.2f}, "
          f"dual steps incl. estimates {tot['dual']:.2f} ({100 * tot['dual'] / tot['step']:.1f}% of the primal step; "
          f"the pools serve RU's on-policy x_0 as well, {100 * tot['pool'] / tot['step']:.1f}%)")
    print("\n| problem | algorithm | target | budget | lam ensemble | lam sequential |\n|---|---|---|---|---|---|")
    for r, (p, a, t, b, lam) in zip(res["records"], lams):
        print(f"| {p} | {a} | {t} | {b:.4g} | {r['lam'][0]:.4g} | {lam:.4g} |")
    # whole steps (primal, pools, estimates, dual) on both sides: the FLOP count below covers them all
    ens_ms = 1e3 * sum(float(np.mean(m["hist"][f"{k}_seconds"])) for m in ck["members"]
                       for k in ("step", "pool", "estimate", "dual"))
    seq_ms = sum(sum(_per_step_ms(work / f"seq-{i:02d}").values()) for i in range(len(lams)))
    _roofline(seq, ens_ms, seq_ms)


def _roofline(cfg: ToyConfig, ens_step_ms: float, seq_step_ms: float) -> None:
    """Why stacking cannot give much more: the matmul FLOPs of one ensemble step (forward and
    backward of every member's segments, the pretrained network where a composed target needs it,
    the pool advances and the constraint estimates; counted by ``torch.utils.flop_counter`` over a few steps of the same sweep) against this core's
    batched-matmul rate at the members' shapes, measured in the same process."""
    from torch.utils.flop_counter import FlopCounterMode

    from toy.ensemble import prepare_member, unlearn_ensemble
    from toy.pretrain import load_model
    from toy.sweep import sweep_configs

    frozen, meta = load_model(cfg.pretrained)
    frozen = frozen.eval().requires_grad_(False)

    def flops(n: int) -> tuple[int, int]:
        work = Path(tempfile.mkdtemp(prefix="bench-flops-"))
        small = override(cfg, {"train.steps": n, "train.settle_frac": 0.0})
        members = [prepare_member(replace(c, out=str(work / f"m{i}")), frozen, meta)
                   for i, c in enumerate(sweep_configs(small))]
        with FlopCounterMode(display=False) as fc:
            unlearn_ensemble(members)
        return fc.get_total_flops(), len(members)

    # the difference of two run lengths: the pools' initial fill (one whole chain each) cancels
    (f1, M), (f2, _) = flops(20), flops(60)
    gflop = (f2 - f1) / 40 / 1e9
    B, H = cfg.train.batch, cfg.model.hidden
    a, w, b = torch.randn(M, B, H), torch.randn(M, H, H), torch.randn(M, 1, H)
    for _ in range(5):
        torch.baddbmm(b, a, w)
    reps, t0 = 100, time.perf_counter()
    for _ in range(reps):
        torch.baddbmm(b, a, w)
    peak = 2 * M * B * H * H * reps / (time.perf_counter() - t0) / 1e9
    print(f"\nroofline: one ensemble step is {gflop:.2f} GFLOP of matmuls ({gflop / M * 1e3:.0f} MFLOP per member); "
          f"the batched matmul ({M}, {B}, {H}) x ({M}, {H}, {H}) runs at {peak:.0f} GFLOP/s on "
          f"{torch.get_num_threads()} thread(s) here, so a step costs at least {gflop / peak * 1e3:.1f} ms of matmuls. "
          f"Measured: ensemble step {ens_step_ms:.1f} ms ({gflop / ens_step_ms * 1e3:.0f} GFLOP/s), the members one at a "
          f"time {seq_step_ms:.1f} ms per step of all of them ({gflop / seq_step_ms * 1e3:.0f} GFLOP/s; the ensemble's "
          f"figure is summed over its worker processes): on one core no batching of the training steps can beat the "
          f"one-at-a-time runs by more than {seq_step_ms / (gflop / peak * 1e3):.1f}x; more only comes from more cores.")


def bench_verify_busy(quick: bool) -> None:
    """``dualunlearn verify --tiers toy`` alone, then with one busy-looping process beside it (the
    other core fully busy on a 2-core machine); prints both times and the ratio."""
    import subprocess
    import sys

    def verify() -> float:
        out = tempfile.mkdtemp(prefix="bench-verify-")
        cmd = [sys.executable, "-m", "dualunlearn.cli", "verify", "--tiers", "toy", "--out", out] + (["--quick"] if quick else [])
        # without OMP_NUM_THREADS: the toy section must set its own thread count
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        import resource
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, capture_output=True, env=env)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        return time.perf_counter() - t0

    cpu: list[float] = []

    load0 = os.getloadavg()[0]
    quiet = verify()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        load1 = os.getloadavg()[0]
        busy = verify()
    finally:
        burner.kill()
        burner.wait()
    print(f"\ndualunlearn verify --tiers toy{' --quick' if quick else ''}: quiet {quiet:.1f} s (load average "
          f"{load0:.1f} at start), with one busy-looping process {busy:.1f} s (load average {load1:.1f} at start); "
          f"ratio {busy / quiet:.2f} (target <= 2) on {os.cpu_count()} cores; CPU time of verify {cpu[0]:.1f} s "
          f"and {cpu[1]:.1f} s (equal CPU and longer wall: a share of the cores, not extra work)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test of the script)")
    ap.add_argument("--sweep", action="store_true", help="the default sweep as one ensemble vs one at a time")
    ap.add_argument("--steps", type=int, default=3000, help="--sweep: unlearning steps per member")
    ap.add_argument("--pretrain-steps", type=int, default=4000, help="--sweep: pretraining steps")
    ap.add_argument("--workers", default="auto", help="--sweep: the ensemble's worker processes ('auto': one per core)")
    ap.add_argument("--verify-busy", action="store_true", help="dualunlearn verify quiet vs beside a busy process")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.verify_busy:
        bench_verify_busy(args.quick)
        return
    if args.sweep:
        bench_sweep(args.steps, args.pretrain_steps, args.workers if args.workers == "auto" else int(args.workers))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-toy-"))
    base = ToyConfig(figure=False)
    if args.quick:
        base = override(base, {"pretrain.steps": 300, "train.steps": 200, "evaluation.n_eval": 300,
                               "evaluation.n_constraint": 1000, "evaluation.n_reference": 300})
    q, _, _ = default_instance()
    t0 = time.perf_counter()
    pretrain_on_mixture(q, base, "pretrain", work / "pretrained.pt")
    t_pre = time.perf_counter() - t0
    base = replace(base, pretrained=str(work / "pretrained.pt"))
    rows, lams = [], []
    for problem, baseline in (("reverse_kl", "esd"), ("forward_kl", "siss"), ("likelihood", None)):
        cfg = override(base, {"problem": problem, "evaluation.surrogate_reference": False})
        t0 = time.perf_counter()
        s = run(replace(cfg, out=str(work / problem)))
        t_un = time.perf_counter() - t0
        pd = _per_step_ms(work / problem)
        if baseline is not None:
            run(replace(cfg, algorithm=baseline, out=str(work / f"{problem}-{baseline}")))
            bl = _per_step_ms(work / f"{problem}-{baseline}")
            ref = sum(bl.values())
            machinery = pd["estimate"] + pd["dual"]  # the baseline runs the same pool, if any
        else:
            bl, ref = None, pd["step"]
            machinery = pd["estimate"] + pd["dual"] + pd["pool"]
        rows.append((problem, baseline or "own primal step", t_pre, t_un, pd, bl, ref, machinery, "default: " + s["constraint_estimator"]))
        lams.append((problem, "default: " + s["constraint_estimator"], s["lam"][0], s["lam_star"][0]))
        extra = {"reverse_kl": (("pool, every 1", {"train.pool_every": 1}), ("fresh", {"train.estimate": "fresh"})),
                 "likelihood": (("fresh", {"train.estimate": "fresh"}),)}.get(problem, ())
        for name, kw in extra:
            tag = name.replace(", ", "-").replace(" ", "")
            sf = run(override(cfg, {"out": str(work / f"{problem}-{tag}"), **kw}))
            fr = _per_step_ms(work / f"{problem}-{tag}")
            ref_fr, m_fr = ref, fr["estimate"] + fr["dual"] + (fr["pool"] if bl is None else 0.0)
            if bl is not None and "train.pool_every" in kw:  # the baseline with the same pool schedule
                run(override(cfg, {"algorithm": baseline, "out": str(work / f"{problem}-{baseline}-{tag}"), **kw}))
                ref_fr = sum(_per_step_ms(work / f"{problem}-{baseline}-{tag}").values())
            rows.append((problem, baseline or "own primal step", t_pre, float("nan"), fr, bl, ref_fr, m_fr, name))
            lams.append((problem, name, sf["lam"][0], sf["lam_star"][0]))
    print(f"\ntoy benchmark, torch threads = {torch.get_num_threads()}, steps = {base.train.steps}, "
          f"pretrain_steps = {base.pretrain.steps}, dual_every = {base.train.dual_every}; ms are means per step\n")
    print("| problem | estimate | pretrain s | unlearn s | primal ms | pool ms | estimate ms | update ms "
          "| baseline total ms (which) | dual machinery ms | overhead |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, which, tp, tu, pd, bl, ref, mach, est in rows:
        bl_s = f"{ref:.2f} ({which})"
        print(f"| {p} | {est} | {tp:.1f} | {tu:.1f} | {pd['step']:.2f} | {pd['pool']:.3f} | {pd['estimate']:.3f} | "
              f"{pd['dual']:.3f} | {bl_s} | {mach:.3f} | {100 * mach / ref:.1f}% |")
    print("\n| problem | estimate | lam | lam* |\n|---|---|---|---|")
    for p, est, lam, ls in lams:
        print(f"| {p} | {est} | {lam:.4g} | {ls:.4g} |")
    print("\n'unlearn s' includes the end-of-run evaluation (samples, constraint and objective estimates, distances).")
    print("RU here trains the composed target (default): its lam converges to the exact-score surrogate fixed point "
          "(0.2007 on this instance, docs/toy.md), not lam*.")


if __name__ == "__main__":
    main()
