"""``dualunlearn scale rehearse``: the whole scale path, offline, on real data shipped with
scikit-learn (the 1,797 handwritten 8x8 digits).

1. train a digits classifier (features for KID, accuracy of generated images);
2. train from scratch a text-conditioned ``UNet2DConditionModel`` in pixel space ("a photo of the
   digit 3", a tiny CLIP text encoder built from config, a word-level tokenizer built here, prompt
   dropout so the null prompt is the unconditional model) and an unconditional ``UNet2DModel`` on
   a subset of the digits written to a PNG folder; save both in the diffusers layouts;
3. unlearn one digit with RU primal-dual, LU primal-dual and the ESD baseline
   (``scale.concept.run``: the Stable Diffusion code path, loading by ``from_pretrained``) and a
   handful of training images with FU primal-dual and SISS (``scale.data.run``: the CelebA-HQ path);
4. evaluate before/after: classifier accuracy on generated images of the unlearned and retained
   digits, KID with the classifier's features, the multipliers against their budgets, the forget
   images' denoising loss and the nearest-neighbour distance of generated images to them.

``size="quick"`` takes several minutes on one CPU thread (pretraining 1,500 steps is most of it;
with cached pretrained models RU / LU / ESD take about 1.5 minutes each); ``size="full"`` is the
quality run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from scale import builders
from scale.diffusion import add_noise
from scale.engine import TrainConfig
from scale.evaluate import FeatureExtractor, kid, nearest_neighbour_similarity
from scale.sample import guided_eps_fn, sample_images
from theory.config import config_to_dict
from toy.objectives import denoising_loss
from toy.runs import atomic_write_json

log = logging.getLogger(__name__)

PROMPT = "a photo of the digit {}"
SIZES = ("quick", "full")
#: size presets: (pretrain steps cond, pretrain steps uncond, unlearn steps, eval samples per class,
#: unet channels, batch)
PRESETS = {
    "quick": dict(pretrain_steps=1500, uncond_steps=600, unlearn_steps=60, eval_per_class=32,
                  channels=(16, 32), mid_block=True, batch=64, fu_train_size=32, fu_unlearn_steps=150),
    "full": dict(pretrain_steps=20000, uncond_steps=15000, unlearn_steps=400, eval_per_class=400,
                 channels=(32, 64), mid_block=True, batch=128, fu_train_size=256, fu_unlearn_steps=600),
}


@dataclass(frozen=True)
class RehearseConfig:
    out: str = "runs/rehearse"
    size: str = "quick"
    seed: int = 0
    digit: int = 3
    methods: tuple[str, ...] = ("ru", "lu", "esd", "fu", "siss")
    timesteps: int = 100
    sample_steps: int = 25
    guidance: float = 3.0
    ru_budget_factor: float = 1.0
    lu_budget: float = -0.5
    lu_constraint: str = "log_likelihood_ratio"
    esd_eta: float = 1.0
    lr: float = 1e-3
    unlearn_lr: float = 3e-3
    lora_targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
    lr_dual_ru: float = 0.002
    lr_dual_lu: float = 0.1
    fu_forget: int = 4
    fu_budget_factor: float = 1.15
    fu_lr_dual: float = 1.0
    lora_rank: int = 4
    retain_weight: float = 9.0
    retain_null: bool = False
    reuse_pretrained: bool = True

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if not 0 <= self.digit <= 9:
            raise ValueError(f"digit must be 0..9, got {self.digit}")
        bad = sorted(set(self.methods) - {"ru", "ru_dual_only", "lu", "esd", "fu", "siss", "siss_is"})
        if bad:
            raise ValueError(f"unknown rehearsal method(s) {bad}")

    @property
    def preset(self) -> dict:
        return PRESETS[self.size]


# ------------------------------------------------------------------ data and classifier


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


class DigitClassifier(nn.Module):
    """MLP on 8x8 digits; ``features`` (64-d penultimate layer) feeds KID."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x.float())

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 1500) -> tuple[DigitClassifier, float]:
    """Train on 80% of the digits (with small Gaussian pixel noise, so that slightly imperfect
    generated digits are judged fairly); return the classifier and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_tr = int(0.8 * x.shape[0])
    tr, te = perm[:n_tr], perm[n_tr:]
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = tr[torch.randint(0, n_tr, (128,), generator=g)]
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x[te]).argmax(1) == y[te]).float().mean())
    return clf, acc


# ------------------------------------------------------------------ pretraining


def _pretrain(unet, x, eps_fn_cond, steps, batch, lr, scheduler, seed, desc, extra_params=()):
    ab = scheduler.alphas_cumprod.double()
    T = ab.numel()
    g = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    unet.train()
    for step in tqdm(range(steps), desc=desc, unit="step", mininterval=5):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        t = torch.randint(0, T, (batch,), generator=g)
        noise = torch.randn((batch, *x.shape[1:]), generator=g)
        x_t = add_noise(x[idx], noise, ab[t])
        loss = denoising_loss(eps_fn_cond(unet, x_t, t, idx, g), noise).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite pretraining loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    unet.eval()
    return unet


def pretrain_concept_model(cfg: RehearseConfig, x, y, path: Path) -> None:
    pre = cfg.preset
    words = PROMPT.format(" ".join(str(i) for i in range(10))).split()
    tok = builders.build_word_tokenizer(words)
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=cfg.seed)
    unet = builders.build_cond_unet(block_out_channels=pre["channels"], mid_block=pre["mid_block"], seed=cfg.seed)
    sch = builders.build_scheduler(cfg.timesteps, beta_start=0.1 / cfg.timesteps, beta_end=20.0 / cfg.timesteps)
    from scale.models import encode_prompts

    emb = encode_prompts(tok, te, [PROMPT.format(i) for i in range(10)])
    null = encode_prompts(tok, te, [""], check_nonempty=False)

    def eps_fn(net, x_t, t, idx, g):
        e = emb[y[idx]].clone()
        e[torch.rand((idx.shape[0],), generator=g) < 0.15] = null[0]  # prompt dropout: the null prompt
        return net(x_t, t, encoder_hidden_states=e).sample

    _pretrain(unet, x, eps_fn, pre["pretrain_steps"], pre["batch"], cfg.lr * 2, sch, cfg.seed, "pretrain/concept")
    builders.save_concept_pipeline(path, unet, te, tok, sch)


def write_png_folder(x: torch.Tensor, folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for a, name in zip(arr, names):
        Image.fromarray(a[0]).save(folder / name)


def pretrain_ddpm(cfg: RehearseConfig, x_train: torch.Tensor, path: Path) -> None:
    pre = cfg.preset
    unet = builders.build_uncond_unet(block_out_channels=pre["channels"], seed=cfg.seed)
    sch = builders.build_scheduler(cfg.timesteps, beta_start=0.1 / cfg.timesteps, beta_end=20.0 / cfg.timesteps)
    _pretrain(unet, x_train, lambda net, x_t, t, idx, g: net(x_t, t).sample, pre["uncond_steps"],
              min(pre["batch"], x_train.shape[0]), cfg.lr * 2, sch, cfg.seed + 1, "pretrain/ddpm")
    builders.save_ddpm(path, unet, sch)


# ------------------------------------------------------------------ evaluation


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Generated pixels quantised like the training PNGs (8 bit), in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1.0


def evaluate_concept(models, unet, clf, feat, x_real, y_real, cfg: RehearseConfig, seed: int) -> dict:
    """Generate ``eval_per_class`` images per digit prompt; classifier accuracy per class; KID of
    the retained classes' images against the real retained digits (classifier features)."""
    from scale.models import encode_prompts

    n = cfg.preset["eval_per_class"]
    null = encode_prompts(models.tokenizer, models.text_encoder, [""], check_nonempty=False)
    g = torch.Generator().manual_seed(seed)
    acc, imgs = {}, {}
    for k in range(10):
        emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT.format(k)])
        x = _to_pixels(sample_images(guided_eps_fn(unet, emb, null, cfg.guidance), models.sample_shape,
                                     models.alphas_cumprod, cfg.sample_steps, n, g))
        with torch.no_grad():
            pred = clf(x).argmax(1)
        acc[k] = float((pred == k).float().mean())
        imgs[k] = x
    retained = [k for k in range(10) if k != cfg.digit]
    fake_ret = torch.cat([imgs[k] for k in retained])
    real_ret = x_real[y_real != cfg.digit]
    kid_mean, kid_std = kid(real_ret, fake_ret, feat, subset_size=min(200, fake_ret.shape[0]), seed=seed)
    return {"accuracy_per_class": acc, "accuracy_unlearned": acc[cfg.digit],
            "accuracy_retained": float(np.mean([acc[k] for k in retained])),
            "kid_retained": kid_mean, "kid_retained_std": kid_std}


