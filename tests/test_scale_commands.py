"""The scale command line (``scale.commands``): dry runs, a data run with sampling and evaluation,
the shipped example configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.scale_fixtures import ddpm_setup


def test_cli_dry_run_prints_the_resolved_config_and_rejects_unknown_keys(tmp_path, capsys):
    from dualunlearn.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "m"\nconcepts = ["a photo of the digit 3"]\nbudgets = [2.0]\n[train]\nsteps = 7\n')
    assert main(["scale", "concept", "--config", str(cfg), "--set", "train.lr=0.5", "--set", 'method="likelihood"',
                 "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["train"]["steps"] == 7 and got["train"]["lr"] == 0.5 and got["method"] == "likelihood"
    assert got["concepts"] == ["a photo of the digit 3"]
    assert main(["scale", "data", "--set", "bogus=1", "--dry-run"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["scale", "rehearse", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "r")


def test_cli_data_run_writes_metrics_summary_and_sample_evaluate(ddpm_setup, tmp_path, capsys):
    from dualunlearn.cli import main

    model, imgs, _ = ddpm_setup
    out = tmp_path / "run"
    assert main(["scale", "data", "--out", str(out), "--set", f'model="{model}"', "--set", f'train_dir="{imgs}"',
                 "--set", 'forget=["003.png"]', "--set", "budget_factor=1.2", "--set", "train.steps=2",
                 "--set", "train.cpu=true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"lam", "budgets", "constraint_values", "forget_loss_before"} <= set(summary)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "run.json").read_text())["config"]["train"]["steps"] == 2
    capsys.readouterr()
    sdir = tmp_path / "samples"
    assert main(["scale", "sample", "--out", str(sdir), "--set", f'model="{model}"', "--set", 'kind="ddpm"',
                 "--set", f'run="{out}"', "--set", "num_per_prompt=6", "--set", "num_steps=5",
                 "--set", "cpu=true"]) == 0
    data = np.load(sdir / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    # evaluation: a local TorchScript feature network stands in for Inception / SSCD
    net = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()))
    net.save(str(tmp_path / "feat.pt"))
    assert main(["scale", "evaluate", "--out", str(tmp_path / "ev"), "--set", f'samples="{sdir / "samples.npz"}"',
                 "--set", f'real_dir="{imgs}"', "--set", f'forget_dir="{imgs}"',
                 "--set", f'feature="torchscript:{tmp_path / "feat.pt"}"', "--set", "kid_subset_size=5"]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert math.isfinite(res["kid_mean"]) and len(res["copy"]["nn_l2"]) == 12 and len(res["copy"]["nn_cosine"]) == 12
    # classifier rate of the unlearned concept: a classifier thresholding mean brightness
    clf = torch.jit.script(_Brightness())
    clf.save(str(tmp_path / "clf.pt"))
    assert main(["scale", "evaluate", "--out", str(tmp_path / "ev2"), "--set", f'samples="{sdir / "samples.npz"}"',
                 "--set", f'classifier="torchscript:{tmp_path / "clf.pt"}"', "--set", "concept_label=1"]) == 0
    fake = torch.from_numpy(data["images"]).float() / 127.5 - 1.0
    expected = float((fake.flatten(1).mean(1) > 0).float().mean())
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["concept_rate"] == pytest.approx(expected)


class _Brightness(torch.nn.Module):
    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([-m, m], 1)


@pytest.mark.parametrize("name,command", [("sd_reverse_kl.toml", "concept"), ("celebahq_forward_kl.toml", "data")])
def test_example_configs_resolve(name, command, capsys):
    from pathlib import Path

    from dualunlearn.cli import main

    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert main(["scale", command, "--config", str(path), "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["train"]["batch_size"] == 32 if command == "data" else got["train"]["batch_size"] == 8


# ------------------------------------------------------------------ method names (scale.names)

CONCEPT_TOML = 'model = "m"\nconcepts = ["a photo of the digit 3"]\nbudgets = [2.0]\n'
DATA_TOML = 'model = "m"\ntrain_dir = "d"\nforget = ["a.png"]\nbudget_factor = 1.5\n'


@pytest.mark.parametrize("command,alias,canonical", [
    ("concept", "ru", "reverse_kl"), ("concept", "ru_dual_only", "reverse_kl_dual_only"),
    ("concept", "lu", "likelihood"), ("data", "fu", "forward_kl")])
def test_short_method_names_are_accepted_on_input_and_written_long(command, alias, canonical, tmp_path, capsys):
    """The paper's short forms are aliases on input (the command line, a config file); what the config
    holds, prints and writes into run.json is the long name."""
    from dualunlearn.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text((CONCEPT_TOML if command == "concept" else DATA_TOML) + f'method = "{alias}"\n')
    assert main(["scale", command, "--config", str(cfg), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == canonical
    assert main(["scale", command, "--config", str(cfg), "--set", f'method="{alias}"', "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == canonical


def test_rehearsal_methods_accept_the_short_names_and_keep_their_order():
    from scale.rehearse import RehearseConfig

    cfg = RehearseConfig(methods=("fu", "esd", "ru", "siss", "lu", "ru_dual_only"))
    assert cfg.methods == ("forward_kl", "esd", "reverse_kl", "siss", "likelihood", "reverse_kl_dual_only")


@pytest.mark.parametrize("command,choices", [
    ("concept", "reverse_kl, reverse_kl_dual_only, esd, likelihood (short forms: ru = reverse_kl, "
                "ru_dual_only = reverse_kl_dual_only, lu = likelihood)"),
    ("data", "forward_kl, siss, siss_is (short forms: fu = forward_kl)")])
def test_an_unknown_method_fails_listing_the_choices_and_aliases(command, choices, tmp_path, capsys):
    from dualunlearn.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(CONCEPT_TOML if command == "concept" else DATA_TOML)
    # a short form of the other kind is not a choice here either
    for bad in ("retrain", "fu" if command == "concept" else "ru"):
        assert main(["scale", command, "--config", str(cfg), "--set", f'method="{bad}"', "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"method must be one of {choices}, got '{bad}'" in err, err


def test_an_unknown_rehearsal_method_fails_listing_every_choice():
    from scale.rehearse import RehearseConfig

    with pytest.raises(ValueError, match=r"each rehearsal method must be one of reverse_kl, reverse_kl_dual_only, "
                                         r"esd, likelihood, forward_kl, siss, siss_is \(short forms: ru = reverse_kl, "
                                         r"ru_dual_only = reverse_kl_dual_only, lu = likelihood, fu = forward_kl\), "
                                         r"got 'retrain'"):
        RehearseConfig(methods=("ru", "retrain"))
