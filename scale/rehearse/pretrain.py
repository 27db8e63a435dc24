"""Pretraining from scratch of the rehearsal's two models: the text-conditioned UNet (concept
unlearning) and the unconditional DDPM (data unlearning), saved in the diffusers layouts. Their
initialisations and batches are named streams of the rehearsal seed (``concept-model:*``,
``ddpm:*``, ``toy.core.seeding``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from scale import builders
from scale.rehearse.config import PROMPT, RehearseConfig
from toy.core.diffusion import add_noise
from toy.core.objectives import denoising_loss
from toy.core.seeding import derive_seed, seeded_generator

def lr_schedule(opt: torch.optim.Optimizer, kind: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
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


def _pretrain(unet, x, eps_fn_cond, steps, batch, lr, scheduler, g: torch.Generator, desc, extra_params=(),
              schedule="one_cycle"):
    ab = scheduler.alphas_cumprod.double()
    T = ab.numel()
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


def build_conditioning(cfg: RehearseConfig) -> tuple:
    """The concept model's word tokenizer and frozen random CLIP text encoder, as the size preset and
    seed build them (``prompt_tokens``, ``text_init_scale``)."""
    pre = cfg.preset
    words = PROMPT.format(" ".join(str(i) for i in range(10))).split()
    tok = builders.build_word_tokenizer(words, model_max_length=pre["prompt_tokens"])
    te = builders.build_text_encoder(len(tok.get_vocab()), seed=derive_seed(cfg.seed, "concept-model:text-encoder-init"),
                                     init_scale=pre["text_init_scale"])
    return tok, te


def pretrain_concept_model(cfg: RehearseConfig, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    """Train the rehearsal's small text-to-image model on the digits ``x`` with labels ``y``; save it to ``path``."""
    pre = cfg.preset
    tok, te = build_conditioning(cfg)
    unet = builders.build_cond_unet(block_out_channels=pre["channels"], mid_block=pre["mid_block"],
                                    seed=derive_seed(cfg.seed, "concept-model:unet-init"))
    sch = builders.build_scheduler(cfg.timesteps, beta_start=0.1 / cfg.timesteps, beta_end=20.0 / cfg.timesteps)
    from scale.models import encode_prompts

    emb = encode_prompts(tok, te, [PROMPT.format(i) for i in range(10)])
    null = encode_prompts(tok, te, [""], check_nonempty=False)

    def eps_fn(net, x_t, t, idx, g):
        e = emb[y[idx]].clone()
        e[torch.rand((idx.shape[0],), generator=g) < 0.15] = null[0]  # prompt dropout: the null prompt
        return net(x_t, t, encoder_hidden_states=e).sample

    _pretrain(unet, x, eps_fn, pre["pretrain_steps"], pre["batch"], cfg.lr * 2, sch,
              seeded_generator(cfg.seed, "concept-model:pretrain-batches"), "pretrain/concept", schedule=pre["lr_schedule"])
    builders.save_concept_pipeline(path, unet, te, tok, sch)


def pretrain_ddpm(cfg: RehearseConfig, x_train: torch.Tensor, path: Path) -> None:
    pre = cfg.preset
    unet = builders.build_uncond_unet(block_out_channels=pre["channels"], seed=derive_seed(cfg.seed, "ddpm:unet-init"))
    sch = builders.build_scheduler(cfg.timesteps, beta_start=0.1 / cfg.timesteps, beta_end=20.0 / cfg.timesteps)
    _pretrain(unet, x_train, lambda net, x_t, t, idx, g: net(x_t, t).sample, pre["uncond_steps"],
              min(pre["batch"], x_train.shape[0]), cfg.lr * 2, sch, seeded_generator(cfg.seed, "ddpm:pretrain-batches"),
              "pretrain/ddpm")  # one-cycle
    builders.save_ddpm(path, unet, sch)
