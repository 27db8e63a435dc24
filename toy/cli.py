"""``dualunlearn toy``: build a ``ToyConfig`` from flags / TOML / ``key=value`` overrides and call
``toy.run.run``. Flags override the file; ``--set`` overrides both.

    dualunlearn toy --problem reverse_kl --out runs/toy-ru
    dualunlearn toy --problem forward_kl --algorithm siss --set siss_lam=0.15 --out runs/toy-siss
    dualunlearn toy --problem likelihood --budget 0.004 --config toy.toml --out runs/toy-lu
"""

from __future__ import annotations

import json
import logging

from theory.config import load_config

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from theory import PROBLEMS
    from toy.algorithms import ALGORITHMS

    algs = sorted({a for v in ALGORITHMS.values() for a in v})
    p = subparsers.add_parser("toy", help="unlearn a small score network on the 2-D mixture and compare with theory",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", required=True, choices=PROBLEMS)
    p.add_argument("--algorithm", choices=algs, default=None,
                   help="primal_dual (default), dual_only or esd (reverse_kl), siss (forward_kl)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="constraint budget (repeat for several forget distributions); default: the instance's")
    p.add_argument("--config", default=None, help="TOML file with ToyConfig keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key with a TOML literal, e.g. --set steps=2000, --set 'variant=\"likelihood_ratio\"'")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", required=True,
                   help="run directory (an earlier run of the same config there is resumed; docs/runs.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (only with an identical config; also the default)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start afresh there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def config_from_args(args):
    from toy.run import ToyConfig

    flags = {"problem": args.problem, "out": args.out}
    if args.algorithm is not None:
        flags["algorithm"] = args.algorithm
    if args.budget:
        flags["budgets"] = list(args.budget)
    if args.seed is not None:
        flags["seed"] = args.seed
    base = load_config(ToyConfig, args.config, args.overrides) if (args.config or args.overrides) else ToyConfig()
    from dataclasses import replace
    cfg = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()})
    # --set wins over flags
    if args.overrides:
        over = load_config(ToyConfig, None, args.overrides)
        keys = {o.split("=", 1)[0].strip() for o in args.overrides}
        cfg = replace(cfg, **{k: getattr(over, k) for k in keys})
    return cfg


def main(args) -> int:
    from toy.run import run

    cfg = config_from_args(args)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    # errors (divergence: exit 3, with the last good checkpoint kept) are reported by scale.cli
    if args.overwrite:  # the run's files go; a config file or model kept inside it stays
        from toy.core.runs import clear_run_dir
        clear_run_dir(cfg.out, keep=(args.config or "", cfg.pretrained))
    summary = run(cfg, progress=not args.no_progress, resume=True if args.resume else None)
    keys = ("problem", "algorithm", "budgets", "lam", "lam_star", "lam_reference", "constraint_values",
            "constraint_stderr", "distance_to_target", "distance_noise_floor", "figure")
    from toy.core.runs import jsonable
    print(json.dumps(jsonable({k: summary.get(k) for k in keys}), indent=1))
    print(f"summary written to {cfg.out}/summary.json")
    return 0
