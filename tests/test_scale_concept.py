"""Concept unlearning (``scale.concept``) on a tiny conditional pipeline: ESD as RU at a fixed multiplier,
retain prompts, the RU/LU multipliers, dual-only, exact resume, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scale.engine import load_checkpoint
from tests.scale_fixtures import PROMPT3, RETAIN, assert_resumed_equals_full, concept_cfg, concept_path


def test_esd_is_reverse_kl_at_the_fixed_multiplier_lam_eta_over_one_plus_eta(concept_path, tmp_path):
    from safetensors.torch import load_file

    from scale.concept import run

    s_esd = run(concept_cfg(concept_path, tmp_path / "esd", method="esd", esd_eta=1.5, esd_sampler="ancestral"))
    s_ru = run(concept_cfg(concept_path, tmp_path / "reverse_kl", method="reverse_kl", lr_dual=0.0, lam_init=(0.6,)))
    assert float(s_esd["lam"][0]) == pytest.approx(1.5 / 2.5)
    torch.testing.assert_close(torch.as_tensor(s_esd["lam"]), torch.as_tensor(s_ru["lam"]))
    a = load_file(str(tmp_path / "esd" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "reverse_kl" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all("lora" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train


def test_esd_with_retain_term_is_reverse_kl_at_the_fixed_multiplier_with_retain_term(concept_path, tmp_path):
    from safetensors.torch import load_file

    from scale.concept import run

    kw = dict(retain_prompts=RETAIN, retain_weight=2.0)
    run(concept_cfg(concept_path, tmp_path / "esd", method="esd", esd_eta=1.5, esd_sampler="ancestral", **kw))
    run(concept_cfg(concept_path, tmp_path / "reverse_kl", method="reverse_kl", lr_dual=0.0, lam_init=(0.6,), **kw))
    run(concept_cfg(concept_path, tmp_path / "plain", method="esd", esd_eta=1.5, esd_sampler="ancestral"))
    a = load_file(str(tmp_path / "esd" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "reverse_kl" / "checkpoint" / "trainable.safetensors"))
    c = load_file(str(tmp_path / "plain" / "checkpoint" / "trainable.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the retain term changed the training
    rows = [json.loads(x) for x in (tmp_path / "esd" / "metrics.jsonl").read_text().splitlines()]
    # LoRA B starts at 0: at step 0 the model *is* the reference, the retain term is exactly 0
    assert rows[0]["retain_kl"] == 0.0 and rows[0]["retain_loss"] == 0.0
    assert rows[-1]["retain_kl"] > 0 and all(math.isfinite(r["retain_kl"]) for r in rows)
    summ = json.loads((tmp_path / "esd" / "summary.json").read_text())
    assert summ["retain_prompts"] == list(RETAIN) and summ["retain_weight"] == 2.0


def test_retain_term_does_not_change_the_dual_estimates_or_multipliers(concept_path, tmp_path):
    from scale.concept import run

    kw = dict(method="reverse_kl_dual_only", budgets=(1e6,), lr_dual=1e-7, dual_only_steps=2, train={"steps": 1})
    a = run(concept_cfg(concept_path, tmp_path / "a", **kw))
    b = run(concept_cfg(concept_path, tmp_path / "b", retain_prompts=RETAIN, **kw))
    torch.testing.assert_close(torch.as_tensor(a["lam"]), torch.as_tensor(b["lam"]), rtol=0, atol=0)


def test_retain_prompts_are_validated(concept_path, tmp_path):
    with pytest.raises(ValueError, match="both concepts to unlearn and retain"):
        concept_cfg(concept_path, tmp_path / "x", retain_prompts=(PROMPT3,))
    with pytest.raises(ValueError, match="retain_weight"):
        concept_cfg(concept_path, tmp_path / "x", retain_prompts=RETAIN, retain_weight=-1.0)


def test_interrupted_and_resumed_concept_run_with_retain_term_equals_uninterrupted(concept_path, tmp_path):
    from scale.concept import run

    kw = dict(train={"steps": 4, "checkpoint_every": 2}, lr_dual=0.05, budgets=(50.0,), retain_prompts=RETAIN)
    full = run(concept_cfg(concept_path, tmp_path / "full", **kw))
    run(concept_cfg(concept_path, tmp_path / "cut", **kw), stop_after=3)
    resumed = run(concept_cfg(concept_path, tmp_path / "cut", **kw), resume=True)
    assert_resumed_equals_full(full, resumed, tmp_path)


def test_reverse_kl_multiplier_rises_while_the_kl_constraint_is_violated(concept_path, tmp_path):
    from scale.concept import run

    run(concept_cfg(concept_path, tmp_path / "reverse_kl", budgets=(1e6,), lr_dual=1e-7))
    rows = [json.loads(x) for x in (tmp_path / "reverse_kl" / "metrics.jsonl").read_text().splitlines()]
    lams = [r["lam"][0] for r in rows]
    assert all(v > 0 for r in rows for v in r["violation"])
    assert lams == sorted(lams) and lams[-1] > 0
    # each dual step adds lr_dual * violation (no projection active)
    v0 = rows[0]["violation"][0]
    assert lams[0] == pytest.approx(1e-7 * v0, rel=1e-6)
    summ = json.loads((tmp_path / "reverse_kl" / "summary.json").read_text())
    assert summ["problem"] == "reverse_kl" and len(summ["constraint_values"]) == 1


def test_reverse_kl_sum_of_multipliers_stays_below_one_with_two_concepts(concept_path, tmp_path):
    from scale.concept import run

    s = run(concept_cfg(concept_path, tmp_path / "reverse_kl2", concepts=(PROMPT3, "a photo of the digit 5"),
                         budgets=(1e6, 1e6), lr_dual=10.0, lam_sum_max=0.9))
    lam = torch.as_tensor(s["lam"])
    assert lam.numel() == 2 and float(lam.sum()) == pytest.approx(0.9, abs=1e-6)


def test_reverse_kl_dual_only_moves_only_the_multiplier_then_fits_the_target(concept_path, tmp_path):
    from scale.concept import run

    run(concept_cfg(concept_path, tmp_path / "do", method="reverse_kl_dual_only", budgets=(1e6,), lr_dual=1e-7,
                     dual_only_steps=2, train={"steps": 2}))
    rows = [json.loads(x) for x in (tmp_path / "do" / "metrics.jsonl").read_text().splitlines()]
    assert [r["primal"] for r in rows] == [False, False, True, True]
    assert rows[1]["lam"][0] > rows[0]["lam"][0] > 0
    assert rows[2]["lam"] == rows[1]["lam"] == rows[3]["lam"]  # frozen at lam* while fitting
    assert rows[0]["loss"] is None and rows[2]["loss"] is not None


def test_likelihood_runs_and_reports_the_likelihood_ratio_constraint(concept_path, tmp_path):
    from scale.concept import run

    s = run(concept_cfg(concept_path, tmp_path / "likelihood", method="likelihood", budgets=(0.5,), lr_dual=0.1,
                         classifier_draws=2, likelihood_constraint="likelihood_ratio"))
    assert s["problem"] == "likelihood"
    rows = [json.loads(x) for x in (tmp_path / "likelihood" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # E_p[r] with r = exp(clamped log ratio) is positive
        assert 0 < r["measured"][0] <= math.exp(5.0)
        assert r["violation"][0] == pytest.approx(r["measured"][0] - 0.5, rel=1e-5, abs=1e-6)


def test_interrupted_and_resumed_concept_run_equals_uninterrupted(concept_path, tmp_path):
    from scale.concept import run

    kw = dict(train={"steps": 4, "checkpoint_every": 2}, lr_dual=0.05, budgets=(50.0,))
    full = run(concept_cfg(concept_path, tmp_path / "full", **kw))
    run(concept_cfg(concept_path, tmp_path / "cut", **kw), stop_after=3)  # killed after step 3: ckpt at 2
    w_cut, st = load_checkpoint(tmp_path / "cut" / "checkpoint")
    assert st["step"] == 2
    resumed = run(concept_cfg(concept_path, tmp_path / "cut", **kw), resume=True)
    sa, sb = assert_resumed_equals_full(full, resumed, tmp_path)
    assert sa["step"] == sb["step"] == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the lost step 2 was dropped and redone, not duplicated
    assert (tmp_path / "cut" / "checkpoint" / "trainable.safetensors").is_file()


def test_bf16_mixed_precision_run_keeps_float32_losses_and_float64_multipliers(concept_path, tmp_path):
    from scale.concept import run

    s = run(concept_cfg(concept_path, tmp_path / "bf16", train={"mixed_precision": "bf16", "steps": 2}))
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["measured"][0]) for r in rows)
    assert s["lam"].dtype == torch.float64
    assert float(torch.as_tensor(s["lam"])[0]) > 0
