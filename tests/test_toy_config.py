"""The toy config (``toy.config``): sections, ``override``, and ``resolve`` — every derived default
filled in one place, idempotently, with the values the run uses (checked here against independent
derivations), and the resolved config in ``run.json``; the CLI's flags and ``--set`` section keys."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import theory.gmm as gmm
from theory.config import config_to_dict
from toy.config import DERIVED, DUAL_GAIN, ToyConfig, override, resolve
from toy.problems import default_instance

#: every (problem, algorithm) the toy trains
KINDS = [("reverse_kl", "primal_dual"), ("reverse_kl", "dual_only"), ("reverse_kl", "esd"),
         ("forward_kl", "primal_dual"), ("forward_kl", "siss"), ("likelihood", "primal_dual")]


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _nones(cfg, prefix: str = "") -> list[str]:
    """Dotted keys of every field of ``cfg`` (sections included) that is ``None``."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += _nones(v, prefix + f.name + ".")
        elif v is None:
            out.append(prefix + f.name)
    return out


def test_default_config_writes_every_derived_field_as_none_and_nothing_else():
    assert sorted(_nones(ToyConfig())) == sorted([*DERIVED, "pretrained"])  # pretrained: an optional input


@pytest.mark.parametrize("problem, algorithm", KINDS)
def test_resolve_fills_every_derived_field_and_is_idempotent(problem, algorithm):
    cfg = resolve(ToyConfig(problem=problem, algorithm=algorithm))
    assert _nones(cfg) == ["pretrained"], _nones(cfg)
    assert resolve(cfg) == cfg
    # a config that spells out every resolved value is its own resolution (and so the same run)
    spelled = override(ToyConfig(problem=problem, algorithm=algorithm), {k: _get(cfg, k) for k in DERIVED})
    assert resolve(spelled) == cfg


def _theory_slope(problem: str, lam: float, variant: str = "likelihood") -> float:
    """d b / d lam along theory's dual path (``theory.gmm.sweep``), a central difference."""
    inst = default_instance()
    h = 1e-3 * max(lam, 1e-2)
    b, _ = gmm.sweep(problem, inst.q, list(inst.forget), [lam - h, lam + h], variant=variant)
    return float((b[1] - b[0]) / (2 * h))


@pytest.mark.parametrize("problem", ["reverse_kl", "forward_kl", "likelihood"])
def test_resolved_values_are_those_derived_independently(problem):
    inst = default_instance()
    cfg = resolve(ToyConfig(problem=problem))
    budgets = [float(b) for b in inst.budgets[problem]]
    assert cfg.budgets == tuple(budgets)
    T = cfg.diffusion.num_timesteps
    lu, ru = problem == "likelihood", problem == "reverse_kl"
    assert cfg.train.target == ("reweighted" if lu else "composed")
    assert cfg.train.estimate == "pool"
    assert cfg.train.pool_chains == (2 * T if lu else cfg.train.pool_every * T)
    assert cfg.train.pool_frac == (0.5 if ru else 0.0)  # only RU's composed target draws own samples
    assert cfg.dual.violation_scale == ("log" if lu else "linear")
    assert cfg.dual.lam_init == (0.0,)
    # the gain: the problem's, LU's lowered for the pool's delay D (docs/toy.md: 16.4 dual steps)
    delay = (T * 4 / 2 + (128 / 2) * 4 / 2) / 20
    assert cfg.dual.gain == pytest.approx((np.pi / 6) / delay if lu else DUAL_GAIN[problem], rel=1e-12)
    # the step size: gain / |d C / d lam| at lam* (LU: of log C, slope / budget), the slope from theory
    lam_star = float(np.asarray(gmm.solve(problem, inst.q, list(inst.forget), np.array(budgets)).lam)[0])
    slope = abs(_theory_slope(problem, lam_star)) / (budgets[0] if lu else 1.0)
    assert cfg.dual.lr == pytest.approx(cfg.dual.gain / slope, rel=1e-3)
    # SISS's weight: half the FU dual domain inf_x q/q_1. The forget law is q's third component
    # (weight 0.30) and decays slowest, so the infimum is that weight, approached in its tails.
    q, f = inst.q, inst.forget[0]
    assert np.allclose(q.means[2], f.means[0]) and q.weights[2] == pytest.approx(0.30)
    assert cfg.siss_lam == pytest.approx(0.5 * 0.30, rel=1e-8)
    xs = np.stack(np.meshgrid(np.linspace(-30, 30, 601), np.linspace(-30, 30, 601)), -1).reshape(-1, 2)
    ratio = np.exp(q.log_prob(xs) - f.log_prob(xs))
    assert ratio.min() == pytest.approx(0.30, rel=1e-9)


