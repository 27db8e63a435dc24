"""``scale.rehearse.run``: pretrain (or reuse) the models, unlearn with every chosen method through
``scale.concept.run`` / ``scale.data.run``, evaluate before and after, write ``summary.json`` and
``report.md``.

Seeds: every random stream is named and derived from ``cfg.seed`` (``toy.core.seeding``): the
classifier's (``classifier:*``), the pretrained models' (``concept-model:*``, ``ddpm:*``), the DDPM's
training subset (``ddpm:training-subset``), the RU budget's calibration run
(``reverse-kl-budget-calibration``) and the evaluations' (``concept-eval:*``, ``ddpm-eval:*``,
``memorisation-gap:*``). The unlearning runs themselves get ``cfg.seed`` as their run seed (every
method the same, so their draws are paired) and derive their own streams from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scale.engine import TrainConfig
from scale.evaluate import FeatureExtractor
from scale.rehearse.config import PRETRAIN_KEYS, PROMPT, RehearseConfig
from scale.rehearse.digits import DigitFeatures, load_digits_tensor, to_pixels, train_classifier, write_png_folder
from scale.rehearse.evaluation import (evaluate_concept, evaluate_ddpm, forward_kl_budgets, memorisation_gap,
                                       paired_forget_losses)
from scale.rehearse.pretrain import pretrain_concept_model, pretrain_ddpm
from scale.names import CONCEPT_METHODS, DATA_METHODS
from scale.rehearse.report import method_verdict, render_report
from theory.config import config_to_dict
from toy.core.runs import atomic_write_json
from toy.core.seeding import derive_seed, seeded_generator

def calibrate_reverse_kl_budget(cfg: RehearseConfig, model: Path, out: Path, steps: int = 4) -> float:
    """Path KL(q_base || q_concept) of the pretrained model: the RU dual-only estimate at lam = 0
    (composed target = the base model). RU budgets are set as a multiple of it, so that the
    constraint is active (KL(p||q_i) starts at 0 for p = q_i) and reachable with sum(lam) < 1."""
    import shutil

    from scale import concept

    shutil.rmtree(out, ignore_errors=True)
    concept.run(concept.ConceptConfig(
        model=str(model), out=str(out), method="reverse_kl_dual_only", concepts=(PROMPT.format(cfg.digit),),
        budgets=(1.0,), lr_dual=0.0, sample_steps=cfg.preset["unlearn_sample_steps"], dual_only_steps=steps,
        train=TrainConfig(steps=0, batch_size=16, micro_batch=16, cpu=True,
                          seed=derive_seed(cfg.seed, "reverse-kl-budget-calibration"))))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(np.mean([r["measured"][0] for r in rows]))


def _retain_prompts(cfg: RehearseConfig) -> tuple[str, ...]:
    """The prompts the concept runs keep (docs/math.md §4, docs/scale.md "Retain prompts"): the other nine
    digits (and the null prompt with ``retain_null``); none when ``retain_weight = 0``."""
    if cfg.retain_weight <= 0:
        return ()
    return tuple(PROMPT.format(k) for k in range(10) if k != cfg.digit) + (("",) if cfg.retain_null else ())


def _last_rows(run_dir: Path, key: str, k: int) -> np.ndarray:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("primal", True)] or rows
    return np.array([r[key] for r in rows[-k:]], dtype=np.float64)


def _last_mean(run_dir: Path, key: str, k: int = 10) -> list[float]:
    return _last_rows(run_dir, key, k).mean(0).tolist()


def _last_se(run_dir: Path, key: str, k: int = 10) -> list[float]:
    """Standard error of ``_last_mean``: the per-step estimates use fresh draws every step."""
    vals = _last_rows(run_dir, key, k)
    return (vals.std(0, ddof=1) / np.sqrt(vals.shape[0])).tolist()


def run(cfg: RehearseConfig) -> dict:
    """Run the rehearsal; write ``summary.json`` and ``report.md`` into ``cfg.out``; return the summary."""
    from scale import concept, data
    from scale.models import load_concept_models, load_ddpm_models
    from scale.sample import load_unlearned_unet
    from toy.core.runs import clear_run_dir

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = cfg.preset
    torch.manual_seed(derive_seed(cfg.seed, "torch-global"))  # whatever draws from the global generator
    x, y = load_digits_tensor()
    clf, clf_acc = train_classifier(x, y, cfg.seed)
    feat = FeatureExtractor(DigitFeatures(clf), 64)
    summary: dict = {"config": config_to_dict(cfg), "classifier_heldout_accuracy": clf_acc, "methods": {}}

    # ---- pretrained models (cached by a fingerprint of what determines them)
    fingerprint = json.dumps({k: config_to_dict(cfg)[k] for k in ("size", "seed", "timesteps", "lr")}
                             | {"preset": {k: list(pre[k]) if isinstance(pre[k], tuple) else pre[k] for k in PRETRAIN_KEYS}},
                             sort_keys=True)
    pdir = out / "pretrained"
    perm = torch.randperm(x.shape[0], generator=seeded_generator(cfg.seed, "ddpm:training-subset"))
    sub = perm[:pre["data_train_size"]]
    held = perm[pre["data_train_size"]:pre["data_train_size"] + 256]  # never trained on: the memorisation gap
    names = [f"digit_{int(i):04d}.png" for i in sub]
    forget_names = names[:cfg.data_forget_images]
    concept_methods = [mth for mth in cfg.methods if mth in CONCEPT_METHODS]
    data_methods = [mth for mth in cfg.methods if mth in DATA_METHODS]

    def cached(part: str) -> bool:  # only the models the chosen methods need are trained
        f = pdir / f"{part}.fingerprint.json"
        return cfg.reuse_pretrained and f.is_file() and f.read_text() == fingerprint

    if concept_methods and not cached("concept"):
        pretrain_concept_model(cfg, x, y, pdir / "concept")
        (pdir / "concept.fingerprint.json").write_text(fingerprint)
    if data_methods and not cached("ddpm"):
        write_png_folder(x[sub], out / "digits_train", names)
        pretrain_ddpm(cfg, to_pixels(x[sub]), pdir / "ddpm")
        (pdir / "ddpm.fingerprint.json").write_text(fingerprint)

    # ---- concept unlearning (RU, LU, ESD) through scale.concept
    if concept_methods:
        models = load_concept_models(str(pdir / "concept"))
        summary["concept_before"] = evaluate_concept(models, models.unet, clf, feat, x, y, cfg)
        kl0 = calibrate_reverse_kl_budget(cfg, pdir / "concept", out / "runs" / "calibrate")
        summary["kl_base_to_concept"] = kl0
        summary["reverse_kl_budget"] = cfg.reverse_kl_budget_factor * kl0
        for mth in concept_methods:
            budgets = (cfg.likelihood_budget,) if mth == "likelihood" else (cfg.reverse_kl_budget_factor * kl0,)
            ccfg = concept.ConceptConfig(
                model=str(pdir / "concept"), out=str(out / "runs" / mth), method=mth,
                concepts=(PROMPT.format(cfg.digit),), budgets=budgets, esd_eta=cfg.esd_eta,
                retain_prompts=_retain_prompts(cfg),
                retain_weight=cfg.retain_weight,
                lr_dual=cfg.likelihood_lr_dual if mth == "likelihood" else (cfg.reverse_kl_lr_dual or pre["reverse_kl_lr_dual"]),
                likelihood_constraint=cfg.likelihood_constraint, esd_sampler="ancestral",
                sample_steps=pre["unlearn_sample_steps"], dual_only_steps=max(10, pre["unlearn_steps"] // 3),
                lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, classifier_t_min=cfg.timesteps // 10,
                train=TrainConfig(steps=pre["unlearn_steps"], batch_size=16, micro_batch=16, lr=cfg.unlearn_lr,
                                  cpu=True, checkpoint_every=max(1, pre["unlearn_steps"]), seed=cfg.seed))
            clear_run_dir(ccfg.out)  # the rehearsal's own sub-runs start afresh each time
            res = concept.run(ccfg)
            m2 = load_concept_models(str(pdir / "concept"))
            unet = load_unlearned_unet(m2, str(out / "runs" / mth))
            ev = evaluate_concept(m2, unet, clf, feat, x, y, cfg)
            summary["methods"][mth] = {
                "after": ev, "lam": res["lam"], "budgets": res["budgets"],
                "constraint_last10": _last_mean(out / "runs" / mth, "measured"),
                "run": str(out / "runs" / mth)}
            summary["methods"][mth]["verdict"] = method_verdict(
                mth, summary["methods"][mth], summary["concept_before"], _last_rows(out / "runs" / mth, "measured", 10))

    # ---- data unlearning (FU, SISS) through scale.data
    if data_methods:
        dm = load_ddpm_models(str(pdir / "ddpm"))
        ab = dm.alphas_cumprod
        x_sub = to_pixels(x[sub])
        x_forget, x_retain = x_sub[:cfg.data_forget_images], x_sub[cfg.data_forget_images:]
        x_heldout = to_pixels(x[held])
        summary["ddpm_before"] = evaluate_ddpm(dm.unet, dm.scheduler, x_forget, x_retain, feat, cfg)
        # budgets from the memorisation gap, on the fixed draws evaluate_ddpm and the after-unlearning
        # check use (paired_forget_losses)
        D = cfg.data_eval_draws
        l_pre = paired_forget_losses(dm.unet, x_forget, ab, cfg).double()
        mem = memorisation_gap(dm.unet, ab, x_retain, x_heldout, 32, cfg.seed)
        if cfg.forward_kl_budget_factor > 0:
            budgets = cfg.forward_kl_budget_factor * l_pre.mean(0)
        else:
            budgets = forward_kl_budgets(l_pre.mean(0), mem["gap"], cfg.forward_kl_gap_fraction)
        summary["forward_kl_budget_rule"] = (
            f"{cfg.forward_kl_budget_factor} x pretrained forget loss" if cfg.forward_kl_budget_factor > 0
            else f"pretrained forget loss + {cfg.forward_kl_gap_fraction} x memorisation gap")
        summary["memorisation"] = mem | {"forget_loss_pre": l_pre.mean(0).tolist(), "budgets": budgets.tolist(),
                                         "draws": D}
        for mth in data_methods:
            dcfg = data.DataConfig(
                model=str(pdir / "ddpm"), out=str(out / "runs" / mth), method=mth, train_dir=str(out / "digits_train"),
                forget=tuple(forget_names), budgets=tuple(budgets.tolist()), lr_dual=cfg.forward_kl_lr_dual,
                siss_form="project", siss_weight=1.0, forget_draws=cfg.data_forget_draws,
                train=TrainConfig(steps=pre["data_unlearn_steps"], batch_size=32, micro_batch=32,
                                  lr=cfg.data_lr, cpu=True, checkpoint_every=max(1, pre["data_unlearn_steps"]), seed=cfg.seed))
            clear_run_dir(dcfg.out)
            res = data.run(dcfg)
            dm2 = load_ddpm_models(str(pdir / "ddpm"))
            unet = load_unlearned_unet(dm2, str(out / "runs" / mth))
            ev = evaluate_ddpm(unet, dm2.scheduler, x_forget, x_retain, feat, cfg)
            l_post = paired_forget_losses(unet, x_forget, ab, cfg).double()
            if cfg.forward_kl_budget_factor > 0:  # after - budget on paired draws, and its standard error
                se = ((l_post - cfg.forward_kl_budget_factor * l_pre).var(0) / D).sqrt()
            else:
                se = ((l_post - l_pre).var(0) / D + (cfg.forward_kl_gap_fraction * mem["gap_se"]) ** 2).sqrt()
            summary["methods"][mth] = {
                "after": ev, "lam_times_n": res["lam_times_n"], "budgets": res["budgets"],
                "forget_loss_fixed_draws": l_post.mean(0).tolist(),
                "budget_margin": (l_post.mean(0) - budgets).tolist(), "budget_margin_se": se.tolist(),
                "constraint_last10": _last_mean(out / "runs" / mth, "measured"),
                "constraint_last10_se": _last_se(out / "runs" / mth, "measured"),
                "lam_times_n_last10": (np.asarray(_last_mean(out / "runs" / mth, "lam")) * res["n_train"]).tolist(),
                "run": str(out / "runs" / mth)}
            summary["methods"][mth]["verdict"] = method_verdict(mth, summary["methods"][mth], summary["ddpm_before"])
    atomic_write_json(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary))
    return summary
