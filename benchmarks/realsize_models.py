"""Real-size random-initialised model folders for the CPU pre-flight (no download): the Stable Diffusion
v1.x UNet (``CompVis/stable-diffusion-v1-4``'s UNet config at latent sample size 16, pixel-space: no
VAE) with a 768-wide, 12-layer CLIP text encoder (a word-level tokenizer, so the vocabulary is small),
and the ``google/ddpm-celebahq-256`` UNet config at 32 px with random training images.

    python benchmarks/realsize_models.py OUT_DIR      # writes OUT_DIR/sd, OUT_DIR/ddpm, OUT_DIR/imgs, configs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toy.core.seeding import derive_seed  # noqa: E402 -- after the path set-up

WORDS = "a photo of the painting by van gogh monet cat dog in style".split()


def build_sd_v1(path: Path, sample_size: int = 16, seed: int = 0) -> Path:
    """SD v1.x UNet (320/640/1280/1280, 2 layers per block, 8 heads, cross-attention 768) and a 768-wide
    12-layer CLIP text encoder (intermediate 3072, 12 heads, 77 positions), random weights."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from scale import builders

    tok = builders.build_word_tokenizer(WORDS, model_max_length=77)
    torch.manual_seed(derive_seed(seed, "sd:text-encoder-init"))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = builders.build_cond_unet(sample_size=sample_size, channels=4, block_out_channels=(320, 640, 1280, 1280),
                                    cross_attention_dim=768, layers_per_block=2, attention_head_dim=8,
                                    norm_num_groups=32, seed=derive_seed(seed, "sd:unet-init"))
    sched = builders.build_scheduler(1000, "scaled_linear", 0.00085, 0.012)
    return builders.save_concept_pipeline(path, unet, te, tok, sched)


def build_celebahq_ddpm(path: Path, sample_size: int = 32, n_images: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """``google/ddpm-celebahq-256``'s UNet2DModel config (128/128/256/256/512/512, attention at 16x-down)
    at ``sample_size`` px with random weights, and ``n_images`` random RGB training images."""
    import numpy as np
    import torch
    from diffusers import UNet2DModel
    from PIL import Image

    from scale import builders

    torch.manual_seed(derive_seed(seed, "ddpm:unet-init"))
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 128, 256, 256, 512, 512),
                       down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
    builders.save_ddpm(path / "model", unet, builders.build_scheduler(1000))
    imgs = path / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(derive_seed(seed, "ddpm:training-images"))
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (sample_size, sample_size, 3), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    return path / "model", imgs


def sd_config(model: Path, budget: float = 1.0) -> str:
    return f"""model = "{model}"
method = "reverse_kl"
concepts = ["van gogh"]
retain_prompts = []                # as configs/sd_reverse_kl.toml (the tiny pre-flight tests cover retain prompts)
budgets = [{budget!r}]
lr_dual = 0.01
sample_steps = 10
trainable = "lora"
lora_rank = 4

[train]
steps = 1000
batch_size = 8
micro_batch = 1
lr = 1e-4
mixed_precision = "no"
"""


def ddpm_config(model: Path, imgs: Path, budget_factor: float = 1.05) -> str:
    return f"""model = "{model}"
method = "forward_kl"
train_dir = "{imgs}"
forget = ["000.png", "001.png"]
budget_factor = {budget_factor!r}
lr_dual = 0.05
forget_draws = 2
trainable = "full"

[train]
steps = 5000
batch_size = 32
micro_batch = 2
lr = 5e-6
mixed_precision = "no"
"""


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    build_sd_v1(out / "sd")
    model, imgs = build_celebahq_ddpm(out / "ddpm")
    (out / "sd_reverse_kl.toml").write_text(sd_config(out / "sd"))
    (out / "celebahq_forward_kl.toml").write_text(ddpm_config(model, imgs))
    print(out)