def evaluate_ddpm(unet, scheduler, x_forget, x_retain, feat, cfg: RehearseConfig, seed: int) -> dict:
    from scale.data import forget_losses

    ab = scheduler.alphas_cumprod.double()
    n = cfg.preset["eval_per_class"] * 4
    gen = sample_images(lambda x, t: unet(x, t).sample, (1, 8, 8), ab, cfg.sample_steps, n,
                        torch.Generator().manual_seed(seed))
    gen = _to_pixels(gen)
    nn_forget = nearest_neighbour_similarity(gen, x_forget)["nn_l2"]
    nn_retain = nearest_neighbour_similarity(gen, x_retain)["nn_l2"]
    return {
        "forget_loss": forget_losses(unet, x_forget, ab, 64, seed).tolist(),
        "retain_loss": float(forget_losses(unet, x_retain, ab, 8, seed).mean()),
        "nn_l2_forget": nn_forget, "nn_l2_retain_mean": float(np.mean(nn_retain)),
        "kid_train": kid(x_retain, gen, feat, subset_size=min(100, x_retain.shape[0], n), seed=seed)[0],
    }


def calibrate_ru_budget(cfg: RehearseConfig, model: Path, out: Path, steps: int = 4) -> float:
    """Path KL(q_base || q_concept) of the pretrained model: the RU dual-only estimate at lam = 0
    (composed target = the base model). RU budgets are set as a multiple of it, so that the
    constraint is active (KL(p||q_i) starts at 0 for p = q_i) and reachable with sum(lam) < 1."""
    import shutil

    from scale import concept

    shutil.rmtree(out, ignore_errors=True)
    concept.run(concept.ConceptConfig(
        model=str(model), out=str(out), method="ru_dual_only", concepts=(PROMPT.format(cfg.digit),),
        budgets=(1.0,), lr_dual=0.0, sample_steps=cfg.sample_steps, dual_only_steps=steps,
        train=TrainConfig(steps=0, batch_size=16, micro_batch=16, cpu=True, seed=cfg.seed + 3)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(np.mean([r["measured"][0] for r in rows]))


def _retain_prompts(cfg: RehearseConfig) -> tuple[str, ...]:
    """The prompts the concept runs keep (MATH.md §4, docs/scale.md "Retain prompts"): the other nine
    digits (and the null prompt with ``retain_null``); none when ``retain_weight = 0``."""
    if cfg.retain_weight <= 0:
        return ()
    return tuple(PROMPT.format(k) for k in range(10) if k != cfg.digit) + (("",) if cfg.retain_null else ())


def _last_mean(run_dir: Path, key: str, k: int = 10) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("primal", True)] or rows
    vals = np.array([r[key] for r in rows[-k:]], dtype=np.float64)
    return vals.mean(0).tolist()


# ------------------------------------------------------------------ the rehearsal


def run(cfg: RehearseConfig) -> dict:
    """Run the rehearsal; write ``summary.json`` and ``report.md`` into ``cfg.out``; return the summary."""
    from scale import concept, data
    from scale.models import load_concept_models, load_ddpm_models
    from scale.sample import load_unlearned_unet

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = cfg.preset
    torch.manual_seed(cfg.seed)
    x, y = load_digits_tensor()
    clf, clf_acc = train_classifier(x, y, cfg.seed)
    feat = FeatureExtractor(_Features(clf), 64)
    summary: dict = {"config": config_to_dict(cfg), "classifier_heldout_accuracy": clf_acc, "methods": {}}

    # ---- pretrained models (cached by a fingerprint of what determines them)
    fingerprint = json.dumps({k: config_to_dict(cfg)[k] for k in ("size", "seed", "timesteps", "lr")}
                             | {"preset": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}},
                             sort_keys=True)
    pdir = out / "pretrained"
    g = torch.Generator().manual_seed(cfg.seed + 7)
    sub = torch.randperm(x.shape[0], generator=g)[:pre["fu_train_size"]]
    names = [f"digit_{int(i):04d}.png" for i in sub]
    forget_names = names[:cfg.fu_forget]
    concept_methods = [mth for mth in cfg.methods if mth in ("ru", "ru_dual_only", "lu", "esd")]
    data_methods = [mth for mth in cfg.methods if mth in ("fu", "siss", "siss_is")]

    def cached(part: str) -> bool:  # only the models the chosen methods need are trained
        f = pdir / f"{part}.fingerprint.json"
        return cfg.reuse_pretrained and f.is_file() and f.read_text() == fingerprint

    if concept_methods and not cached("concept"):
        pretrain_concept_model(cfg, x, y, pdir / "concept")
        (pdir / "concept.fingerprint.json").write_text(fingerprint)
    if data_methods and not cached("ddpm"):
        write_png_folder(x[sub], out / "digits_train", names)
        pretrain_ddpm(cfg, _to_pixels(x[sub]), pdir / "ddpm")
        (pdir / "ddpm.fingerprint.json").write_text(fingerprint)

    # ---- concept unlearning (RU, LU, ESD) through scale.concept
    if concept_methods:
        models = load_concept_models(str(pdir / "concept"))
        summary["concept_before"] = evaluate_concept(models, models.unet, clf, feat, x, y, cfg, cfg.seed + 100)
        kl0 = calibrate_ru_budget(cfg, pdir / "concept", out / "runs" / "calibrate")
        summary["kl_base_to_concept"] = kl0
        summary["ru_budget"] = cfg.ru_budget_factor * kl0
        for mth in concept_methods:
            budgets = (cfg.lu_budget,) if mth == "lu" else (cfg.ru_budget_factor * kl0,)
            ccfg = concept.ConceptConfig(
                model=str(pdir / "concept"), out=str(out / "runs" / mth), method=mth,
                concepts=(PROMPT.format(cfg.digit),), budgets=budgets, esd_eta=cfg.esd_eta,
                retain_prompts=_retain_prompts(cfg),
                retain_weight=cfg.retain_weight,
                lr_dual=cfg.lr_dual_lu if mth == "lu" else cfg.lr_dual_ru, lu_constraint=cfg.lu_constraint,
                sample_steps=cfg.sample_steps, dual_only_steps=max(10, pre["unlearn_steps"] // 3),
                lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, classifier_t_min=cfg.timesteps // 10,
                train=TrainConfig(steps=pre["unlearn_steps"], batch_size=16, micro_batch=16, lr=cfg.unlearn_lr,
                                  cpu=True, checkpoint_every=max(1, pre["unlearn_steps"]), seed=cfg.seed))
            res = concept.run(ccfg)
            m2 = load_concept_models(str(pdir / "concept"))
            unet = load_unlearned_unet(m2, str(out / "runs" / mth))
            ev = evaluate_concept(m2, unet, clf, feat, x, y, cfg, cfg.seed + 100)
            summary["methods"][mth] = {
                "after": ev, "lam": res["lam"], "budgets": res["budgets"],
                "constraint_last10": _last_mean(out / "runs" / mth, "measured"),
                "run": str(out / "runs" / mth)}

    # ---- data unlearning (FU, SISS) through scale.data
    if data_methods:
        dm = load_ddpm_models(str(pdir / "ddpm"))
        x_sub = _to_pixels(x[sub])
        x_forget, x_retain = x_sub[:cfg.fu_forget], x_sub[cfg.fu_forget:]
        summary["ddpm_before"] = evaluate_ddpm(dm.unet, dm.scheduler, x_forget, x_retain, feat, cfg, cfg.seed + 200)
        for mth in data_methods:
            dcfg = data.DataConfig(
                model=str(pdir / "ddpm"), out=str(out / "runs" / mth), method=mth, train_dir=str(out / "digits_train"),
                forget=tuple(forget_names), budget_factor=cfg.fu_budget_factor, lr_dual=cfg.fu_lr_dual,
                siss_weight=1.0, forget_draws=4,
                train=TrainConfig(steps=pre["fu_unlearn_steps"], batch_size=32, micro_batch=48, lr=cfg.lr / 4,
                                  cpu=True, checkpoint_every=max(1, pre["fu_unlearn_steps"]), seed=cfg.seed))
            res = data.run(dcfg)
            dm2 = load_ddpm_models(str(pdir / "ddpm"))
            unet = load_unlearned_unet(dm2, str(out / "runs" / mth))
            ev = evaluate_ddpm(unet, dm2.scheduler, x_forget, x_retain, feat, cfg, cfg.seed + 200)
            summary["methods"][mth] = {
                "after": ev, "lam_times_n": res["lam_times_n"], "budgets": res["budgets"],
                "constraint_last10": _last_mean(out / "runs" / mth, "measured"),
                "run": str(out / "runs" / mth)}
    atomic_write_json(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary))
    return summary


