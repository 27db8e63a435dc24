"""Scale tier on tiny diffusers models built from config and saved to disk (CPU, seconds each):
loading and bad input, the frozen reference without a second UNet, ESD == RU at a fixed multiplier,
the FU dual domain, SISS weights in log space, exact resume, gradient accumulation, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scale import builders
from toy.core.diffusion import add_noise, strided_kl_weights, strided_timesteps
from scale.diffusion import lu_weight, siss_log_weights
from scale.engine import TrainConfig, load_checkpoint
from scale.models import Trainable, encode_prompts, load_concept_models, load_ddpm_models, resolve_model_location
from toy.core.diffusion import reverse_step_kl_weights

PROMPT3 = "a photo of the digit 3"
T = 50


@pytest.fixture(scope="module")
def concept_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "concept"
    tok = builders.build_word_tokenizer("a photo of the digit 0 1 2 3 4 5 6 7 8 9".split())
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=1)
    unet = builders.build_cond_unet(seed=2)
    # make the prompts matter for the random UNet: scale up the cross-attention output weights
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in n:
                p.mul_(20.0)
    builders.save_concept_pipeline(path, unet, te, tok, builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    return str(path)


@pytest.fixture(scope="module")
def ddpm_setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("ddpm")
    builders.save_ddpm(root / "model", builders.build_uncond_unet(seed=3),
                       builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    return str(root / "model"), str(imgs), root


def _concept_cfg(path, out, **kw):
    from scale.concept import ConceptConfig

    train = TrainConfig(**{**dict(steps=3, batch_size=4, micro_batch=4, lr=1e-2, cpu=True, seed=0),
                           **kw.pop("train", {})})
    base = dict(model=path, out=str(out), method="ru", concepts=(PROMPT3,), budgets=(5.0,), lr_dual=0.01,
                sample_steps=4, dual_only_steps=2)
    return ConceptConfig(**{**base, **kw}, train=train)


def _data_cfg(model, imgs, out, **kw):
    from scale.data import DataConfig

    train = TrainConfig(**{**dict(steps=3, batch_size=4, micro_batch=8, lr=1e-3, cpu=True, seed=0),
                           **kw.pop("train", {})})
    base = dict(model=model, out=str(out), method="fu", train_dir=imgs, forget=("003.png", "007.png"),
                budget_factor=1.5, lr_dual=0.5, forget_draws=2)
    return DataConfig(**{**base, **kw}, train=train)


# ------------------------------------------------------------------ loading and bad input


def _assert_resumed_equals_full(full: dict, resumed: dict, tmp_path) -> tuple[dict, dict]:
    """A resumed run (``tmp_path/cut``) equals the uninterrupted one (``tmp_path/full``) exactly:
    multipliers and every trained weight; returns both checkpoints' states."""
    torch.testing.assert_close(torch.as_tensor(resumed["lam"]), torch.as_tensor(full["lam"]), rtol=0, atol=0)
    wa, sa = load_checkpoint(tmp_path / "full" / "checkpoint")
    wb, sb = load_checkpoint(tmp_path / "cut" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    return sa, sb


def test_loaded_concept_model_reproduces_the_saved_unet(concept_path):
    from diffusers import UNet2DConditionModel

    models = load_concept_models(concept_path)
    assert models.vae is None and models.sample_shape == (1, 8, 8)
    assert models.alphas_cumprod.numel() == T
    ref = UNet2DConditionModel.from_pretrained(concept_path, subfolder="unet")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT3, "a photo of the digit 5"])
    with torch.no_grad():
        torch.testing.assert_close(models.unet(x, t, encoder_hidden_states=emb).sample,
                                   ref(x, t, encoder_hidden_states=emb).sample)


