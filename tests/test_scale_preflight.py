"""``dualunlearn scale preflight`` / ``calibrate``, the run pictures, trackers and the offline error, on
tiny diffusers models built from config (CPU, seconds each); the same pre-flight on real-size
random-initialised SD v1.x and CelebA-HQ DDPM folders is marked ``realsize``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scale import builders
from dualunlearn.cli import main as cli_main

T = 50
PROMPT3 = "a photo of the digit 3"
PROMPT1 = "a photo of the digit 1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("preflight")
    tok = builders.build_word_tokenizer("a photo of the digit 0 1 2 3 4 5 6 7 8 9".split())
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=1)
    unet = builders.build_cond_unet(seed=2)
    with torch.no_grad():  # make the prompts matter for the random UNet
        for n, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in n:
                p.mul_(20.0)
    builders.save_concept_pipeline(root / "concept", unet, te, tok,
                                   builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4))
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(12)]
    for i, px in enumerate(pixels):
        Image.fromarray(px).save(root / "imgs" / f"{i:03d}.png")
    ddpm_sch = builders.build_scheduler(T, beta_start=2e-3, beta_end=0.4)
    builders.save_ddpm(root / "ddpm", _fit_ddpm(builders.build_uncond_unet(seed=3), pixels, ddpm_sch), ddpm_sch)
    return root


def _fit_ddpm(unet, pixels, scheduler, steps: int = 60):
    """A few denoising steps on the training images: a random UNet's loss is about the zero predictor's
    1 (a coin flip above or below it on 8 draws), a fitted one's well below it (about 0.15), as for a
    pretrained model, so FU's achievable range has its top at 1."""
    from toy.core.diffusion import add_noise
    from toy.core.objectives import denoising_loss

    x = torch.from_numpy(np.stack(pixels).astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    ab = scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        t = torch.randint(0, T, (48,), generator=g)
        noise = torch.randn((48, *x.shape[1:]), generator=g)
        loss = denoising_loss(unet(add_noise(x[torch.arange(48) % len(x)], noise, ab[t]), t).sample, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def concept_toml(root: Path, budget: str = "[5.0]", method: str = "reverse_kl", extra: str = "") -> str:
    return _write(root / f"c_{method}_{abs(hash(budget + extra))}.toml", f"""
model = "{root / 'concept'}"
method = "{method}"
concepts = ["{PROMPT3}"]
retain_prompts = ["{PROMPT1}"]
budgets = {budget}
lr_dual = 0.01
sample_steps = 4
{extra}
[train]
steps = 100
batch_size = 4
micro_batch = 4
cpu = true
""")


def data_toml(root: Path, budget: str = "budgets = [0.999]", extra: str = "") -> str:
    return _write(root / f"d_{abs(hash(budget + extra))}.toml", f"""
model = "{root / 'ddpm'}"
method = "forward_kl"
train_dir = "{root / 'imgs'}"
forget = ["003.png", "007.png"]
{budget}
lr_dual = 0.5
{extra}
[train]
steps = 100
batch_size = 4
micro_batch = 4
cpu = true
""")


def _preflight(capsys, config: str, out: Path, *extra: str) -> tuple[int, str, dict]:
    rc = cli_main(["scale", "preflight", "--config", config, "--out", str(out), "--steps", "3", *extra])
    text = capsys.readouterr().out
    return rc, text, json.loads((out / "preflight.json").read_text())


# ------------------------------------------------------------------ pure functions


def test_projection_arithmetic_matches_hand_computation():
    from scale.preflight import project_run

    # measured: 2.0 s/step for 60 image-evaluations of 8x8 pixels; full: 480 evaluations of 16x16 on 4
    # processes -> 2.0 * (480 / 4 * 256) / (60 * 64) = 2.0 * 30720 / 3840 = 16 s/step; 1000 steps = 16000 s.
    # memory: base 500, fixed 3000, peak 3700 -> activations 200 MiB at micro-batch 2 x 64 px;
    # full micro-batch 1 x 256 px -> 200 * 256 / 128 = 400 -> 500 + 3000 + 400 = 3900 MiB.
    p = project_run(step_seconds=2.0, evals_measured=60, evals_full=480, pixels_measured=64, pixels_full=256,
                    processes=4, steps_full=1000, mem_base_mib=500, mem_fixed_mib=3000, mem_peak_mib=3700,
                    micro_measured=2, micro_full=1)
    assert p.step_seconds == pytest.approx(16.0, rel=1e-12)
    assert p.wall_seconds == pytest.approx(16000.0, rel=1e-12)
    assert p.memory_mib == pytest.approx(3900.0, rel=1e-12)
    assert "proportional" in p.assumption
    # a peak below base + fixed means no measurable activations: memory = base + fixed
    q = project_run(step_seconds=1.0, evals_measured=1, evals_full=1, pixels_measured=1, pixels_full=1, processes=1,
                    steps_full=1, mem_base_mib=10, mem_fixed_mib=20, mem_peak_mib=25, micro_measured=1, micro_full=8)
    assert q.memory_mib == 30
    with pytest.raises(ValueError, match="processes=0"):
        project_run(step_seconds=1.0, evals_measured=1, evals_full=1, pixels_measured=1, pixels_full=1, processes=0,
                    steps_full=1, mem_base_mib=0, mem_fixed_mib=0, mem_peak_mib=0, micro_measured=1, micro_full=1)


def test_unet_evaluations_per_step_count_every_forward():
    from scale.concept import ConceptConfig
    from scale.data import DataConfig
    from scale.engine import TrainConfig
    from scale.preflight import unet_evals_per_step

    tr = TrainConfig(batch_size=8)
    # RU, 2 concepts, S = 10, no retain: per image 9 chain + 3 reference + 3 train = 15 -> 120
    ru = ConceptConfig(model="m", concepts=("a", "b"), budgets=(1.0,), sample_steps=10, train=tr)
    assert unet_evals_per_step("concept", ru) == 8 * 15
    # + retain: another 9 + 1 + 3 = 13 per image -> 28 * 8 = 224; LU with 4 classifier draws: + 4 * 3 = 12
    assert unet_evals_per_step("concept", ConceptConfig(**{**ru.__dict__, "retain_prompts": ("c",)})) == 8 * 28
    assert unet_evals_per_step("concept", ConceptConfig(**{**ru.__dict__, "method": "likelihood", "classifier_draws": 4})) == 8 * 27
    # FU: (8 training images + 3 forget x 2 draws) x 3 = 42; SISS-IS: 8 x 3 = 24
    fu = DataConfig(model="m", train_dir="d", forget=("x",), budget_factor=1.5, forget_draws=2, train=tr)
    assert unet_evals_per_step("data", fu, m_forget=3) == 42
    assert unet_evals_per_step("data", DataConfig(**{**fu.__dict__, "method": "siss_is"}), m_forget=3) == 24


def test_grouped_standard_error_is_the_sd_of_group_means_over_root_g():
    from scale.preflight import grouped_mean_se

    x = torch.tensor([[1.0, 3.0, 2.0, 6.0, 4.0, 8.0]])
    mean, se = grouped_mean_se(x, groups=3)
    # groups (1,3) (2,6) (4,8): means 2, 4, 6; sd = 2; se = 2 / sqrt(3)
    assert mean[0] == pytest.approx(4.0)
    assert se[0] == pytest.approx(2.0 / math.sqrt(3.0))


def test_direction_check_flags_a_multiplier_moving_against_its_violation():
    from scale.preflight import direction_check

    good = [{"step": 0, "lam": [0.1], "violation": [1.0]}, {"step": 1, "lam": [0.05], "violation": [-0.5]},
            {"step": 2, "lam": [0.0], "violation": [-3.0]}, {"step": 3, "lam": [0.0], "violation": [-1.0]}]
    assert direction_check(good, [0.0], 0.1).passed
    bad = good[:1] + [{"step": 1, "lam": [0.2], "violation": [-0.5]}]
    c = direction_check(bad, [0.0], 0.1)
    assert not c.passed and "step 1" in c.measured
    # held by the box's top (FU: n lam <= 1) or by the sum bound (RU: sum lam <= 0.95) is allowed
    assert direction_check([{"step": 0, "lam": [0.5], "violation": [2.0]}], [0.5], 0.1, upper=np.array([0.5])).passed
    assert direction_check([{"step": 0, "lam": [0.5, 0.45], "violation": [1.0, 1.0]}], [0.5, 0.45], 0.1,
                           sum_max=0.95).passed
    assert not direction_check([{"step": 0, "lam": [0.5], "violation": [2.0]}], [0.5], 0.1).passed
    # slack (violation < 0) with lam > 0 must move lam down, not leave it
    assert not direction_check([{"step": 0, "lam": [0.5], "violation": [-2.0]}], [0.5], 0.1).passed
    # fixed multipliers (ESD, SISS) must not move
    assert not direction_check([{"step": 0, "lam": [0.3], "violation": [2.0]}], [0.2], 0.0).passed


# ------------------------------------------------------------------ the command on tiny models


def test_concept_preflight_passes_and_writes_report_grid_and_curves(tiny, tmp_path, capsys):
    rc, text, rec = _preflight(capsys, concept_toml(tiny), tmp_path / "pf")
    assert rc == 0, text
    assert "PASS" in text and "projected memory fits the device" in text
    names = [c["name"] for c in rec["checks"]]
    for expected in ("losses finite", "multipliers move as the violation says",
                     "checkpoint + resume reproduces the run", "pictures written"):
        assert expected in names
    assert (tmp_path / "pf" / "preflight.md").read_text().startswith("# dualunlearn scale preflight")
    figs = tmp_path / "pf" / "run" / "figures"
    assert (figs / "grid_step3.png").is_file() and (figs / "curves.png").is_file()
    # the parameter report: LoRA on the 16 cross-attention projections of the tiny UNet
    assert "LoRA on 16 modules" in rec["parameters"]["trainable_modules"]
    assert 0 < rec["parameters"]["trainable"] < rec["parameters"]["unet"]
    # reduced resolution on CPU: the smallest the tiny UNet (one downsampler) takes, 2
    assert rec["measured"]["resolution"] == 2 and rec["projection"]["resolution"] == 8
    before, _ = torch.load(figs / "before.pt", weights_only=False)  # the run really sampled at 2 x 2
    assert tuple(before[0].shape[-2:]) == (2, 2)


def test_reverse_kl_calibration_brackets_the_kl_at_the_largest_multiplier(tiny, tmp_path, capsys):
    """The top of RU's range is the composed reference's path KL at eta_max = 19; along the composed
    chain the per-state distance to q_i is (1 + eta)^2 times the base's, so the top is of the order of
    400 x the scale (not exactly: the states differ)."""
    rc = cli_main(["scale", "calibrate", "--config", concept_toml(tiny), "--out", str(tmp_path)])
    assert rc == 0
    cal = json.loads((tmp_path / "calibration.json").read_text())
    assert cal["step0"][0] == 0.0  # LoRA starts at zero: the model equals its reference
    K, top = cal["scale"][0], cal["top"][0]
    assert K > 0 and 40 * K < top < 4000 * K
    assert all(0 < b < top for b in cal["suggested_budgets"][0])
    assert "suggested" in capsys.readouterr().out


def test_budget_already_met_at_step_0_is_refused(tiny, tmp_path, capsys):
    # FU: budget_factor 0.9 asks for a forget loss below the pretrained one: met before any step
    rc, text, rec = _preflight(capsys, data_toml(tiny, "budget_factor = 0.9"), tmp_path / "pf")
    assert rc == 1
    assert "REFUSED" in text and "already met at step 0" in text and "suggested budgets" in text
    assert "losses finite" not in [c["name"] for c in rec["checks"]]  # refused before any training
    # RU: a budget of 0 is met by the pretrained model (KL = 0)
    rc, text, _ = _preflight(capsys, concept_toml(tiny, "[0.0]"), tmp_path / "pf2")
    assert rc == 1 and "already met at step 0" in text


def test_budget_that_cannot_be_met_is_refused(tiny, tmp_path, capsys):
    rc, text, _ = _preflight(capsys, concept_toml(tiny, "[1e9]"), tmp_path / "pf")
    assert rc == 1 and "cannot be met" in text
    # LU with the likelihood ratio: E[r] > 0, so a budget <= 0 is out of reach
    rc, text, _ = _preflight(capsys, concept_toml(tiny, "[0.0]", method="likelihood", extra='likelihood_constraint = "likelihood_ratio"'),
                             tmp_path / "pf2")
    assert rc == 1 and "cannot be met" in text
    # FU: a forget loss of 1.5 is above the zero predictor's 1 (the fitted DDPM's losses are below 1)
    rc, text, rec = _preflight(capsys, data_toml(tiny, "budgets = [1.5]"), tmp_path / "pf3")
    assert all(v < 1 for v in rec["calibration"]["step0"])
    assert rc == 1 and "cannot be met" in text


def test_data_preflight_passes_with_a_calibrated_budget(tiny, tmp_path, capsys):
    assert cli_main(["scale", "calibrate", "--config", data_toml(tiny), "--out", str(tmp_path / "cal")]) == 0
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    b = [s[1] for s in cal["suggested_budgets"]]
    rc, text, rec = _preflight(capsys, data_toml(tiny, f"budgets = {b}"), tmp_path / "pf")
    assert rc == 0, text
    figs = tmp_path / "pf" / "run" / "figures"
    assert (figs / "grid_step3.png").is_file() and (figs / "curves.png").is_file()


def test_esd_budget_shows_as_not_applicable(tiny, tmp_path, capsys):
    rc, text, rec = _preflight(capsys, concept_toml(tiny, "[]", method="esd"), tmp_path / "pf")
    assert rc == 0, text
    assert rec["calibration"]["budgets"] is None and "budgets n/a" in text


def test_verify_with_config_runs_the_preflight_as_a_section(tiny, tmp_path, capsys):
    rc = cli_main(["verify", "--tiers", "", "--config", concept_toml(tiny), "--out", str(tmp_path / "v")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "pre-flight: concept/r" in out  # the table caps the section name at 22 characters
    assert (tmp_path / "v" / "preflight" / "preflight.json").is_file()


# ------------------------------------------------------------------ pictures and trackers of every run


def test_every_run_writes_grids_every_sample_every_steps_and_curves(tiny, tmp_path):
    from scale import data
    from scale.preflight import load_run_config

    _, cfg = load_run_config(data_toml(tiny, extra=""), [f"out={json.dumps(str(tmp_path / 'run'))}",
                                                         "train.steps=4", "train.sample_every=2"])
    data.run(cfg)
    figs = tmp_path / "run" / "figures"
    assert sorted(p.name for p in figs.glob("grid_step*.png")) == ["grid_step2.png", "grid_step4.png"]
    assert (figs / "curves.png").is_file()


def test_tensorboard_tracker_logs_the_run_offline(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scale import data
    from scale.preflight import load_run_config

    _, cfg = load_run_config(data_toml(tiny), [f"out={json.dumps(str(tmp_path / 'run'))}", "train.steps=3",
                                               'train.log_with="tensorboard"'])
    data.run(cfg)
    events = list((tmp_path / "run" / "tracker").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lam/0", "measured/1"} <= set(tags)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_tracker_is_off_by_default_and_validated():
    from scale.engine import TrainConfig

    assert TrainConfig().log_with == ""
    with pytest.raises(ValueError, match="'mlflow'"):
        TrainConfig(log_with="mlflow")


# ------------------------------------------------------------------ offline model ids


def test_unreachable_hub_id_fails_in_one_line_quickly(monkeypatch):
    """No network here: the message names the cause and the remedy, without the download's retries."""
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401 -- imported (lazily, slowly) before the clock
    import huggingface_hub

    from scale.models import load_ddpm_models

    def offline(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        load_ddpm_models("someone/no-such-ddpm")
    msg = str(exc.value)
    assert time.perf_counter() - t0 < 10
    assert "not a local folder; downloading from the hub failed: ConnectionError" in msg
    assert "pass a local path or set `local_files_only`" in msg and "\n" not in msg


def test_rehearse_help_lists_its_sizes(capsys):
    with pytest.raises(SystemExit):
        cli_main(["scale", "rehearse", "--help"])
    out = capsys.readouterr().out
    for size in ("tiny", "quick", "full"):
        assert size in out


# ------------------------------------------------------------------ real-size folders (CPU, minutes)


@pytest.fixture(scope="module")
def realsize(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import realsize_models as rm

    root = tmp_path_factory.mktemp("realsize")
    rm.build_sd_v1(root / "sd")
    model, imgs = rm.build_celebahq_ddpm(root / "ddpm")
    return root, rm, model, imgs


@pytest.mark.realsize
def test_preflight_passes_on_real_size_sd_v1_in_under_5_minutes(realsize, tmp_path, capsys):
    root, rm, _, _ = realsize
    cfg = _write(tmp_path / "sd.toml", rm.sd_config(root / "sd"))
    assert cli_main(["scale", "calibrate", "--config", cfg, "--out", str(tmp_path / "cal")]) == 0
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    cfg = _write(tmp_path / "sd.toml", rm.sd_config(root / "sd", budget=cal["suggested_budgets"][0][1]))
    t0 = time.perf_counter()
    rc = cli_main(["scale", "preflight", "--config", cfg, "--out", str(tmp_path / "pf")])
    seconds = time.perf_counter() - t0
    assert rc == 0, capsys.readouterr().out
    assert seconds < 300


@pytest.mark.realsize
def test_preflight_passes_on_real_size_celebahq_ddpm_in_under_5_minutes(realsize, tmp_path, capsys):
    root, rm, model, imgs = realsize
    cfg = _write(tmp_path / "ddpm.toml", rm.ddpm_config(model, imgs))
    t0 = time.perf_counter()
    rc = cli_main(["scale", "preflight", "--config", cfg, "--out", str(tmp_path / "pf")])
    seconds = time.perf_counter() - t0
    assert rc == 0, capsys.readouterr().out
    assert seconds < 300


# ------------------------------------------------------------------ the rehearsal's report


def _kid_features():
    from scale.evaluate import FeatureExtractor

    return FeatureExtractor(torch.nn.Flatten(), 4)


def test_kid_standard_error_matches_the_spread_of_independent_kid_estimates():
    """Monte Carlo: R = 40 independent (real, fake) pairs of 4-d Gaussian "images" (means 0 and 0.5); the
    group standard error of each KID estimate should match the sd of the 40 estimates. The sd of 40
    draws has relative standard error 1/sqrt(2 * 39) = 0.11 and the mean of 40 group se's about
    0.11 / sqrt(40) (each from 4 groups: relative se ~0.4); their ratio lies within 3 x 0.12 = 0.36 of 1
    up to the group method's first-order approximation, hence [0.6, 1.5]."""
    from scale.evaluate import kid
    from scale.rehearse import kid_standard_error

    g = torch.Generator().manual_seed(0)
    feat = _kid_features()
    est, ses = [], []
    for r in range(40):
        real = torch.randn((160, 4, 1, 1), generator=g)
        fake = torch.randn((160, 4, 1, 1), generator=g) + 0.5
        est.append(kid(real, fake, feat, subset_size=160, subsets=10, seed=r)[0])
        ses.append(kid_standard_error(real, fake, feat, seed=r))
    ratio = float(np.mean(ses) / np.std(est, ddof=1))
    assert 0.6 < ratio < 1.5, (ratio, np.mean(est), np.std(est, ddof=1), np.mean(ses))


def test_rehearse_report_shows_kid_with_se_esd_budget_na_and_verdicts(tmp_path):
    from scale.rehearse import method_verdict, render_report

    before = {"accuracy_unlearned": 0.9, "accuracy_retained": 0.9, "kid_retained": -2e-5, "kid_retained_se": 3e-4}
    ok = {"accuracy_unlearned": 0.1, "accuracy_retained": 0.85, "kid_retained": 1e-4, "kid_retained_se": 2e-4}
    bad = dict(ok, accuracy_unlearned=0.5)
    last10 = np.full((10, 1), 30.0) + np.linspace(-1, 1, 10)[:, None]
    methods = {
        "reverse_kl": {"after": ok, "lam": [0.3], "budgets": [30.0], "constraint_last10": [30.0],
                       "run": str(tmp_path / "reverse_kl")},
        "esd": {"after": bad, "lam": [0.5], "budgets": [0.0], "constraint_last10": [12.0], "run": str(tmp_path / "esd")},
    }
    methods["reverse_kl"]["verdict"] = method_verdict("reverse_kl", methods["reverse_kl"], before, last10)
    methods["esd"]["verdict"] = method_verdict("esd", methods["esd"], before)
    assert methods["reverse_kl"]["verdict"]["passed"] and not methods["esd"]["verdict"]["passed"]
    # the constraint 3 standard errors below the budget fails RU's verdict
    far = method_verdict("reverse_kl", dict(methods["reverse_kl"], budgets=[40.0]), before, last10)
    assert not far["passed"] and "budget" in far["reasons"][0]
    text = render_report({"classifier_heldout_accuracy": 0.95, "concept_before": before, "methods": methods,
                          "config": {"out": str(tmp_path)}})
    esd_row = next(line for line in text.splitlines() if line.startswith("| esd |"))
    assert "| n/a |" in esd_row and "[0.0]" not in esd_row and "**fail**" in esd_row
    assert "-2.0e-05 +- 3.0e-04" in text and "-0.0000" not in text
    assert "| pass |" in next(line for line in text.splitlines() if line.startswith("| reverse_kl |"))
