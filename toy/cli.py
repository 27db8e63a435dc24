"""``dualunlearn toy``: build a ``ToyConfig`` from flags / TOML / ``key=value`` overrides and call
``toy.run.run``. Flags override the file; ``--set`` overrides both. Keys of a section are dotted
(``--set train.steps=2000``; in a TOML file, a ``[train]`` table); docs/toy.md lists them.

    dualunlearn toy --problem reverse_kl --out runs/toy-ru
    dualunlearn toy --problem forward_kl --algorithm siss --set siss_lam=0.15 --out runs/toy-siss
    dualunlearn toy --problem likelihood --budget 0.004 --config toy.toml --out runs/toy-lu
    dualunlearn toy sweep --seeds 5 --out runs/toy-sweep

Every run ends with a verdict line per check (PASS/FAIL, as ``dualunlearn verify`` prints) and exits
with status 1 on a failed check unless ``--no-check``. ``--threads`` sets torch's intra-op threads
(default 1: the fastest for these small networks, and robust to other busy processes).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

from theory.config import load_config

if TYPE_CHECKING:
    from theory.report import Check
    from toy.config import ToyConfig

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from theory import PROBLEMS
    from toy.algorithms import ALGORITHMS

    algs = sorted({a for v in ALGORITHMS.values() for a in v})
    p = subparsers.add_parser("toy", help="unlearn a small score network on the 2-D mixture and compare with theory",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", choices=PROBLEMS, help="the problem (required unless 'toy sweep')")
    p.add_argument("--algorithm", choices=algs, default=None,
                   help="primal_dual (default), dual_only or esd (reverse_kl), siss (forward_kl)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="constraint budget (repeat for several forget distributions); default: the instance's")
    p.add_argument("--config", default=None, help="TOML file with ToyConfig keys ([train], [dual], ... tables)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key with a TOML literal, e.g. --set train.steps=2000, "
                        "--set 'variant=\"likelihood_ratio\"' (section keys dotted; docs/toy.md)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="run directory, required (an earlier run of the same config there is resumed; docs/runs.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (only with an identical config; also the default)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=main, toy_command=None)
    sub = p.add_subparsers(dest="toy_command", metavar="{sweep}")
    sw = sub.add_parser("sweep", help="budget sweep / seed ensemble trained as one vectorised run, with verdicts",
                        description="Train a sweep's members as one ensemble; writes sweep.json and sweep.png.")
    sw.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    sw.add_argument("--budgets", nargs="+", type=float, default=None,
                    help="budgets to train (one problem only); default: the instance's and two more on the dual path")
    sw.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each with its own pretrained network")
    sw.add_argument("--no-baselines", action="store_true", help="primal-dual members only (no ESD, SISS, dual-only)")
    sw.add_argument("--config", default=None, help="TOML file with ToyConfig keys shared by every member")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key of every member, e.g. --set train.steps=2000")
    sw.add_argument("--out", required=True, help="output directory (sweep.json, sweep.png, member-*/)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(sw, sweep=True)
    sw.set_defaults(func=main_sweep, resumes_itself=True)  # rerunning the same command continues it


def _positive_or_auto(flag: str) -> Callable[[str], int | str]:
    def parse(value: str) -> int | str:
        if value == "auto":
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be 'auto' or a positive integer, got {value!r}")
        return n
    return parse


def _common(p, sweep: bool = False) -> None:
    p.add_argument("--no-check", action="store_true", help="exit 0 even when a check fails (the verdicts still print)")
    if sweep:
        p.add_argument("--workers", type=_positive_or_auto("--workers"), default="auto",
                       help="processes the members are split across, one thread each: 'auto' (default: one per "
                            "available core) or a count; results do not depend on it")
        p.add_argument("--threads", type=_positive_or_auto("--threads"), default="auto",
                       help="torch intra-op threads of pretraining and of a one-process ensemble: 'auto' (default: "
                            "times 1..the available cores as it runs and keeps the fastest, following the machine's "
                            "load) or a fixed count")
    else:
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")


def print_verdicts(checks: Sequence[Check]) -> bool:
    """One line per check, ``PASS``/``FAIL name: measured (expected)``, then the overall verdict."""
    for c in checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.measured} ({c.expected})")
    ok = all(c.passed for c in checks)
    n_pass = sum(c.passed for c in checks)
    print(f"{'PASS' if ok else 'FAIL'}: {n_pass}/{len(checks)} checks passed")
    return ok


def _literal(value) -> str:
    """A flag's value as the TOML literal ``--set`` would take (floats by ``repr``: inf stays inf)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    """The run's ``ToyConfig``: the TOML file, then the flags, then ``--set`` (each wins over the one before)."""
    from toy.config import ToyConfig

    flags = {"problem": args.problem, "out": args.out, "threads": args.threads}
    if args.algorithm is not None:
        flags["algorithm"] = args.algorithm
    if args.budget:
        flags["budgets"] = [float(b) for b in args.budget]
    if args.seed is not None:
        flags["seed"] = args.seed
    return load_config(ToyConfig, args.config, [f"{k}={_literal(v)}" for k, v in flags.items()] + list(args.overrides))


def main(args: argparse.Namespace) -> int:
    from toy.models import torch_threads
    from toy.run import run
    from toy.verify import member_checks

    if args.problem is None:
        raise ValueError("dualunlearn toy needs --problem (one of reverse_kl, forward_kl, likelihood) or the 'sweep' command")
    if args.out is None:
        raise ValueError("dualunlearn toy needs --out DIR")
    cfg = config_from_args(args)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    # errors (divergence: exit 3, with the last good checkpoint kept) are reported by dualunlearn.cli
    if args.overwrite:  # the run's files go; a config file or model kept inside it stays
        from toy.core.runs import clear_run_dir
        clear_run_dir(cfg.out, keep=(args.config or "", cfg.pretrained or ""))
    with torch_threads(cfg.threads):
        summary = run(cfg, progress=not args.no_progress, resume=True if args.resume else None)
    keys = ("problem", "algorithm", "budgets", "lam", "lam_star", "lam_reference", "constraint_values",
            "constraint_stderr", "distance_to_target", "distance_noise_floor", "figure")
    from toy.core.runs import jsonable
    print(json.dumps(jsonable({k: summary.get(k) for k in keys}), indent=1))
    print(f"summary written to {cfg.out}/summary.json")
    ok = print_verdicts(member_checks(summary, f"{cfg.problem} {cfg.algorithm}"))
    return 0 if ok or args.no_check else 1


def main_sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from toy.models import torch_threads
    from toy.config import ToyConfig
    from toy.sweep import run_sweep

    if args.budgets and len(args.problems) != 1:
        raise ValueError(f"--budgets needs exactly one problem (--problems P), got {len(args.problems)}: {args.problems}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = load_config(ToyConfig, args.config, args.overrides)
    if args.threads != "auto":
        base = replace(base, threads=args.threads)
    torch_threads(base.threads)
    budgets = {args.problems[0]: list(args.budgets)} if args.budgets else None
    res = run_sweep(args.out, base, tuple(args.problems), budgets, tuple(range(args.seeds)),
                    baselines=not args.no_baselines, progress=not args.no_progress, threads=args.threads,
                    workers=args.workers)
    for r in res["records"]:
        v = r["verdict"]
        tol = r["lam_tolerance_interval"]
        tol_s = f" in [{tol[0]:.4g}, {tol[1]:.4g}]" if tol else ""
        print(f"{'PASS' if v['passed'] else 'FAIL'}  {r['problem']} {r['algorithm']} ({r['target']}) seed {r['seed']} "
              f"b={r['budgets'][0]:.4g}: lam {r['lam'][0]:.4g}{tol_s}"
              + ("" if v["passed"] else f"; failed: {', '.join(v['failed'])}"))
    n_pass = sum(r["verdict"]["passed"] for r in res["records"])
    print(f"{'PASS' if res['passed'] else 'FAIL'}: {n_pass}/{res['members']} members passed; "
          f"{res['seconds']:.1f} s; {args.out}/sweep.json, {res.get('figure')}")
    return 0 if res["passed"] or args.no_check else 1