def test_missing_or_non_diffusers_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_location(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_ddpm_models(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a diffusers model"):
        load_concept_models(str(tmp_path / "empty"))


def test_prompt_that_tokenizes_to_nothing_fails_before_training(concept_path, tmp_path):
    from scale.concept import run

    with pytest.raises(ValueError, match="tokenizes to nothing"):
        run(_concept_cfg(concept_path, tmp_path / "r", concepts=("zzz qqq",)))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_bad_data_inputs_fail_before_training(ddpm_setup, tmp_path):
    from PIL import Image

    from scale.data import run

    model, imgs, root = ddpm_setup
    with pytest.raises(ValueError, match="not in the training folder"):
        run(_data_cfg(model, imgs, tmp_path / "a", forget=("999.png",)))
    bad = root / "bad_size"
    bad.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(bad / "000.png")
    with pytest.raises(ValueError, match="model expects"):
        run(_data_cfg(model, str(bad), tmp_path / "b", forget=("000.png",)))
    rgb = root / "bad_channels"
    rgb.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(rgb / "000.png")
    with pytest.raises(ValueError, match="model expects"):
        run(_data_cfg(model, str(rgb), tmp_path / "c", forget=("000.png",)))
    for d in "abc":
        assert not (tmp_path / d / "metrics.jsonl").exists()


# ------------------------------------------------------------------ trainables and the frozen reference


@pytest.mark.parametrize("mode", ["lora", "attn2"])
def test_reference_context_is_the_pretrained_unet_without_a_copy(concept_path, mode):
    models = load_concept_models(concept_path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 30])
    emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT3] * 2)
    with torch.no_grad():
        before = models.unet(x, t, encoder_hidden_states=emb).sample
    n_params = sum(p.numel() for p in models.unet.parameters())
    tr = Trainable(models.unet, mode, rank=2)
    assert tr.names and all(".attn2." in n for n in tr.names)
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        after = models.unet(x, t, encoder_hidden_states=emb).sample
        with tr.reference() as ref:
            again = ref(x, t, encoder_hidden_states=emb).sample
        after2 = models.unet(x, t, encoder_hidden_states=emb).sample
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(again, before)
    torch.testing.assert_close(after2, after)
    kept = sum(v.numel() for v in tr._originals.values())
    assert kept < 0.5 * n_params  # only the cross-attention tensors are kept, never a second UNet


# ------------------------------------------------------------------ formulas


def test_siss_log_weights_match_naive_where_finite_and_stay_finite_at_small_t():
    g = torch.Generator().manual_seed(0)
    x0, a0, eps = (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ab = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.9, 0.95], dtype=torch.float64)
    x_t = add_noise(x0, eps, ab)
    lwx, lwa = siss_log_weights(x_t, x0, a0, ab, mix=0.3)
    s = ab.sqrt().reshape(-1, 1, 1, 1)
    v = (1 - ab).reshape(-1, 1, 1, 1)
    qx = torch.exp(-((x_t - s * x0) ** 2 / (2 * v)).flatten(1).sum(1))
    qa = torch.exp(-((x_t - s * a0) ** 2 / (2 * v)).flatten(1).sum(1))
    torch.testing.assert_close(lwx.exp(), qx / (0.7 * qx + 0.3 * qa))
    torch.testing.assert_close(lwa.exp(), qa / (0.7 * qx + 0.3 * qa))
    # at t = 0 (1 - alpha_bar ~ 1e-4) the naive densities underflow to 0/0; the log form does not
    ab0 = torch.full((6,), 0.9999, dtype=torch.float64)
    x_t0 = add_noise(x0, eps, ab0)
    lwx0, lwa0 = siss_log_weights(x_t0, x0, a0, ab0, mix=0.3)
    assert torch.all(torch.isfinite(lwx0)) and torch.all(torch.isfinite(lwa0))
    torch.testing.assert_close(lwx0.exp(), torch.full((6,), 1 / 0.7, dtype=torch.float64))
    naive = torch.exp(-((x_t0 - ab0.sqrt().reshape(-1, 1, 1, 1) * a0) ** 2
                        / (2 * (1 - ab0).reshape(-1, 1, 1, 1))).flatten(1).sum(1).float())
    assert torch.all(naive == 0)  # what the published code would divide by