class _Features(nn.Module):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return nn.functional.normalize(self.clf.features(x), dim=1)


def render_report(s: dict) -> str:
    lines = ["# Offline rehearsal on scikit-learn digits", "",
             f"classifier held-out accuracy: {s['classifier_heldout_accuracy']:.3f}", ""]
    if "concept_before" in s:
        b = s["concept_before"]
        lines += ["| model | acc. unlearned digit | acc. retained digits | KID retained | lam | budget | constraint (last 10) |",
                  "|---|---|---|---|---|---|---|",
                  f"| pretrained | {b['accuracy_unlearned']:.3f} | {b['accuracy_retained']:.3f} | {b['kid_retained']:.4f} | | | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "accuracy_unlearned" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {a['accuracy_unlearned']:.3f} | {a['accuracy_retained']:.3f} | "
                             f"{a['kid_retained']:.4f} | {np.round(np.asarray(r['lam'], dtype=float), 4).tolist()} | "
                             f"{np.asarray(r['budgets'], dtype=float).tolist()} | "
                             f"{np.round(r['constraint_last10'], 4).tolist()} |")
        lines.append("")
    if "ddpm_before" in s:
        b = s["ddpm_before"]
        lines += ["| model | forget loss | retain loss | NN L2 to forget | NN L2 to retain (mean) | KID train | n*lam |",
                  "|---|---|---|---|---|---|---|",
                  f"| pretrained | {np.round(b['forget_loss'], 3).tolist()} | {b['retain_loss']:.3f} | "
                  f"{np.round(b['nn_l2_forget'], 2).tolist()} | {b['nn_l2_retain_mean']:.2f} | {b['kid_train']:.4f} | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "forget_loss" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {np.round(a['forget_loss'], 3).tolist()} | {a['retain_loss']:.3f} | "
                             f"{np.round(a['nn_l2_forget'], 2).tolist()} | {a['nn_l2_retain_mean']:.2f} | "
                             f"{a['kid_train']:.4f} | {np.round(np.asarray(r['lam_times_n'], dtype=float), 3).tolist()} |")
    return "\n".join(lines) + "\n"