def test_resolve_keeps_explicit_values_and_derives_from_them():
    cfg = override(ToyConfig(problem="likelihood"), {"budgets": [0.01], "train.estimate": "fresh", "dual.gain": 0.1,
                                                     "dual.violation_scale": "linear", "train.pool_chains": 300})
    r = resolve(cfg)
    assert r.budgets == (0.01,) and r.train.estimate == "fresh" and r.dual.violation_scale == "linear"
    assert r.dual.gain == 0.1 and r.train.pool_chains == 300
    assert r.dual.lr == pytest.approx(0.1 / abs(_theory_slope("likelihood", float(
        np.asarray(gmm.solve("likelihood", default_instance().q, list(default_instance().forget),
                             np.array([0.01])).lam)[0]))), rel=1e-3)
    lr = resolve(override(cfg, {"dual.lr": 0.5}))
    assert lr.dual.lr == 0.5 and lr.dual.gain == 0.1
    siss = resolve(ToyConfig(problem="forward_kl", algorithm="siss", siss_lam=0.2))
    assert siss.siss_lam == 0.2


@pytest.mark.parametrize("values, message", [
    ({"train.pool_chains": 0}, "train.pool_chains must be a positive multiple"),
    ({"train.pool_chains": 150}, "train.pool_chains must be a positive multiple"),
    ({"dual.lr": -1.0}, "dual.lr must be >= 0"),
    ({"siss_lam": -0.5}, "siss_lam must be >= 0"),
    ({"dual.violation_scale": "log"}, "dual.violation_scale='log' needs a positive constraint"),
    ({"budgets": (1.0, 2.0)}, "1 forget distribution"),
])
def test_resolve_refuses_bad_values_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        resolve(override(ToyConfig(), values))


def test_override_names_an_unknown_key_and_its_section():
    with pytest.raises(ValueError, match=r"unknown config key 'train.stepz' in train"):
        override(ToyConfig(), {"train.stepz": 3})
    with pytest.raises(ValueError, match=r"unknown config key 'trian.steps' in ToyConfig"):
        override(ToyConfig(), {"trian.steps": 3})
    with pytest.raises(ValueError, match=r"seed is not a section"):
        override(ToyConfig(), {"seed.x": 3})
    assert override(ToyConfig(), {"budgets": [0.5]}).budgets == (0.5,)


def _parse(*argv):
    from dualunlearn.cli import build_parser
    return build_parser().parse_args(["toy", *argv])


def test_cli_flags_map_to_their_fields_and_set_wins_over_flags(tmp_path):
    from toy.cli import config_from_args
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 7\n[train]\nsteps = 99\nlr = 0.01\n[dual]\nlr = 0.2\n')
    cfg = config_from_args(_parse("--problem", "forward_kl", "--algorithm", "siss", "--budget", "2.0", "--seed", "3",
                                  "--out", "o", "--threads", "2", "--config", str(toml),
                                  "--set", "train.steps=50", "--set", "budgets=[3.0]"))
    assert (cfg.problem, cfg.algorithm, cfg.out, cfg.threads) == ("forward_kl", "siss", "o", 2)
    assert cfg.seed == 3  # the flag over the file
    assert cfg.train.steps == 50 and cfg.train.lr == 0.01 and cfg.dual.lr == 0.2  # --set over the file
    assert cfg.budgets == (3.0,)  # --set over the flag
    assert config_from_args(_parse("--problem", "likelihood", "--budget", "inf", "--out", "o")).budgets == (float("inf"),)


@pytest.mark.parametrize("override_, must", [
    ("train.stepz=3", "unknown config key(s) ['stepz'] in train"),
    ("trian.steps=3", "unknown config key(s) ['trian']"),
    ("steps=3", "unknown config key(s) ['steps']"),  # a flat key of the old config: now train.steps
    ("dual.lr=\"x\"", "dual.lr must be a number (or unset)"),
    ("train=3", "train is a table of keys"),
])
def test_a_bad_set_key_is_one_line_naming_it(tmp_path, capsys, override_, must):
    from dualunlearn.cli import main
    out = tmp_path / "bad"
    assert main(["toy", "--problem", "forward_kl", "--no-progress", "--out", str(out), "--set", override_]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and must in err[0], err
    assert not (out / "run.json").exists()


def test_run_json_records_the_resolved_config(tmp_path):
    """A tiny run: ``run.json`` holds the resolved config (no derived field left unset); the same
    config with the derived values written out is the same run (it resumes there)."""
    from toy.core.runs import check_run_dir
    from toy.run import run
    small = {"model.hidden": 8, "model.layers": 1, "model.time_dim": 4, "pretrain.steps": 20, "pretrain.batch": 32,
             "train.steps": 6, "train.batch": 32, "train.forget_batch": 16, "train.checkpoint_every": 3,
             "evaluation.n_eval": 50, "evaluation.n_constraint": 50, "evaluation.n_reference": 50, "figure": False}
    cfg = override(ToyConfig(problem="forward_kl", out=str(tmp_path / "r")), small)
    s = run(cfg)
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert recorded == json.loads(json.dumps(config_to_dict(resolve(cfg))))
    assert recorded["dual"]["lr"] == s["lr_dual"] and recorded["budgets"] == list(s["budgets"])
    assert recorded["train"]["pool_chains"] == s["pool_chains"] and recorded["dual"]["violation_scale"] == "linear"
    spelled = override(cfg, {k: _get(resolve(cfg), k) for k in DERIVED})
    assert check_run_dir(tmp_path / "r", config_to_dict(resolve(spelled))) == "resume"