def test_lu_weight_is_ratio_or_one_and_never_overflows():
    lr = torch.tensor([-1.0, 0.0, 2.0, 1e4])
    g, c = lu_weight(lr, "likelihood_ratio", clamp=5.0)
    torch.testing.assert_close(g, torch.tensor([math.exp(-1), 1.0, math.exp(2), math.exp(5)], dtype=torch.float64))
    torch.testing.assert_close(c, g)
    g2, c2 = lu_weight(lr, "log_likelihood_ratio", clamp=5.0)
    torch.testing.assert_close(g2, torch.tensor([-1.0, 0.0, 2.0, 1e4], dtype=torch.float64))  # g = log r: never clamped
    assert torch.all(c2 == 1)
    with pytest.raises(ValueError, match="LU constraint"):
        lu_weight(lr, "likelihood")


def test_strided_kl_weights_reduce_to_the_full_chain():
    ab = builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4).alphas_cumprod.double()
    ts = strided_timesteps(T, T)
    torch.testing.assert_close(strided_kl_weights(ab, ts), reverse_step_kl_weights(ab).flip(0))
    ts5 = strided_timesteps(T, 5)
    assert ts5.tolist() == sorted(ts5.tolist(), reverse=True) and ts5[0] == T - 1 and ts5[-1] == 0


# ------------------------------------------------------------------ algorithms on tiny models


