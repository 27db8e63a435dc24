"""Diffusers models built from config and saved in the on-disk layouts ``scale.models`` loads: a
small word-level CLIP tokenizer (no vocabulary can be downloaded here), text-conditioned
pixel-space or latent pipelines, and unconditional DDPMs. Used by the offline rehearsal, the tests
and the benchmark; the architectures' sizes are arguments, so the same builders give SD-v1-shaped
UNets for benchmarking.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_word_tokenizer(words: Sequence[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is exactly ``words`` (each a single token, built by
    left-to-right merges) plus single characters; out-of-vocabulary words map to the unknown
    token, so a prompt of unknown words tokenizes to nothing."""
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    merges: list[tuple[str, str]] = []
    for ch in sorted(set("".join(words))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_text_encoder(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                       max_positions: int = 16, seed: int = 0, init_scale: float = 1.0) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder. ``init_scale`` is CLIP's ``initializer_factor`` (it
    multiplies the initial standard deviation of the token/position embeddings and the projections);
    larger values make the hidden states of prompts that differ in one word less alike."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         initializer_factor=init_scale)
    return CLIPTextModel(cfg).eval()


def build_cond_unet(sample_size: int = 8, channels: int = 1, block_out_channels: Sequence[int] = (16, 32),
                    cross_attention_dim: int = 32, layers_per_block: int = 1, attention_head_dim: int = 4,
                    norm_num_groups: int = 8, mid_block: bool = True, seed: int = 0) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups, mid_block_type="UNetMidBlock2DCrossAttn" if mid_block else None)


def build_uncond_unet(sample_size: int = 8, channels: int = 1, block_out_channels: Sequence[int] = (16, 32),
                      layers_per_block: int = 1, norm_num_groups: int = 8, attention: bool = False,
                      seed: int = 0) -> UNet2DModel:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups)


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                    beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=beta_start, beta_end=beta_end, prediction_type="epsilon")


def save_concept_pipeline(path: str | Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                          tokenizer: CLIPTokenizer, scheduler: DDPMScheduler,
                          vae: torch.nn.Module | None = None) -> Path:
    """Write the Stable Diffusion folder layout (``model_index.json`` + one subfolder per part)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "vae": [None, None]}
    if vae is not None:
        vae.save_pretrained(path / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_ddpm(path: str | Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> Path:
    """Write the ``google/ddpm-celebahq-256`` layout: ``config.json`` + weights + ``scheduler_config.json``."""
    path = Path(path)
    unet.save_pretrained(path)
    scheduler.save_pretrained(path)
    return path


# ---------------------------------------------------------------- the published architectures


def build_sd_v1_unet(sample_size: int = 64, seed: int = 0) -> UNet2DConditionModel:
    """Stable Diffusion v1.x's UNet (859.5 M parameters) with random weights: the published config
    (4 latent channels, widths 320/640/1280/1280, two layers per block, cross-attention width 768,
    8 heads, groups of 32, eps 1e-5, sin/cos flipped, no frequency shift); ``sample_size`` 64 is
    512-pixel images, smaller sizes keep CPU tests cheap without changing any weight shape."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, center_input_sample=False,
        flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=768, attention_head_dim=8)


def build_sd_v1_text_encoder(vocab_size: int, layers: int = 12, seed: int = 0) -> CLIPTextModel:
    """A CLIP ViT-L/14 text tower's shape (width 768, 12 heads, MLP 3072, 77 positions, quick-GELU)
    with random weights; ``layers`` 12 is the published depth (fewer keep CPU tests cheap; the
    UNet only sees the 768-wide output)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=layers, num_attention_heads=12, max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def build_sd_v1_scheduler() -> DDPMScheduler:
    """SD v1's noise schedule as a DDPM scheduler: scaled-linear betas 0.00085..0.012 over 1000
    steps, no clipping, steps offset 1 (the published PNDM config read by ``DDPMScheduler``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")


def build_celebahq_ddpm_unet(sample_size: int = 256, seed: int = 0,
                             block_out_channels: Sequence[int] = (128, 128, 256, 256, 512, 512)) -> UNet2DModel:
    """``google/ddpm-celebahq-256``'s UNet2DModel (113.7 M parameters) with random weights: widths
    128/128/256/256/512/512, two layers per block, self-attention in the fifth down block (16x16 at
    256 px) and the matching up block, positional time embedding with ``freq_shift=1`` and
    ``flip_sin_to_cos=False``, ``norm_eps=1e-6``, ``downsample_padding=0``,
    ``attention_head_dim=None`` (one head per attention layer). ``sample_size`` 32 or 64 keeps
    CPU tests cheap without changing any weight shape; narrower ``block_out_channels`` (multiples of
    32) keep everything else of the config for CPU benchmarks."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, center_input_sample=False,
        time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        block_out_channels=tuple(block_out_channels), layers_per_block=2, mid_block_scale_factor=1,
        downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6)


def build_celebahq_scheduler() -> DDPMScheduler:
    """``google/ddpm-celebahq-256``'s scheduler: linear betas 1e-4..0.02 over 1000 steps,
    ``variance_type="fixed_small"``, ``clip_sample=True``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")
