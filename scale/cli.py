"""The ``dualunlearn`` command line. Commands only build a config and call a ``run(cfg)``:

- ``dualunlearn verify [--out DIR] [--quick]``       pre-flight report (``scale.verify``)
- ``dualunlearn toy --problem P --out DIR``          toy-tier unlearning run (``toy.cli``)
- ``dualunlearn scale concept|data|sample|evaluate|rehearse``  scale tier (``scale.commands``)
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualunlearn", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="pre-flight checks of every tier; writes report.md and figures")
    p.add_argument("--out", default="runs/verify", help="output directory (default: runs/verify)")
    p.add_argument("--quick", action="store_true", help="smaller instances, for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiers", default="theory,toy", help="comma-separated tiers (default: theory,toy)")
    p.add_argument("--config", help="also run the pre-flight of this scale run config (concept or data TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --config")
    p.set_defaults(func=lambda a: __import__("scale.verify", fromlist=["main_verify"]).main_verify(a))

    from toy.cli import register as register_toy
    register_toy(sub)
    from scale.commands import register as register_scale
    register_scale(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # bad input: a clear message, not a traceback
        print(f"dualunlearn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
