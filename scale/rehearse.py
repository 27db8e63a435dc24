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

``size="tiny"`` (the default test) takes about 4 minutes on one CPU thread, pretraining included;
``size="quick"`` several minutes more (pretraining 1,500 steps is most of it; with cached pretrained
models RU / LU / ESD take about 1.5 minutes each); ``size="full"`` is the quality run.
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
from toy.core.diffusion import add_noise
from scale.engine import TrainConfig
from scale.evaluate import FeatureExtractor, kid, nearest_neighbour_similarity
from scale.sample import guided_eps_fn, sample_images
from theory.config import config_to_dict
from toy.core.objectives import denoising_loss
from toy.core.runs import atomic_write_json

log = logging.getLogger(__name__)

PROMPT = "a photo of the digit {}"
SIZES = ("tiny", "quick", "full")
#: size presets: pretraining steps of the conditional UNet (``pretrain_steps``, batch ``batch``, learning
#: rate schedule ``lr_schedule``) and of the unconditional DDPM (``uncond_steps``); unlearning steps
#: (concept ``unlearn_steps``, data ``fu_unlearn_steps``); generated images per digit for evaluation;
#: UNet widths; prompt length in tokens (``prompt_tokens``: the tokenizer's ``model_max_length``);
#: the frozen random text encoder's ``text_init_scale`` (``builders.build_text_encoder``);
#: ancestral sampler steps of the concept runs' on-policy states and path-KL estimate
#: (``unlearn_sample_steps``) and of evaluation (``eval_sample_steps``, unless
#: ``RehearseConfig.sample_steps > 0``); RU's dual step ``lr_dual_ru`` (unless
#: ``RehearseConfig.lr_dual_ru > 0``), larger for fewer unlearning steps.
#: ``tiny`` is the default-test size (docs/scale.md "Offline rehearsal": why it learns the
#: conditioning in 600 steps where a 400-step one-cycle run did not).
PRESETS = {
    "tiny": dict(pretrain_steps=600, uncond_steps=600, unlearn_steps=40, eval_per_class=32,
                 channels=(16, 32), mid_block=True, batch=64, fu_train_size=32, fu_unlearn_steps=200,
                 lr_schedule="wsd", prompt_tokens=8, text_init_scale=5.0, unlearn_sample_steps=10,
                 eval_sample_steps=15, lr_dual_ru=0.004),
    "quick": dict(pretrain_steps=1500, uncond_steps=600, unlearn_steps=60, eval_per_class=32,
                  channels=(16, 32), mid_block=True, batch=64, fu_train_size=32, fu_unlearn_steps=200,
                  lr_schedule="one_cycle", prompt_tokens=16, text_init_scale=1.0, unlearn_sample_steps=25,
                  eval_sample_steps=25, lr_dual_ru=0.002),
    "full": dict(pretrain_steps=20000, uncond_steps=15000, unlearn_steps=400, eval_per_class=400,
                 channels=(32, 64), mid_block=True, batch=128, fu_train_size=256, fu_unlearn_steps=600,
                 lr_schedule="one_cycle", prompt_tokens=16, text_init_scale=1.0, unlearn_sample_steps=25,
                 eval_sample_steps=25, lr_dual_ru=0.002),
}
#: the preset entries that determine the pretrained models (the cache fingerprint)
PRETRAIN_KEYS = ("pretrain_steps", "uncond_steps", "channels", "mid_block", "batch", "fu_train_size",
                 "lr_schedule", "prompt_tokens", "text_init_scale")


