"""The ``dualunlearn`` command line. Commands only build a config and call a ``run(cfg)``:

- ``dualunlearn verify [--out DIR] [--quick]``       pre-flight report (``dualunlearn.verify``)
- ``dualunlearn toy --problem P --out DIR``          toy-tier unlearning run (``toy.cli``)
- ``dualunlearn scale concept|data|sample|evaluate|rehearse``  scale tier (``scale.commands``)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualunlearn", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level (and show the traceback of an internal error)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="pre-flight checks of every tier; writes report.md and figures")
    p.add_argument("--out", default="runs/verify", help="output directory (default: runs/verify)")
    p.add_argument("--quick", action="store_true", help="smaller instances, for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiers", default="theory,toy", help="comma-separated tiers (default: theory,toy)")
    p.add_argument("--config", help="also run the pre-flight of this scale run config (concept or data TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --config")
    p.set_defaults(func=lambda a: __import__("dualunlearn.verify", fromlist=["main_verify"]).main_verify(a))

    from toy.cli import register as register_toy
    register_toy(sub)
    from scale.commands import register as register_scale
    register_scale(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _resume_command(argv: list[str], takes_resume: bool = True) -> str:
    """The command line that continues an interrupted run: the same, with ``--resume`` instead of
    ``--overwrite`` where the command has that flag (``toy sweep`` resumes its checkpoints by itself:
    the same command line)."""
    import shlex

    args = [a for a in argv if a != "--overwrite"]
    if takes_resume and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["dualunlearn", *args])


def _takes_resume(args: argparse.Namespace) -> bool:
    """Whether the command continues a run with ``--resume`` (a sweep resumes by itself)."""
    return hasattr(args, "resume") and not getattr(args, "resumes_itself", False)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, argv: list[str]) -> int:
    """Call a command's function; every failure is one line on stderr and an exit code:
    2 bad input (config, arguments, a run directory that cannot be used as asked), 1 a failed
    check or an unusable checkpoint or file error, 3 divergence (NaN/Inf or multipliers past their
    cap; the last good checkpoint is kept), 130 Ctrl-C (the last good checkpoint is kept)."""
    from toy.core.runs import CheckpointError

    verbose = bool(getattr(args, "verbose", False))
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f"{out} keeps its last checkpoint; " if out else ""
        print(f"dualunlearn: interrupted; {where}to continue: {_resume_command(argv, _takes_resume(args))}",
              file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"dualunlearn: diverged: {_one_line(exc)}", file=sys.stderr)
        return 3
    except CheckpointError as exc:
        print(f"dualunlearn: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad input: a clear message, not a traceback
        print(f"dualunlearn: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dualunlearn: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback with --verbose
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"dualunlearn: internal error: {type(exc).__name__}: {_one_line(exc)}"
              f"{'' if verbose else ' (rerun with --verbose for the traceback)'}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C while parsing
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("toy.core.runs").setLevel(logging.INFO)  # resumed / refused / recovered: always shown
    out = getattr(args, "out", None)
    if out and Path(out).exists() and not Path(out).is_dir():
        print(f"dualunlearn: error: --out {out!r} is a file, not a directory", file=sys.stderr)
        return 2
    return run_command(args.func, args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
