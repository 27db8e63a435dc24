"""Config loading (unknown keys rejected, TOML + overrides), run directories (provenance, metrics,
atomic checkpoints) and report rendering."""

from dataclasses import dataclass, field

import pytest
import torch

from theory.config import config_to_dict, load_config
from theory.report import Check, Section, render_markdown, render_table
from toy.core.runs import RunDir


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    steps: int = 10


@dataclass(frozen=True)
class Cfg:
    name: str = "x"
    budgets: tuple[float, ...] = (1.0,)
    optim: Optim = field(default_factory=Optim)


def test_config_from_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "run"\nbudgets = [0.5, 2.0]\n[optim]\nlr = 0.1\n')
    cfg = load_config(Cfg, path, ["optim.steps=3", 'name="other"'])
    assert cfg == Cfg(name="other", budgets=(0.5, 2.0), optim=Optim(lr=0.1, steps=3))
    assert config_to_dict(cfg)["budgets"] == [0.5, 2.0]


def test_config_rejects_unknown_keys_and_bad_overrides(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*'nme'"):
        load_config(Cfg, None, ["nme=1"])
    with pytest.raises(ValueError, match="'rate'.* in optim"):
        load_config(Cfg, None, ["optim.rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(Cfg, None, ["lr"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Cfg, tmp_path / "missing.toml")


def test_run_dir_records_provenance_metrics_and_checkpoints(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1}, seed=3)
    assert (tmp_path / "r" / "run.json").exists()
    run.log_metrics(0, loss=torch.tensor(1.5), lam=[0.1, 0.2])
    run.log_metrics(1, loss=1.0)
    run.log_metrics(2, loss=0.5)
    run.truncate_metrics(1)
    assert [r["step"] for r in run.read_metrics()] == [0, 1]
    with pytest.raises(FloatingPointError, match="step 5"):
        run.log_metrics(5, loss=float("nan"))
    run.save_checkpoint({"step": 4, "w": torch.ones(2)})
    assert run.load_checkpoint()["step"] == 4
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_report_renders_verdict_and_failures():
    s = Section("t", (Check("a", "1", "1", True), Check("b", "2", "< 1", False)), figures=("f.png",))
    md = render_markdown([s])
    assert "**FAIL**: 1/2" in md and "![f.png](f.png)" in md and "**NO**" in md
    assert "FAIL" in render_table([s])