@dataclass(frozen=True)
class RehearseConfig:
    out: str = "runs/rehearse"
    size: str = "quick"
    seed: int = 0
    digit: int = 3
    methods: tuple[str, ...] = ("ru", "lu", "esd", "fu", "siss")
    timesteps: int = 100
    sample_steps: int = 0
    guidance: float = 3.0
    ru_budget_factor: float = 1.0
    lu_budget: float = -0.5
    lu_constraint: str = "log_likelihood_ratio"
    esd_eta: float = 1.0
    lr: float = 1e-3
    unlearn_lr: float = 3e-3
    lora_targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
    lr_dual_ru: float = 0.0
    lr_dual_lu: float = 0.1
    fu_forget: int = 4
    fu_gap_fraction: float = 0.1
    fu_budget_factor: float = 0.0
    fu_lr: float = 5e-4
    fu_lr_dual: float = 2.0
    fu_forget_draws: int = 16
    fu_eval_draws: int = 500
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
        if self.sample_steps < 0:
            raise ValueError(f"sample_steps must be >= 0 (0: the size preset's), got {self.sample_steps}")
        if self.lr_dual_ru < 0:
            raise ValueError(f"lr_dual_ru must be >= 0 (0: the size preset's), got {self.lr_dual_ru}")
        if self.fu_gap_fraction < 0 or self.fu_budget_factor < 0:
            raise ValueError(f"fu_gap_fraction and fu_budget_factor must be >= 0, got "
                             f"{self.fu_gap_fraction}, {self.fu_budget_factor}")
        if self.fu_eval_draws < 2 or self.fu_forget_draws < 1:
            raise ValueError(f"fu_eval_draws must be >= 2 and fu_forget_draws >= 1, got "
                             f"{self.fu_eval_draws}, {self.fu_forget_draws}")

    @property
    def preset(self) -> dict:
        return PRESETS[self.size]

    @property
    def eval_sample_steps(self) -> int:
        return self.sample_steps or self.preset["eval_sample_steps"]


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


def lr_schedule(opt, kind: str, steps: int):
    """``"one_cycle"``: warm up over 5% of the steps, cosine decay to ~0. ``"wsd"`` (warmup-stable-decay):
    warm up over 5%, constant, linear decay to 0 over the last 30%. Cross-attention conditioning
    appears only after a plateau of a few hundred steps at the peak rate (docs/scale.md "Offline
    rehearsal"); a short one-cycle run has decayed its rate before then, a WSD run has not."""
    if kind == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps,
                                                   pct_start=0.05)
    if kind == "wsd":
        warm, decay = max(1, int(0.05 * steps)), max(1, int(0.3 * steps))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0, (steps - s) / decay))
    raise ValueError(f"lr_schedule must be 'one_cycle' or 'wsd', got {kind!r}")


def _pretrain(unet, x, eps_fn_cond, steps, batch, lr, scheduler, seed, desc, extra_params=(), schedule="one_cycle"):
    ab = scheduler.alphas_cumprod.double()
    T = ab.numel()
    g = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = lr_schedule(opt, schedule, steps)
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
    tok = builders.build_word_tokenizer(words, model_max_length=pre["prompt_tokens"])
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=cfg.seed, init_scale=pre["text_init_scale"])
    unet = builders.build_cond_unet(block_out_channels=pre["channels"], mid_block=pre["mid_block"], seed=cfg.seed)
    sch = builders.build_scheduler(cfg.timesteps, beta_start=0.1 / cfg.timesteps, beta_end=20.0 / cfg.timesteps)
    from scale.models import encode_prompts

    emb = encode_prompts(tok, te, [PROMPT.format(i) for i in range(10)])
    null = encode_prompts(tok, te, [""], check_nonempty=False)

    def eps_fn(net, x_t, t, idx, g):
        e = emb[y[idx]].clone()
        e[torch.rand((idx.shape[0],), generator=g) < 0.15] = null[0]  # prompt dropout: the null prompt
        return net(x_t, t, encoder_hidden_states=e).sample

    _pretrain(unet, x, eps_fn, pre["pretrain_steps"], pre["batch"], cfg.lr * 2, sch, cfg.seed, "pretrain/concept",
              schedule=pre["lr_schedule"])
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
              min(pre["batch"], x_train.shape[0]), cfg.lr * 2, sch, cfg.seed + 1, "pretrain/ddpm")  # one-cycle
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
    per = max(1, 512 // n)  # digits sampled together in one batch (per-sample prompt embeddings)
    for lo in range(0, 10, per):
        ks = list(range(lo, min(10, lo + per)))
        emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT.format(k) for k in ks])
        emb = emb.repeat_interleave(n, 0)
        x = _to_pixels(sample_images(guided_eps_fn(unet, emb, null, cfg.guidance), models.sample_shape,
                                     models.alphas_cumprod, cfg.eval_sample_steps, emb.shape[0], g, batch=emb.shape[0]))
        with torch.no_grad():
            pred = clf(x).argmax(1)
        for j, k in enumerate(ks):
            acc[k] = float((pred[j * n:(j + 1) * n] == k).float().mean())
            imgs[k] = x[j * n:(j + 1) * n]
    retained = [k for k in range(10) if k != cfg.digit]
    fake_ret = torch.cat([imgs[k] for k in retained])
    real_ret = x_real[y_real != cfg.digit]
    kid_mean, kid_std = kid(real_ret, fake_ret, feat, subset_size=min(200, fake_ret.shape[0]), seed=seed)
    kid_se = kid_standard_error(real_ret, fake_ret, feat, seed=seed)
    return {"accuracy_per_class": acc, "accuracy_unlearned": acc[cfg.digit],
            "accuracy_retained": float(np.mean([acc[k] for k in retained])),
            "kid_retained": kid_mean, "kid_retained_std": kid_std, "kid_retained_se": kid_se}


