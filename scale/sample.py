"""Sampling from (unlearned) diffusers models: the DDPM sampler the model's scheduler config
describes (``scheduler_sample_images``: its timestep spacing, ``variance_type`` and
``clip_sample``, the sampler the model was trained with, for every evaluation sample), the
ancestral sampler on a strided schedule with variance ``beta`` (``sample_images``: the chain whose
path KL the RU constraint estimates), classifier-free guidance for text conditioning, VAE decoding
for latent models, and ``dualunlearn scale sample``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from toy.core.diffusion import ancestral_step, strided_timesteps
from toy.core.hints import EpsModel
from toy.core.seeding import seeded_generator

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from scale.models import ConceptModels, DDPMModels

log = logging.getLogger(__name__)


def sample_images(eps_fn: EpsModel, shape: Sequence[int], alphas_cumprod: torch.Tensor, num_steps: int, n: int,
                  generator: torch.Generator, device: torch.device | str = "cpu", batch: int = 256) -> torch.Tensor:
    """Draw ``n`` samples with ``eps_fn(x_t, t) -> eps`` (float32), in batches; returns (n, *shape)
    on CPU. All noise comes from ``generator`` (CPU) so results do not depend on the device."""
    ab = alphas_cumprod.double()
    ts = strided_timesteps(ab.numel(), num_steps)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        x = torch.randn((b, *shape), generator=generator).to(device)
        for s, t in enumerate(ts.tolist()):
            ab_t = torch.full((b,), float(ab[t]), device=device)
            last = s == ts.numel() - 1
            ab_prev = torch.full((b,), 1.0 if last else float(ab[ts[s + 1]]), device=device)
            with torch.no_grad():
                eps = eps_fn(x, torch.full((b,), t, device=device, dtype=torch.long)).float()
            noise = None if last else torch.randn((b, *shape), generator=generator).to(device)
            x = ancestral_step(x, eps, ab_t, ab_prev, noise)
        if not torch.all(torch.isfinite(x)):
            raise FloatingPointError("sampler produced non-finite values")
        out.append(x.cpu())
    return torch.cat(out)


#: DDPM variance types ``scheduler_sample_images`` follows; learned variances need a model that
#: predicts them (twice the output channels), which the scale tier does not load.
SCHEDULER_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


def scheduler_timesteps(scheduler: DDPMScheduler, num_steps: int) -> list[tuple[int, int]]:
    """``(t, t_prev)`` pairs the scheduler visits with ``num_steps`` inference steps (its own
    ``timestep_spacing`` and ``steps_offset``); ``t_prev = -1`` means ``alpha_bar_prev = 1``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    return [(int(t), int(sched.previous_timestep(t))) for t in sched.timesteps]


def scheduler_step(x_t: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor,
                   noise: torch.Tensor | None, variance_type: str, clip_sample: bool,
                   clip_range: float = 1.0) -> torch.Tensor:
    """One DDPM reverse step as the scheduler config defines it (Ho et al. eq. 7), float32:
    ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, clipped to ``[-clip_range, clip_range]`` if
    ``clip_sample``; mean ``sqrt(ab_prev) beta / (1 - ab_t) x0 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t``
    with ``alpha = ab_t / ab_prev``, ``beta = 1 - alpha``; variance ``beta (1 - ab_prev)/(1 - ab_t)``
    (``fixed_small``, floored at 1e-20) or ``beta`` (``fixed_large``). ``noise=None``: the mean."""
    if variance_type not in SCHEDULER_VARIANCES:
        raise ValueError(f"variance_type {variance_type!r} is not supported; use one of {SCHEDULER_VARIANCES}")
    ab_t, ab_prev = ab_t.float(), ab_prev.float()
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    x0 = (x_t.float() - (1 - ab_t) ** 0.5 * eps.float()) / ab_t ** 0.5
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    mean = (ab_prev ** 0.5 * beta) / (1 - ab_t) * x0 + alpha ** 0.5 * (1 - ab_prev) / (1 - ab_t) * x_t.float()
    if noise is None:
        return mean
    var = beta if variance_type == "fixed_large" else torch.clamp((1 - ab_prev) / (1 - ab_t) * beta, min=1e-20)
    return mean + var ** 0.5 * noise.float()


