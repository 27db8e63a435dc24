"""``dualunlearn scale concept|data|sample|evaluate|rehearse`` (and ``preflight|calibrate``, from
``scale.preflight``): each command builds a frozen config from ``--config FILE`` and ``--set
key=value`` overrides (unknown keys rejected), prints it with ``--dry-run``, and otherwise
calls the module's ``run(cfg)`` (which tests call directly).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from theory.config import config_to_dict, load_config

if TYPE_CHECKING:
    from scale.concept import ConceptConfig
    from scale.data import DataConfig
    from scale.evaluate import EvaluateConfig
    from scale.rehearse import RehearseConfig
    from scale.sample import SampleConfig

log = logging.getLogger(__name__)


def _config_classes():
    from scale.concept import ConceptConfig
    from scale.data import DataConfig
    from scale.evaluate import EvaluateConfig
    from scale.rehearse import RehearseConfig
    from scale.sample import SampleConfig

    return {"concept": ConceptConfig, "data": DataConfig, "sample": SampleConfig,
            "evaluate": EvaluateConfig, "rehearse": RehearseConfig}


def _runner(name: str):
    import importlib

    return importlib.import_module(f"scale.{name}").run


HELP = {
    "concept": "concept unlearning on a text-to-image model (method = reverse_kl, reverse_kl_dual_only, esd, "
               "likelihood)",
    "data": "data unlearning on a DDPM (method = forward_kl, siss, siss_is)",
    "sample": "sample from a (possibly unlearned) model",
    "evaluate": "KID/FID, CLIP score, copy similarity of samples",
    "rehearse": "offline end-to-end rehearsal on scikit-learn digits",
}


def _rehearse_sizes() -> list[str]:
    from scale.rehearse import PRESETS

    return [f"{k} ({v['pretrain_steps']} pretraining / {v['unlearn_steps']} unlearning steps)" for k, v in PRESETS.items()]


def build_config(command: str, config_file: str | None, overrides: list[str] | None,
                 out: str | None = None) -> ConceptConfig | DataConfig | SampleConfig | EvaluateConfig | RehearseConfig:
    """The frozen config of a ``scale`` sub-command: its TOML file, then ``--set``, then ``--out``."""
    cls = _config_classes()[command]
    ov = list(overrides or [])
    if out:
        ov.append(f"out={json.dumps(out)}")
    return load_config(cls, config_file, ov)


#: commands whose output directory is a run directory (docs/runs.md): fingerprinted, locked, resumable
RUN_COMMANDS = ("concept", "data")


def main_scale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toy.core.runs import RunDirError, check_run_dir, clear_run_dir

    cfg = build_config(args.scale_command, args.config, args.set, args.out)
    if args.dry_run:
        print(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
        return 0
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} is a file, not a directory")
    if args.scale_command in RUN_COMMANDS:
        if args.resume and args.overwrite:
            raise RunDirError("--resume and --overwrite exclude each other")
        if args.overwrite:
            clear_run_dir(out, keep=(args.config or "", *(getattr(cfg, k, "") for k in ("model", "train_dir",
                                                                                          "forget_list"))))
        else:  # before any model is loaded: an existing run needs --resume and the same config
            check_run_dir(out, config_to_dict(cfg), resume=bool(args.resume))
    run = _runner(args.scale_command)
    kwargs = {"resume": True} if getattr(args, "resume", False) else {}
    result = run(cfg, **kwargs)
    if args.scale_command == "rehearse":
        from pathlib import Path

        print((Path(cfg.out) / "report.md").read_text())
    elif isinstance(result, dict):
        from toy.core.runs import jsonable

        print(json.dumps(jsonable(result), indent=2, sort_keys=True))
    else:
        print(result)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``scale`` with its sub-commands to the ``dualunlearn`` parser."""
    p = subparsers.add_parser("scale", help="scale tier: diffusers models (SD concept, DDPM data unlearning)")
    sub = p.add_subparsers(dest="scale_command", required=True)
    for name, text in HELP.items():
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", help="TOML config file")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key with a TOML literal (nested keys with dots: train.steps=10; "
                            "strings quoted: 'concepts=[\"a cat\"]')")
        q.add_argument("--out", help="output directory (same as --set out=...)")
        q.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        if name == "rehearse":
            q.epilog = "sizes (--set size=...): " + ", ".join(_rehearse_sizes())
        if name in RUN_COMMANDS:
            q.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its last checkpoint (only with an identical config)")
            q.add_argument("--overwrite", action="store_true",
                           help="delete the run in --out and start afresh there")
        q.set_defaults(func=main_scale)
    from scale.preflight import register as register_preflight

    register_preflight(sub)