def evaluate_ddpm(unet, scheduler, x_forget, x_retain, feat, cfg: RehearseConfig, seed: int) -> dict:
    """Denoising losses on seeded systematic draws (``fu_eval_draws`` per forget image, 64 per retained
    image; paired across models), nearest-neighbour distances of generated images, KID to the
    training images."""
    ab = scheduler.alphas_cumprod.double()
    n = cfg.preset["eval_per_class"] * 4
    gen = sample_images(lambda x, t: unet(x, t).sample, (1, 8, 8), ab, cfg.eval_sample_steps, n,
                        torch.Generator().manual_seed(seed))
    gen = _to_pixels(gen)
    nn_forget = nearest_neighbour_similarity(gen, x_forget)["nn_l2"]
    nn_retain = nearest_neighbour_similarity(gen, x_retain)["nn_l2"]
    return {
        "forget_loss": fixed_draw_losses(unet, x_forget, ab, cfg.fu_eval_draws, seed).double().mean(0).tolist(),
        "retain_loss": float(fixed_draw_losses(unet, x_retain, ab, 64, seed + 1).double().mean()),
        "nn_l2_forget": nn_forget, "nn_l2_retain_mean": float(np.mean(nn_retain)),
        "kid_train": kid(x_retain, gen, feat, subset_size=min(100, x_retain.shape[0], n), seed=seed)[0],
        "kid_train_se": kid_standard_error(x_retain, gen, feat, seed=seed),
    }


def kid_standard_error(real: torch.Tensor, fake: torch.Tensor, feat, groups: int = 4, seed: int = 0) -> float:
    """Standard error of a KID estimate: both image sets are shuffled (seeded) and split into ``groups``
    disjoint equal groups; each group pair gives an independent unbiased MMD^2 (torchmetrics, the whole
    group as the one subset), and ``se = sd(group estimates) / sqrt(groups)``. For distributions that
    differ this matches the full-sample estimate's standard error to first order; for equal ones (a
    degenerate U-statistic) it is conservative by about ``sqrt(groups)``."""
    g = torch.Generator().manual_seed(seed + 99)
    k = min(real.shape[0], fake.shape[0]) // groups
    if k < 2:
        raise ValueError(f"KID's standard error needs at least {2 * groups} real and generated images, got "
                         f"{real.shape[0]}, {fake.shape[0]}")
    pr, pf = torch.randperm(real.shape[0], generator=g), torch.randperm(fake.shape[0], generator=g)
    est = [kid(real[pr[j * k:(j + 1) * k]], fake[pf[j * k:(j + 1) * k]], feat, subset_size=k, subsets=1,
               seed=seed + j)[0] for j in range(groups)]
    return float(np.std(est, ddof=1) / np.sqrt(groups))


