"""Evaluation of the rehearsal's models before and after unlearning: generated digits' classifier
accuracy and KID (concept), denoising losses on paired seeded draws, nearest-neighbour distances
and KID (data), the memorisation gap and the FU budgets built on it.

Every random draw is a named stream of the rehearsal seed (``toy.core.seeding``): ``concept-eval:*``,
``ddpm-eval:*``, ``memorisation-gap:*``. The streams do not depend on the model evaluated, so
before/after comparisons (and the FU budgets against the after-unlearning losses) are paired."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from scale.evaluate import kid, nearest_neighbour_similarity
from scale.rehearse.config import PROMPT, RehearseConfig
from scale.rehearse.digits import to_pixels
from scale.sample import guided_eps_fn, sample_images
from toy.core.seeding import derive_seed, seeded_generator

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from scale.models import ConceptModels
    from scale.rehearse.digits import DigitClassifier


def evaluate_concept(models: ConceptModels, unet: torch.nn.Module, clf: DigitClassifier, feat: torch.nn.Module,
                     x_real: torch.Tensor, y_real: torch.Tensor, cfg: RehearseConfig) -> dict:
    """Generate ``eval_per_class`` images per digit prompt; classifier accuracy per class; KID of
    the retained classes' images against the real retained digits (classifier features)."""
    from scale.models import encode_prompts

    n = cfg.preset["eval_per_class"]
    null = encode_prompts(models.tokenizer, models.text_encoder, [""], check_nonempty=False)
    g = seeded_generator(cfg.seed, "concept-eval:samples")
    acc, imgs = {}, {}
    per = max(1, 512 // n)  # digits sampled together in one batch (per-sample prompt embeddings)
    for lo in range(0, 10, per):
        ks = list(range(lo, min(10, lo + per)))
        emb = encode_prompts(models.tokenizer, models.text_encoder, [PROMPT.format(k) for k in ks])
        emb = emb.repeat_interleave(n, 0)
        x = to_pixels(sample_images(guided_eps_fn(unet, emb, null, cfg.guidance), models.sample_shape,
                                     models.alphas_cumprod, cfg.eval_sample_steps, emb.shape[0], g, batch=emb.shape[0]))
        with torch.no_grad():
            pred = clf(x).argmax(1)
        for j, k in enumerate(ks):
            acc[k] = float((pred[j * n:(j + 1) * n] == k).float().mean())
            imgs[k] = x[j * n:(j + 1) * n]
    retained = [k for k in range(10) if k != cfg.digit]
    fake_ret = torch.cat([imgs[k] for k in retained])
    real_ret = x_real[y_real != cfg.digit]
    kid_mean, kid_std = kid(real_ret, fake_ret, feat, subset_size=min(200, fake_ret.shape[0]),
                            seed=derive_seed(cfg.seed, "concept-eval:kid"))
    kid_se = kid_standard_error(real_ret, fake_ret, feat, seed=derive_seed(cfg.seed, "concept-eval:kid-se"))
    return {"accuracy_per_class": acc, "accuracy_unlearned": acc[cfg.digit],
            "accuracy_retained": float(np.mean([acc[k] for k in retained])),
            "kid_retained": kid_mean, "kid_retained_std": kid_std, "kid_retained_se": kid_se}


def evaluate_ddpm(unet: torch.nn.Module, scheduler: DDPMScheduler, x_forget: torch.Tensor, x_retain: torch.Tensor,
                  feat: torch.nn.Module, cfg: RehearseConfig) -> dict:
    """Denoising losses on seeded systematic draws (``data_eval_draws`` per forget image, 64 per retained
    image; paired across models), nearest-neighbour distances of generated images, KID to the
    training images."""
    ab = scheduler.alphas_cumprod.double()
    n = cfg.preset["eval_per_class"] * 4
    gen = sample_images(lambda x, t: unet(x, t).sample, (1, 8, 8), ab, cfg.eval_sample_steps, n,
                        seeded_generator(cfg.seed, "ddpm-eval:samples"))
    gen = to_pixels(gen)
    nn_forget = nearest_neighbour_similarity(gen, x_forget)["nn_l2"]
    nn_retain = nearest_neighbour_similarity(gen, x_retain)["nn_l2"]
    return {
        "forget_loss": paired_forget_losses(unet, x_forget, ab, cfg).double().mean(0).tolist(),
        "retain_loss": float(fixed_draw_losses(unet, x_retain, ab, 64, derive_seed(cfg.seed, "ddpm-eval:retain-loss"))
                             .double().mean()),
        "nn_l2_forget": nn_forget, "nn_l2_retain_mean": float(np.mean(nn_retain)),
        "kid_train": kid(x_retain, gen, feat, subset_size=min(100, x_retain.shape[0], n),
                         seed=derive_seed(cfg.seed, "ddpm-eval:kid"))[0],
        "kid_train_se": kid_standard_error(x_retain, gen, feat, seed=derive_seed(cfg.seed, "ddpm-eval:kid-se")),
    }


def paired_forget_losses(unet: torch.nn.Module, x_forget: torch.Tensor, alphas_cumprod: torch.Tensor, cfg: RehearseConfig) -> torch.Tensor:
    """The forget images' denoising losses on the ``data_eval_draws`` fixed draws of the stream
    ``ddpm-eval:forget-loss``, (draws, m): the same draws for every model (the pretrained one, whose
    losses set the FU budgets, and each unlearned one), so differences are paired."""
    return fixed_draw_losses(unet, x_forget, alphas_cumprod, cfg.data_eval_draws,
                             derive_seed(cfg.seed, "ddpm-eval:forget-loss"))


def kid_standard_error(real: torch.Tensor, fake: torch.Tensor, feat: torch.nn.Module, groups: int = 4, seed: int = 0) -> float:
    """Standard error of a KID estimate: both image sets are shuffled (seeded) and split into ``groups``
    disjoint equal groups; each group pair gives an independent unbiased MMD^2 (torchmetrics, the whole
    group as the one subset), and ``se = sd(group estimates) / sqrt(groups)``. For distributions that
    differ this matches the full-sample estimate's standard error to first order; for equal ones (a
    degenerate U-statistic) it is conservative by about ``sqrt(groups)``. Streams of ``seed``:
    ``kid-se:shuffle`` and ``kid-se:group<j>`` (torchmetrics' subset draw of group ``j``)."""
    g = seeded_generator(seed, "kid-se:shuffle")
    k = min(real.shape[0], fake.shape[0]) // groups
    if k < 2:
        raise ValueError(f"KID's standard error needs at least {2 * groups} real and generated images, got "
                         f"{real.shape[0]}, {fake.shape[0]}")
    pr, pf = torch.randperm(real.shape[0], generator=g), torch.randperm(fake.shape[0], generator=g)
    est = [kid(real[pr[j * k:(j + 1) * k]], fake[pf[j * k:(j + 1) * k]], feat, subset_size=k, subsets=1,
               seed=derive_seed(seed, f"kid-se:group{j}"))[0] for j in range(groups)]
    return float(np.std(est, ddof=1) / np.sqrt(groups))


def fixed_draw_losses(unet: torch.nn.Module, images: torch.Tensor, alphas_cumprod: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
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


def memorisation_gap(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, x_retain: torch.Tensor,
                     x_heldout: torch.Tensor, draws: int, seed: int) -> dict:
    """``G = mean loss on held-out digits - mean loss on the retained training images`` (the
    pretrained DDPM's generalisation gap in denoising-loss units) and its standard error, from
    ``draws`` seeded draws per image (images are the sampling unit of the standard error; streams
    ``memorisation-gap:retained`` and ``memorisation-gap:held-out`` of ``seed``)."""
    l_r = fixed_draw_losses(unet, x_retain, alphas_cumprod, draws, derive_seed(seed, "memorisation-gap:retained"))
    l_h = fixed_draw_losses(unet, x_heldout, alphas_cumprod, draws, derive_seed(seed, "memorisation-gap:held-out"))
    l_r, l_h = l_r.double().mean(0), l_h.double().mean(0)
    se = float(torch.sqrt(l_r.var() / l_r.numel() + l_h.var() / l_h.numel()))
    return {"retain_loss": float(l_r.mean()), "heldout_loss": float(l_h.mean()),
            "gap": float(l_h.mean() - l_r.mean()), "gap_se": se}


def forward_kl_budgets(loss_forget_pre: torch.Tensor, gap: float, fraction: float) -> torch.Tensor:
    """FU budgets ``b_i = l_i(pretrained) + fraction * G`` (docs/scale.md "Offline rehearsal"): raise each
    forget image's denoising loss by ``fraction`` of the memorisation gap ``G``. ``fraction = 1`` asks
    for the loss of an average unseen image, about what retraining without the image gives
    (measured); smaller fractions are what a short fine-tuning run can reach inside the dual domain."""
    return loss_forget_pre.double() + fraction * gap