def scheduler_sample_images(eps_fn: EpsModel, shape: Sequence[int], scheduler: DDPMScheduler, num_steps: int, n: int,
                            generator: torch.Generator, device: torch.device | str = "cpu", batch: int = 256) -> torch.Tensor:
    """Draw ``n`` samples with the DDPM sampler the model's scheduler config describes (the one it
    was trained with): returns (n, *shape) float32 on CPU, not clamped. For ``n <= batch`` the
    noise is drawn exactly as ``diffusers.DDPMPipeline`` draws it (initial noise for the batch, then
    one draw per step with ``t > 0``), so a CPU generator gives the pipeline's samples."""
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler predicts {cfg.get('prediction_type')!r}; only 'epsilon' is supported")
    if cfg.get("thresholding", False):
        raise ValueError("scheduler uses dynamic thresholding, which this sampler does not implement")
    variance_type = cfg.get("variance_type", "fixed_small")
    if variance_type not in SCHEDULER_VARIANCES:
        raise ValueError(f"scheduler variance_type {variance_type!r} is not supported; use one of {SCHEDULER_VARIANCES}")
    clip, clip_range = bool(cfg.get("clip_sample", True)), float(cfg.get("clip_sample_range", 1.0))
    ab = scheduler.alphas_cumprod.float()  # float32, as diffusers steps with it
    steps = scheduler_timesteps(scheduler, num_steps)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        x = torch.randn((b, *shape), generator=generator).to(device)
        for t, t_prev in steps:
            with torch.no_grad():
                eps = eps_fn(x, torch.full((b,), t, device=device, dtype=torch.long)).float()
            noise = torch.randn((b, *shape), generator=generator).to(device) if t > 0 else None
            ab_prev = ab[t_prev] if t_prev >= 0 else torch.tensor(1.0)
            x = scheduler_step(x, eps, ab[t].to(device), ab_prev.to(device), noise, variance_type, clip, clip_range)
        if not torch.all(torch.isfinite(x)):
            raise FloatingPointError("sampler produced non-finite values")
        out.append(x.cpu())
    return torch.cat(out)


def guided_eps_fn(unet: torch.nn.Module, emb_cond: torch.Tensor, emb_null: torch.Tensor, guidance: float) -> EpsModel:
    """Classifier-free guidance ``eps_null + g (eps_c - eps_null)``; ``g = 1`` is the conditional model."""

    def fn(x, t):
        b = x.shape[0]
        ec = emb_cond.expand(b, *emb_cond.shape[1:])
        if guidance == 1.0:
            return unet(x, t, encoder_hidden_states=ec).sample.float()
        en = emb_null.expand(b, *emb_null.shape[1:])
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([en, ec])).sample.float()
        e_null, e_c = out.chunk(2)
        return e_null + guidance * (e_c - e_null)

    return fn