def _kid_text(mean: float, se: float | None) -> str:
    """``1.2e-03 +- 4.0e-04``: a KID near zero is only meaningful next to its standard error."""
    return f"{mean:.1e}" + ("" if se is None else f" +- {se:.1e}")


def fixed_draw_losses(unet, images: torch.Tensor, alphas_cumprod: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Denoising loss of every image at ``draws`` seeded (timestep, noise) draws: (draws, N), float32.

    Timesteps are a systematic sample of the uniform law (``t_j = floor((u + j) T / draws) mod T``,
    one random offset ``u`` per image), so the mean is unbiased for ``E_t`` and most of the loss's
    variance, which is across timesteps, cancels. The same seed gives the same draws for any model:
    before/after differences are paired."""
    from scale.data import denoising_losses

    g = torch.Generator().manual_seed(seed)
    n, T = images.shape[0], alphas_cumprod.numel()
    u = torch.rand((1, n), generator=g, dtype=torch.float64)
    t = (((u + torch.arange(draws, dtype=torch.float64).reshape(-1, 1)) * T / draws).floor().long()) % T
    noise = torch.randn((draws, *images.shape), generator=g)
    rep = images.unsqueeze(0).expand(draws, *images.shape).reshape(-1, *images.shape[1:])
    return denoising_losses(unet, rep, t.reshape(-1), noise.reshape(-1, *images.shape[1:]),
                            alphas_cumprod).reshape(draws, n)


def memorisation_gap(unet, alphas_cumprod, x_retain, x_heldout, draws: int, seed: int) -> dict:
    """``G = mean loss on held-out digits - mean loss on the retained training images`` (the
    pretrained DDPM's generalisation gap in denoising-loss units) and its standard error, from
    ``draws`` seeded draws per image (images are the sampling unit of the standard error)."""
    l_r = fixed_draw_losses(unet, x_retain, alphas_cumprod, draws, seed).double().mean(0)
    l_h = fixed_draw_losses(unet, x_heldout, alphas_cumprod, draws, seed + 1).double().mean(0)
    se = float(torch.sqrt(l_r.var() / l_r.numel() + l_h.var() / l_h.numel()))
    return {"retain_loss": float(l_r.mean()), "heldout_loss": float(l_h.mean()),
            "gap": float(l_h.mean() - l_r.mean()), "gap_se": se}


def fu_budgets(loss_forget_pre: torch.Tensor, gap: float, fraction: float) -> torch.Tensor:
    """FU budgets ``b_i = l_i(pretrained) + fraction * G`` (docs/scale.md "Offline rehearsal"): raise each
    forget image's denoising loss by ``fraction`` of the memorisation gap ``G``. ``fraction = 1`` asks
    for the loss of an average unseen image, about what retraining without the image gives
    (measured); smaller fractions are what a short fine-tuning run can reach inside the dual domain."""
    return loss_forget_pre.double() + fraction * gap


def calibrate_ru_budget(cfg: RehearseConfig, model: Path, out: Path, steps: int = 4) -> float:
    """Path KL(q_base || q_concept) of the pretrained model: the RU dual-only estimate at lam = 0
    (composed target = the base model). RU budgets are set as a multiple of it, so that the
    constraint is active (KL(p||q_i) starts at 0 for p = q_i) and reachable with sum(lam) < 1."""
    import shutil

    from scale import concept

    shutil.rmtree(out, ignore_errors=True)
    concept.run(concept.ConceptConfig(
        model=str(model), out=str(out), method="ru_dual_only", concepts=(PROMPT.format(cfg.digit),),
        budgets=(1.0,), lr_dual=0.0, sample_steps=cfg.preset["unlearn_sample_steps"], dual_only_steps=steps,
        train=TrainConfig(steps=0, batch_size=16, micro_batch=16, cpu=True, seed=cfg.seed + 3)))
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


# ------------------------------------------------------------------ the rehearsal


def run(cfg: RehearseConfig) -> dict:
    """Run the rehearsal; write ``summary.json`` and ``report.md`` into ``cfg.out``; return the summary."""
    from scale import concept, data
    from scale.models import load_concept_models, load_ddpm_models
    from scale.sample import load_unlearned_unet
    from toy.core.runs import clear_run_dir

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
                             | {"preset": {k: list(pre[k]) if isinstance(pre[k], tuple) else pre[k] for k in PRETRAIN_KEYS}},
                             sort_keys=True)
    pdir = out / "pretrained"
    g = torch.Generator().manual_seed(cfg.seed + 7)
    perm = torch.randperm(x.shape[0], generator=g)
    sub = perm[:pre["fu_train_size"]]
    held = perm[pre["fu_train_size"]:pre["fu_train_size"] + 256]  # never trained on: the memorisation gap
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
                lr_dual=cfg.lr_dual_lu if mth == "lu" else (cfg.lr_dual_ru or pre["lr_dual_ru"]),
                lu_constraint=cfg.lu_constraint, esd_sampler="ancestral",
                sample_steps=pre["unlearn_sample_steps"], dual_only_steps=max(10, pre["unlearn_steps"] // 3),
                lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, classifier_t_min=cfg.timesteps // 10,
                train=TrainConfig(steps=pre["unlearn_steps"], batch_size=16, micro_batch=16, lr=cfg.unlearn_lr,
                                  cpu=True, checkpoint_every=max(1, pre["unlearn_steps"]), seed=cfg.seed))
            clear_run_dir(ccfg.out)  # the rehearsal's own sub-runs start afresh each time
            res = concept.run(ccfg)
            m2 = load_concept_models(str(pdir / "concept"))
            unet = load_unlearned_unet(m2, str(out / "runs" / mth))
            ev = evaluate_concept(m2, unet, clf, feat, x, y, cfg, cfg.seed + 100)
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
        x_sub = _to_pixels(x[sub])
        x_forget, x_retain = x_sub[:cfg.fu_forget], x_sub[cfg.fu_forget:]
        x_heldout = _to_pixels(x[held])
        summary["ddpm_before"] = evaluate_ddpm(dm.unet, dm.scheduler, x_forget, x_retain, feat, cfg, cfg.seed + 200)
        # budgets from the memorisation gap, on seeded draws shared with the after-unlearning check
        eval_seed, D = cfg.seed + 200, cfg.fu_eval_draws  # the draws of evaluate_ddpm's forget_loss
        l_pre = fixed_draw_losses(dm.unet, x_forget, ab, D, eval_seed).double()
        mem = memorisation_gap(dm.unet, ab, x_retain, x_heldout, 32, cfg.seed + 300)
        if cfg.fu_budget_factor > 0:
            budgets = cfg.fu_budget_factor * l_pre.mean(0)
        else:
            budgets = fu_budgets(l_pre.mean(0), mem["gap"], cfg.fu_gap_fraction)
        summary["fu_budget_rule"] = (f"{cfg.fu_budget_factor} x pretrained forget loss" if cfg.fu_budget_factor > 0
                                     else f"pretrained forget loss + {cfg.fu_gap_fraction} x memorisation gap")
        summary["memorisation"] = mem | {"forget_loss_pre": l_pre.mean(0).tolist(), "budgets": budgets.tolist(),
                                         "draws": D}
        for mth in data_methods:
            dcfg = data.DataConfig(
                model=str(pdir / "ddpm"), out=str(out / "runs" / mth), method=mth, train_dir=str(out / "digits_train"),
                forget=tuple(forget_names), budgets=tuple(budgets.tolist()), lr_dual=cfg.fu_lr_dual,
                siss_form="project", siss_weight=1.0, forget_draws=cfg.fu_forget_draws,
                train=TrainConfig(steps=pre["fu_unlearn_steps"], batch_size=32, micro_batch=32,
                                  lr=cfg.fu_lr, cpu=True, checkpoint_every=max(1, pre["fu_unlearn_steps"]), seed=cfg.seed))
            clear_run_dir(dcfg.out)
            res = data.run(dcfg)
            dm2 = load_ddpm_models(str(pdir / "ddpm"))
            unet = load_unlearned_unet(dm2, str(out / "runs" / mth))
            ev = evaluate_ddpm(unet, dm2.scheduler, x_forget, x_retain, feat, cfg, cfg.seed + 200)
            l_post = fixed_draw_losses(unet, x_forget, ab, D, eval_seed).double()
            if cfg.fu_budget_factor > 0:  # after - budget on paired draws, and its standard error
                se = ((l_post - cfg.fu_budget_factor * l_pre).var(0) / D).sqrt()
            else:
                se = ((l_post - l_pre).var(0) / D + (cfg.fu_gap_fraction * mem["gap_se"]) ** 2).sqrt()
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
        lines += ["| model | acc. unlearned digit | acc. retained digits | KID retained +- se | lam | budget | "
                  "constraint (last 10) | verdict |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| pretrained | {b['accuracy_unlearned']:.3f} | {b['accuracy_retained']:.3f} | "
                  f"{_kid_text(b['kid_retained'], b.get('kid_retained_se'))} | | | | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "accuracy_unlearned" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {a['accuracy_unlearned']:.3f} | {a['accuracy_retained']:.3f} | "
                             f"{_kid_text(a['kid_retained'], a.get('kid_retained_se'))} | "
                             f"{np.round(np.asarray(r['lam'], dtype=float), 4).tolist()} | "
                             + ("n/a" if mth == "esd" else f"{np.asarray(r['budgets'], dtype=float).tolist()}") + " | "
                             f"{np.round(r['constraint_last10'], 4).tolist()} | {_verdict_text(r.get('verdict'))} |")
        lines.append("")
    if "ddpm_before" in s:
        b = s["ddpm_before"]
        lines += ["| model | forget loss | retain loss | NN L2 to forget | NN L2 to retain (mean) | KID train +- se | n*lam | verdict |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| pretrained | {np.round(b['forget_loss'], 3).tolist()} | {b['retain_loss']:.3f} | "
                  f"{np.round(b['nn_l2_forget'], 2).tolist()} | {b['nn_l2_retain_mean']:.2f} | {_kid_text(b['kid_train'], b.get('kid_train_se'))} | | |"]
        for mth, r in s["methods"].items():
            if "after" in r and "forget_loss" in r["after"]:
                a = r["after"]
                lines.append(f"| {mth} | {np.round(a['forget_loss'], 3).tolist()} | {a['retain_loss']:.3f} | "
                             f"{np.round(a['nn_l2_forget'], 2).tolist()} | {a['nn_l2_retain_mean']:.2f} | "
                             f"{_kid_text(a['kid_train'], a.get('kid_train_se'))} | "
                             f"{np.round(np.asarray(r['lam_times_n'], dtype=float), 3).tolist()} | {_verdict_text(r.get('verdict'))} |")
        if "memorisation" in s:
            mem = s["memorisation"]
            lines += ["", f"FU budgets ({s['fu_budget_rule']}): memorisation gap = held-out {mem['heldout_loss']:.4f} - "
                      f"retained {mem['retain_loss']:.4f} = {mem['gap']:.4f} (se {mem['gap_se']:.4f}); "
                      f"forget losses ({mem['draws']} fixed draws) {np.round(mem['forget_loss_pre'], 4).tolist()}, "
                      f"budgets {np.round(mem['budgets'], 4).tolist()}", "",
                      "| method | forget loss (fixed draws) | margin to budget +- se | training estimate (last 10) +- se | n*lam |",
                      "|---|---|---|---|---|"]
            for mth, r in s["methods"].items():
                if "budget_margin" in r:
                    lines.append(
                        f"| {mth} | {np.round(r['forget_loss_fixed_draws'], 4).tolist()} | "
                        + ", ".join(f"{m:+.4f} +- {e:.4f}" for m, e in zip(r["budget_margin"], r["budget_margin_se"]))
                        + " | " + ", ".join(f"{m:.4f} +- {e:.4f}" for m, e in zip(r["constraint_last10"], r["constraint_last10_se"]))
                        + f" | {np.round(np.asarray(r['lam_times_n'], dtype=float), 3).tolist()} |")
    if s.get("methods"):
        lines += ["", "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in VERDICT_RULES.items()), "", "## Pictures", ""]
        for mth, r in s["methods"].items():
            figs = sorted(Path(r["run"]).glob("figures/grid_step*.png"))
            for f in figs[-1:] + [Path(r["run"]) / "figures" / "curves.png"]:
                if f.is_file():
                    rel = f.relative_to(Path(s["config"]["out"])) if Path(s["config"]["out"]) in f.parents else f
                    lines += [f"![{mth}: {f.name}]({rel})", ""]
    return "\n".join(lines) + "\n"


#: what each method's verdict checks (``method_verdict``)
VERDICT_RULES = {
    "ru/ru_dual_only": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1, "
                       "constraint (last 10) >= budget - 3 se",
    "lu": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1, "
          "constraint (last 10) <= budget + 3 se",
    "esd": "unlearned-digit accuracy <= 0.25 x pretrained, retained accuracy >= pretrained - 0.1 (no budget)",
    "fu": "every forget image's training estimate (last 10) >= budget - 3 se",
    "siss/siss_is": "every forget image's loss (fixed draws) rose above the pretrained one",
}


def method_verdict(mth: str, r: dict, before: dict, last10: np.ndarray | None = None) -> dict:
    """Pass/fail of one rehearsed method against ``VERDICT_RULES`` (``last10``: the last 10 rows of its
    constraint estimates, (10, m), for the standard errors)."""
    reasons = []
    if mth in ("ru", "ru_dual_only", "lu", "esd"):
        a = r["after"]
        if a["accuracy_unlearned"] > 0.25 * before["accuracy_unlearned"]:
            reasons.append(f"unlearned accuracy {a['accuracy_unlearned']:.3f} > 0.25 x {before['accuracy_unlearned']:.3f}")
        if a["accuracy_retained"] < before["accuracy_retained"] - 0.1:
            reasons.append(f"retained accuracy {a['accuracy_retained']:.3f} < {before['accuracy_retained']:.3f} - 0.1")
        if mth != "esd" and last10 is not None:
            m = last10.mean(0)
            se = last10.std(0, ddof=1) / np.sqrt(last10.shape[0])
            b = np.asarray(r["budgets"], dtype=float)
            bad = m > b + 3 * se if mth == "lu" else m < b - 3 * se
            if np.any(bad):
                reasons.append(f"constraint {np.round(m, 4).tolist()} +- {np.round(se, 4).tolist()} vs budget {b.tolist()}")
    elif mth == "fu":
        m, se, b = (np.asarray(r[k], dtype=float) for k in ("constraint_last10", "constraint_last10_se", "budgets"))
        if np.any(m < b - 3 * se):
            reasons.append(f"forget estimate {np.round(m, 4).tolist()} below budget {np.round(b, 4).tolist()} - 3 se")
    else:
        rise = np.asarray(r["after"]["forget_loss"]) - np.asarray(before["forget_loss"])
        if np.any(rise <= 0):
            reasons.append(f"forget loss change {np.round(rise, 4).tolist()}")
    return {"passed": not reasons, "reasons": reasons}


def _verdict_text(v: dict | None) -> str:
    if v is None:
        return ""
    return "pass" if v["passed"] else "**fail**: " + "; ".join(v["reasons"])
