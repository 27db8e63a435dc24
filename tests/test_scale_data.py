"""Data unlearning (``scale.data``) on a tiny DDPM: bad inputs, the FU dual domain, SISS at its fixed
weight, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scale.engine import load_checkpoint
from tests.scale_fixtures import data_cfg, ddpm_setup


def test_bad_data_inputs_fail_before_training(ddpm_setup, tmp_path):
    from PIL import Image

    from scale.data import run

    model, imgs, root = ddpm_setup
    with pytest.raises(ValueError, match="not in the training folder"):
        run(data_cfg(model, imgs, tmp_path / "a", forget=("999.png",)))
    bad = root / "bad_size"
    bad.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(bad / "000.png")
    with pytest.raises(ValueError, match="model expects"):
        run(data_cfg(model, str(bad), tmp_path / "b", forget=("000.png",)))
    rgb = root / "bad_channels"
    rgb.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(rgb / "000.png")
    with pytest.raises(ValueError, match="model expects"):
        run(data_cfg(model, str(rgb), tmp_path / "c", forget=("000.png",)))
    for d in "abc":
        assert not (tmp_path / d / "metrics.jsonl").exists()


def test_forward_kl_multipliers_stay_in_the_dual_domain(ddpm_setup, tmp_path):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    s = run(data_cfg(model, imgs, tmp_path / "forward_kl", budget_factor=100.0, lr_dual=0.6))
    n = 12
    rows = [json.loads(x) for x in (tmp_path / "forward_kl" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert all(0 <= v <= 1 / n + 1e-15 for v in r["lam"])
    assert np.allclose(s["lam_times_n"], 1.0)  # unreachable budgets: lam at the domain's edge 1/n
    assert s["forget"] == ["003.png", "007.png"]


@pytest.mark.parametrize("method", ["siss", "siss_is"])
def test_siss_baselines_keep_their_fixed_weight(ddpm_setup, tmp_path, method):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    s = run(data_cfg(model, imgs, tmp_path / method, method=method, siss_form="project", siss_weight=3.0))
    np.testing.assert_allclose(np.asarray(s["lam_times_n"], dtype=float), 3.0)
    assert np.all(np.isfinite(np.asarray(s["forget_loss_after"], dtype=float)))


def test_interrupted_and_resumed_data_run_equals_uninterrupted(ddpm_setup, tmp_path):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    kw = dict(train={"steps": 4, "checkpoint_every": 1})
    full = run(data_cfg(model, imgs, tmp_path / "full", **kw))
    run(data_cfg(model, imgs, tmp_path / "cut", **kw), stop_after=1)
    resumed = run(data_cfg(model, imgs, tmp_path / "cut", **kw), resume=True)
    torch.testing.assert_close(torch.as_tensor(resumed["lam"]), torch.as_tensor(full["lam"]), rtol=0, atol=0)
    wa, _ = load_checkpoint(tmp_path / "full" / "checkpoint")
    wb, _ = load_checkpoint(tmp_path / "cut" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