def test_esd_is_ru_at_the_fixed_multiplier_lam_eta_over_one_plus_eta(concept_path, tmp_path):
    from safetensors.torch import load_file

    from scale.concept import run

    s_esd = run(_concept_cfg(concept_path, tmp_path / "esd", method="esd", esd_eta=1.5, esd_sampler="ancestral"))
    s_ru = run(_concept_cfg(concept_path, tmp_path / "ru", method="ru", lr_dual=0.0, lam_init=(0.6,)))
    assert float(s_esd["lam"][0]) == pytest.approx(1.5 / 2.5)
    torch.testing.assert_close(torch.as_tensor(s_esd["lam"]), torch.as_tensor(s_ru["lam"]))
    a = load_file(str(tmp_path / "esd" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "ru" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all("lora" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train


RETAIN = ("a photo of the digit 5", "a photo of the digit 7")


def test_esd_with_retain_term_is_ru_at_the_fixed_multiplier_with_retain_term(concept_path, tmp_path):
    from safetensors.torch import load_file

    from scale.concept import run

    kw = dict(retain_prompts=RETAIN, retain_weight=2.0)
    run(_concept_cfg(concept_path, tmp_path / "esd", method="esd", esd_eta=1.5, esd_sampler="ancestral", **kw))
    run(_concept_cfg(concept_path, tmp_path / "ru", method="ru", lr_dual=0.0, lam_init=(0.6,), **kw))
    run(_concept_cfg(concept_path, tmp_path / "plain", method="esd", esd_eta=1.5, esd_sampler="ancestral"))
    a = load_file(str(tmp_path / "esd" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "ru" / "checkpoint" / "trainable.safetensors"))
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

    kw = dict(method="ru_dual_only", budgets=(1e6,), lr_dual=1e-7, dual_only_steps=2, train={"steps": 1})
    a = run(_concept_cfg(concept_path, tmp_path / "a", **kw))
    b = run(_concept_cfg(concept_path, tmp_path / "b", retain_prompts=RETAIN, **kw))
    torch.testing.assert_close(torch.as_tensor(a["lam"]), torch.as_tensor(b["lam"]), rtol=0, atol=0)


def test_retain_prompts_are_validated(concept_path, tmp_path):
    with pytest.raises(ValueError, match="both concepts to unlearn and retain"):
        _concept_cfg(concept_path, tmp_path / "x", retain_prompts=(PROMPT3,))
    with pytest.raises(ValueError, match="retain_weight"):
        _concept_cfg(concept_path, tmp_path / "x", retain_prompts=RETAIN, retain_weight=-1.0)


def test_interrupted_and_resumed_concept_run_with_retain_term_equals_uninterrupted(concept_path, tmp_path):
    from scale.concept import run

    kw = dict(train={"steps": 4, "checkpoint_every": 2}, lr_dual=0.05, budgets=(50.0,), retain_prompts=RETAIN)
    full = run(_concept_cfg(concept_path, tmp_path / "full", **kw))
    run(_concept_cfg(concept_path, tmp_path / "cut", **kw), stop_after=3)
    resumed = run(_concept_cfg(concept_path, tmp_path / "cut", **kw), resume=True)
    _assert_resumed_equals_full(full, resumed, tmp_path)


def test_ru_multiplier_rises_while_the_kl_constraint_is_violated(concept_path, tmp_path):
    from scale.concept import run

    s = run(_concept_cfg(concept_path, tmp_path / "ru", budgets=(1e6,), lr_dual=1e-7))
    rows = [json.loads(x) for x in (tmp_path / "ru" / "metrics.jsonl").read_text().splitlines()]
    lams = [r["lam"][0] for r in rows]
    assert all(v > 0 for r in rows for v in r["violation"])
    assert lams == sorted(lams) and lams[-1] > 0
    # each dual step adds lr_dual * violation (no projection active)
    v0 = rows[0]["violation"][0]
    assert lams[0] == pytest.approx(1e-7 * v0, rel=1e-6)
    summ = json.loads((tmp_path / "ru" / "summary.json").read_text())
    assert summ["problem"] == "reverse_kl" and len(summ["constraint_values"]) == 1


def test_ru_sum_of_multipliers_stays_below_one_with_two_concepts(concept_path, tmp_path):
    from scale.concept import run

    s = run(_concept_cfg(concept_path, tmp_path / "ru2", concepts=(PROMPT3, "a photo of the digit 5"),
                         budgets=(1e6, 1e6), lr_dual=10.0, lam_sum_max=0.9))
    lam = torch.as_tensor(s["lam"])
    assert lam.numel() == 2 and float(lam.sum()) == pytest.approx(0.9, abs=1e-6)


def test_ru_dual_only_moves_only_the_multiplier_then_fits_the_target(concept_path, tmp_path):
    from scale.concept import run

    run(_concept_cfg(concept_path, tmp_path / "do", method="ru_dual_only", budgets=(1e6,), lr_dual=1e-7,
                     dual_only_steps=2, train={"steps": 2}))
    rows = [json.loads(x) for x in (tmp_path / "do" / "metrics.jsonl").read_text().splitlines()]
    assert [r["primal"] for r in rows] == [False, False, True, True]
    assert rows[1]["lam"][0] > rows[0]["lam"][0] > 0
    assert rows[2]["lam"] == rows[1]["lam"] == rows[3]["lam"]  # frozen at lam* while fitting
    assert rows[0]["loss"] is None and rows[2]["loss"] is not None


def test_lu_runs_and_reports_the_likelihood_ratio_constraint(concept_path, tmp_path):
    from scale.concept import run

    s = run(_concept_cfg(concept_path, tmp_path / "lu", method="lu", budgets=(0.5,), lr_dual=0.1,
                         classifier_draws=2, lu_constraint="likelihood_ratio"))
    assert s["problem"] == "likelihood"
    rows = [json.loads(x) for x in (tmp_path / "lu" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # E_p[r] with r = exp(clamped log ratio) is positive
        assert 0 < r["measured"][0] <= math.exp(5.0)
        assert r["violation"][0] == pytest.approx(r["measured"][0] - 0.5, rel=1e-5, abs=1e-6)


def test_fu_multipliers_stay_in_the_dual_domain(ddpm_setup, tmp_path):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    s = run(_data_cfg(model, imgs, tmp_path / "fu", budget_factor=100.0, lr_dual=0.6))
    n = 12
    rows = [json.loads(x) for x in (tmp_path / "fu" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert all(0 <= v <= 1 / n + 1e-15 for v in r["lam"])
    assert np.allclose(s["lam_times_n"], 1.0)  # unreachable budgets: lam at the domain's edge 1/n
    assert s["forget"] == ["003.png", "007.png"]


@pytest.mark.parametrize("method", ["siss", "siss_is"])
def test_siss_baselines_keep_their_fixed_weight(ddpm_setup, tmp_path, method):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    s = run(_data_cfg(model, imgs, tmp_path / method, method=method, siss_form="project", siss_weight=3.0))
    np.testing.assert_allclose(np.asarray(s["lam_times_n"], dtype=float), 3.0)
    assert np.all(np.isfinite(np.asarray(s["forget_loss_after"], dtype=float)))


# ------------------------------------------------------------------ checkpoints, resume, accumulation


def test_interrupted_and_resumed_concept_run_equals_uninterrupted(concept_path, tmp_path):
    from scale.concept import run

    kw = dict(train={"steps": 4, "checkpoint_every": 2}, lr_dual=0.05, budgets=(50.0,))
    full = run(_concept_cfg(concept_path, tmp_path / "full", **kw))
    run(_concept_cfg(concept_path, tmp_path / "cut", **kw), stop_after=3)  # killed after step 3: ckpt at 2
    w_cut, st = load_checkpoint(tmp_path / "cut" / "checkpoint")
    assert st["step"] == 2
    resumed = run(_concept_cfg(concept_path, tmp_path / "cut", **kw), resume=True)
    sa, sb = _assert_resumed_equals_full(full, resumed, tmp_path)
    assert sa["step"] == sb["step"] == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the lost step 2 was dropped and redone, not duplicated
    assert (tmp_path / "cut" / "checkpoint" / "trainable.safetensors").is_file()


def test_interrupted_and_resumed_data_run_equals_uninterrupted(ddpm_setup, tmp_path):
    from scale.data import run

    model, imgs, _ = ddpm_setup
    kw = dict(train={"steps": 4, "checkpoint_every": 1})
    full = run(_data_cfg(model, imgs, tmp_path / "full", **kw))
    run(_data_cfg(model, imgs, tmp_path / "cut", **kw), stop_after=1)
    resumed = run(_data_cfg(model, imgs, tmp_path / "cut", **kw), resume=True)
    torch.testing.assert_close(torch.as_tensor(resumed["lam"]), torch.as_tensor(full["lam"]), rtol=0, atol=0)
    wa, _ = load_checkpoint(tmp_path / "full" / "checkpoint")
    wb, _ = load_checkpoint(tmp_path / "cut" / "checkpoint")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_gradient_accumulation_matches_one_big_micro_batch(ddpm_setup, tmp_path):
    """Three micro-batches accumulated == one micro-batch of the same global batch. SGD keeps the
    update linear in the gradient (Adam's first steps are ~lr*sign(g), which turns float32
    summation-order noise in near-zero gradient entries into O(lr) differences); the bound on the
    updates is float32 summation error (~1e-6 relative) with margin over 3 steps."""
    from diffusers import UNet2DModel

    from scale.data import run

    model, imgs, _ = ddpm_setup
    sgd = {"optimizer": "sgd", "lr": 0.05}
    one = run(_data_cfg(model, imgs, tmp_path / "one", train={"micro_batch": 8, **sgd}))
    acc = run(_data_cfg(model, imgs, tmp_path / "acc", train={"micro_batch": 3, **sgd}))  # 3 micro-batches
    torch.testing.assert_close(torch.as_tensor(acc["lam"]), torch.as_tensor(one["lam"]), rtol=1e-5, atol=1e-9)
    w0 = dict(UNet2DModel.from_pretrained(model).named_parameters())
    wa, _ = load_checkpoint(tmp_path / "one" / "checkpoint")
    wb, _ = load_checkpoint(tmp_path / "acc" / "checkpoint")
    for k in wa:
        upd_a, upd_b = wa[k] - w0[k].detach(), wb[k] - w0[k].detach()
        # float32 summation error of the updates, plus the rounding of w + update to float32
        bound = 1e-4 * upd_a.abs().max() + 4 * torch.finfo(torch.float32).eps * wa[k].abs()
        assert torch.all((upd_a - upd_b).abs() <= bound), k


# ------------------------------------------------------------------ CLI, sampling, evaluation


def test_cli_dry_run_prints_the_resolved_config_and_rejects_unknown_keys(tmp_path, capsys):
    from scale.commands import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "m"\nconcepts = ["a photo of the digit 3"]\nbudgets = [2.0]\n[train]\nsteps = 7\n')
    assert main(["scale", "concept", "--config", str(cfg), "--set", "train.lr=0.5", "--set", 'method="lu"',
                 "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["train"]["steps"] == 7 and got["train"]["lr"] == 0.5 and got["method"] == "lu"
    assert got["concepts"] == ["a photo of the digit 3"]
    assert main(["scale", "data", "--set", "bogus=1", "--dry-run"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["scale", "rehearse", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "r")


def test_cli_data_run_writes_metrics_summary_and_sample_evaluate(ddpm_setup, tmp_path, capsys):
    from scale.commands import main

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


def test_evaluation_never_downloads_missing_weights(tmp_path):
    from scale.evaluate import clip_score, load_feature_extractor

    with pytest.raises(ValueError, match="not available locally"):
        load_feature_extractor("inception:" + str(tmp_path / "pt_inception.pth"))
    with pytest.raises(ValueError, match="cannot be downloaded"):
        clip_score(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ["x"], "openai/clip-vit-base-patch16")


@pytest.mark.parametrize("name,command", [("sd_ru.toml", "concept"), ("celebahq_fu.toml", "data")])
def test_example_configs_resolve(name, command, capsys):
    from pathlib import Path

    from scale.commands import main

    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert main(["scale", command, "--config", str(path), "--dry-run"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["train"]["batch_size"] == 32 if command == "data" else got["train"]["batch_size"] == 8


def test_bf16_mixed_precision_run_keeps_float32_losses_and_float64_multipliers(concept_path, tmp_path):
    from scale.concept import run

    s = run(_concept_cfg(concept_path, tmp_path / "bf16", train={"mixed_precision": "bf16", "steps": 2}))
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["measured"][0]) for r in rows)
    assert s["lam"].dtype == torch.float64
    assert float(torch.as_tensor(s["lam"])[0]) > 0


def test_latent_pipeline_with_vae_loads_unlearns_and_decodes_samples(tmp_path):
    """The SD layout with a VAE: training runs on latents (no decoding), sampling decodes."""
    from diffusers import AutoencoderKL

    from scale.commands import main
    from scale.concept import run

    tok = builders.build_word_tokenizer("a photo of cat dog".split())
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    unet = builders.build_cond_unet(sample_size=8, channels=4, seed=5)
    builders.save_concept_pipeline(tmp_path / "sd", unet, builders.build_text_encoder(len(tok.get_vocab())), tok,
                                   builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4), vae=vae)
    models = load_concept_models(str(tmp_path / "sd"))
    assert models.vae is not None and models.sample_shape == (4, 8, 8)
    s = run(_concept_cfg(str(tmp_path / "sd"), tmp_path / "run", method="esd", concepts=("a photo of a cat",),
                         train={"steps": 1}))
    assert s["method"] == "esd"
    assert main(["scale", "sample", "--out", str(tmp_path / "smp"), "--set", f'model="{tmp_path / "sd"}"',
                 "--set", f'run="{tmp_path / "run"}"', "--set", 'prompts=["a photo of a cat"]',
                 "--set", "num_per_prompt=2", "--set", "num_steps=3", "--set", "guidance=2.0", "--set", "cpu=true"]) == 0
    imgs = np.load(tmp_path / "smp" / "samples.npz")["images"]
    assert imgs.shape == (2, 16, 16, 3)