def decode(models: ConceptModels | DDPMModels, x: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] through the VAE (pixel-space models return ``x`` clamped)."""
    if getattr(models, "vae", None) is None:
        return x.clamp(-1, 1)
    dev = next(models.vae.parameters()).device
    with torch.no_grad():
        img = models.vae.decode(x.to(dev) / models.latent_scale).sample.float().cpu()
    return img.clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_unlearned_unet(models: ConceptModels | DDPMModels, run_dir: str | None,
                        trainable_mode: str | None = None) -> torch.nn.Module:
    """Apply a run's trainable weights (``<run>/checkpoint/trainable.safetensors``) to the loaded UNet."""
    if not run_dir:
        return models.unet
    import json

    from safetensors.torch import load_file

    from scale.models import ESD_X_TARGETS, Trainable

    run_dir = Path(run_dir)
    wpath = run_dir / "checkpoint" / "trainable.safetensors"
    if not wpath.is_file():
        raise ValueError(f"run directory {str(run_dir)!r} has no checkpoint/trainable.safetensors")
    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    mode = trainable_mode or cfg.get("trainable", "full")
    tr = Trainable(models.unet, mode, cfg.get("lora_rank", 4), cfg.get("lora_alpha") or None,
                   tuple(cfg.get("lora_targets") or ESD_X_TARGETS))
    tr.load_state_dict(load_file(str(wpath)))
    models.unet.requires_grad_(False).eval()
    return models.unet


@dataclass(frozen=True)
class SampleConfig:
    model: str = ""
    kind: str = "concept"  # concept (text-conditioned) | ddpm (unconditional)
    run: str = ""          # optional unlearning run directory whose weights are applied
    prompts: tuple[str, ...] = ()
    num_per_prompt: int = 8
    guidance: float = 1.0
    num_steps: int = 50
    sampler: str = "scheduler"  # scheduler (the model's own config) | ancestral (strided, variance beta)
    seed: int = 0
    out: str = "runs/samples"
    local_files_only: bool = False
    cpu: bool = False

    def __post_init__(self):
        if self.kind not in ("concept", "ddpm"):
            raise ValueError(f"kind must be 'concept' or 'ddpm', got {self.kind!r}")
        if self.kind == "concept" and not self.prompts:
            raise ValueError("prompts must be given for a text-conditioned model")
        if self.sampler not in ("scheduler", "ancestral"):
            raise ValueError(f"sampler must be 'scheduler' or 'ancestral', got {self.sampler!r}")
        if self.num_per_prompt < 1 or self.num_steps < 1:
            raise ValueError("num_per_prompt and num_steps must be >= 1")


def run(cfg: SampleConfig) -> Path:
    """Write ``samples.npz`` (uint8 images, and prompts) and PNG files into ``cfg.out``."""
    from PIL import Image

    from scale.models import encode_prompts, load_concept_models, load_ddpm_models

    device = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = seeded_generator(cfg.seed, "samples")

    def draw(eps_fn, models):
        if cfg.sampler == "scheduler":
            return scheduler_sample_images(eps_fn, models.sample_shape, models.scheduler, cfg.num_steps,
                                           cfg.num_per_prompt, gen, device)
        return sample_images(eps_fn, models.sample_shape, models.alphas_cumprod, cfg.num_steps,
                             cfg.num_per_prompt, gen, device)

    if cfg.kind == "concept":
        models = load_concept_models(cfg.model, cfg.local_files_only)
        unet = load_unlearned_unet(models, cfg.run).to(device)
        models.text_encoder.to(device)
        if models.vae is not None:
            models.vae.to(device)
        null = encode_prompts(models.tokenizer, models.text_encoder, [""], check_nonempty=False)
        imgs, labels = [], []
        for p in cfg.prompts:
            emb = encode_prompts(models.tokenizer, models.text_encoder, [p])
            x = draw(guided_eps_fn(unet, emb, null, cfg.guidance), models)
            imgs.append(decode(models, x))
            labels += [p] * cfg.num_per_prompt
        images = torch.cat(imgs)
    else:
        models = load_ddpm_models(cfg.model, cfg.local_files_only)
        unet = load_unlearned_unet(models, cfg.run).to(device)
        images = draw(lambda x, t: unet(x, t).sample, models).clamp(-1, 1)
        labels = [""] * images.shape[0]
    arr = to_uint8(images)
    np.savez_compressed(out / "samples.npz", images=arr, prompts=np.array(labels))
    for i, a in enumerate(arr):
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(out / f"{i:05d}.png")
    return out / "samples.npz"
